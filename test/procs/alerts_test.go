package procs

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/streams"
)

const hookSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

// signedHook is a webhook receiver that counts requests by webhook-id and those
// whose signature does not verify.
type signedHook struct {
	*httptest.Server
	mu  sync.Mutex
	ids map[string]int
	bad int
}

func newSignedHook(t *testing.T) *signedHook {
	s, _ := notify.ParseSecret(hookSecret)
	h := &signedHook{ids: map[string]int{}}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		h.mu.Lock()
		defer h.mu.Unlock()
		if err := notify.Verify(s, r.Header, body, time.Now(), 5*time.Minute); err != nil {
			h.bad++
			return
		}
		h.ids[r.Header.Get(notify.HeaderID)]++
	}))
	t.Cleanup(h.Close)
	return h
}

// counts returns how many webhook-ids arrived and how many requests were badly signed.
func (h *signedHook) counts() (ids, bad int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ids), h.bad
}

// writeAlertConfig writes a SLUICE_CONFIG in dir with a rule firing for one event
// in a thousand (data.n) and h as the receiver (secret in HOOK_SECRET).
func writeAlertConfig(t *testing.T, dir string, h *signedHook) string {
	t.Helper()
	path := filepath.Join(dir, "sluice.yaml")
	cfg := fmt.Sprintf("rules:\n  - name: every-thousandth\n    filter: 'int(data.n) %% 1000 == 0'\n    severity: info\nreceivers:\n  - {name: hook, url: %q, secret_env: [HOOK_SECRET], allow_private: true}\n", h.URL)
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// shortAckWaits sets every topology consumer's ack wait to 2 s, so what a killed
// process held comes back quickly, and returns the topology.
func shortAckWaits(t *testing.T, js jetstream.JetStream) *streams.Topology {
	t.Helper()
	topo, err := streams.Load()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range topo.Consumers {
		cfg := c.Config
		cfg.AckWait = 2 * time.Second
		if _, err := js.CreateOrUpdateConsumer(context.Background(), c.Stream, cfg); err != nil {
			t.Fatal(err)
		}
	}
	return topo
}
