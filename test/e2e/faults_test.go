package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// Republishing 20,000 already-delivered events after JetStream's duplicate windows
// (cut to 1 s on EVENTS and UNIQUE) have passed adds no row and no alert: the dedup
// stage's own window (24 h) drops them.
func TestRepublishAfterStreamWindows(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	p := newPipelineOn(t, ns, "rules:\n  - name: tenth\n    filter: 'int(data.n) % 10 == 0'\n", nil)
	topo, _ := streams.Load()
	for _, name := range []string{streams.Events, streams.Unique} {
		cfg, _ := topo.Stream(name)
		cfg.Duplicates = time.Second
		if _, err := js.UpdateStream(ctx, *cfg); err != nil {
			t.Fatal(err)
		}
	}
	p.start()
	m := oracle.NewManifest(oracle.Spec{Total: 20_000, Seed: 3})
	if err := m.PublishAll(nc, 200); err != nil {
		t.Fatal(err)
	}
	counts := func() (events, alerts uint64) {
		_ = p.ch.QueryRow(ctx, "SELECT count() FROM events").Scan(&events)
		_ = p.ch.QueryRow(ctx, "SELECT count() FROM alerts").Scan(&alerts)
		return
	}
	wantAlerts := uint64(0)
	for i := range m.Events {
		if i%10 == 0 {
			wantAlerts++
		}
	}
	settle := func() {
		t.Helper()
		err := oracle.WaitFor(ctx, 2*time.Minute, func() error {
			if e, a := counts(); e < uint64(len(m.Events)) || a < wantAlerts {
				return fmt.Errorf("%d events, %d alerts", e, a)
			}
			return p.idle(ctx)
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	settle()
	first := time.Now()
	for time.Since(first) < 1500*time.Millisecond { // past both duplicate windows
		time.Sleep(50 * time.Millisecond)
	}
	if err := m.PublishAll(nc, 200); err != nil {
		t.Fatal(err)
	}
	if err := oracle.WaitFor(ctx, time.Minute, func() error {
		s, err := js.Stream(ctx, streams.Events)
		if err != nil {
			return err
		}
		if got := s.CachedInfo().State.Msgs; got < uint64(2*len(m.Publishes)) {
			return fmt.Errorf("EVENTS holds %d of %d", got, 2*len(m.Publishes))
		}
		return p.idle(ctx)
	}); err != nil {
		t.Fatal(err)
	}
	if err := m.Check(ctx, p.ch); err != nil {
		t.Fatal(err)
	}
	if _, a := counts(); a != wantAlerts {
		t.Fatalf("alerts = %d, want %d", a, wantAlerts)
	}
}

// A webhook receiver that answers 500 and then times out for a while, then 200:
// every alert reaches it, each under one webhook-id with a valid signature.
func TestWebhookDownThenUp(t *testing.T) {
	secret := "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	s, _ := notify.ParseSecret(secret)
	var (
		mu    sync.Mutex
		ids   = map[string]bool{}
		bad   int
		phase atomic.Int32 // 0: 500s, 1: timeouts, 2: up
		hits  atomic.Int32
	)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		hits.Add(1)
		switch phase.Load() {
		case 0:
			http.Error(w, "down", http.StatusInternalServerError)
			return
		case 1:
			time.Sleep(700 * time.Millisecond) // beyond the receiver's 300 ms timeout
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if err := notify.Verify(s, r.Header, body, time.Now(), 5*time.Minute); err != nil {
			bad++
			return
		}
		ids[r.Header.Get(notify.HeaderID)] = true
	}))
	defer hook.Close()
	cfg := fmt.Sprintf("rules:\n  - name: all\n    filter: 'type == \"order.created\"'\nreceivers:\n  - {name: hook, url: %q, secret_env: [S], allow_private: true, timeout: 300ms}\n", hook.URL)
	p := startPipeline(t, cfg, map[string]string{"S": secret})
	const alerts = 20
	for i := range alerts {
		if err := p.nc.Publish("events.shop.order", fmt.Appendf(nil, `{"id":"w%d","type":"order.created","data":{"order_id":"w%d","amount":1}}`, i, i)); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	// Down (500s) for a few retries (one notification in flight at a time: the rest
	// queue behind it), then timing out.
	if err := oracle.WaitFor(ctx, time.Minute, func() error {
		if hits.Load() < 4 {
			return fmt.Errorf("%d requests", hits.Load())
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	phase.Store(1)
	before := hits.Load()
	if err := oracle.WaitFor(ctx, time.Minute, func() error {
		if hits.Load() < before+3 {
			return fmt.Errorf("%d requests while timing out", hits.Load()-before)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	phase.Store(2)
	if err := oracle.WaitFor(ctx, 2*time.Minute, func() error {
		mu.Lock()
		n := len(ids)
		mu.Unlock()
		if n < alerts {
			return fmt.Errorf("%d of %d alerts delivered", n, alerts)
		}
		return p.idle(ctx)
	}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ids) != alerts || bad != 0 {
		t.Fatalf("%d webhook-ids (want %d), %d badly signed", len(ids), alerts, bad)
	}
}
