package procs

import (
	"context"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

const hookSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

// signedHook is a webhook receiver that counts requests by webhook-id and those
// whose signature does not verify; gate, if set, answers each request first and
// says whether to count it (false: it answered otherwise).
type signedHook struct {
	*httptest.Server
	mu   sync.Mutex
	ids  map[string]int
	bad  int
	gate func(w http.ResponseWriter) bool
}

func newSignedHook(t *testing.T) *signedHook { return newGatedHook(t, nil) }

func newGatedHook(t *testing.T, gate func(w http.ResponseWriter) bool) *signedHook {
	t.Helper()
	s, err := notify.ParseSecret(hookSecret)
	if err != nil {
		t.Fatal(err)
	}
	h := &signedHook{ids: map[string]int{}, gate: gate}
	h.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if h.gate != nil && !h.gate(w) {
			return
		}
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

// deliveries returns the deliveries of each webhook-id (a copy) and how many
// requests were badly signed.
func (h *signedHook) deliveries() (map[string]int, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return maps.Clone(h.ids), h.bad
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

// waitDrained waits until ClickHouse holds at least what m expects, hook (if set)
// has wantAlerts webhook-ids, and every consumer is idle; then it checks m exactly
// and, with a hook, the alerts table and the webhooks.
func waitDrained(t *testing.T, ctx context.Context, conn driver.Conn, js jetstream.JetStream, topo *streams.Topology, m *oracle.Manifest, hook *signedHook, wantAlerts int) {
	t.Helper()
	err := oracle.WaitFor(ctx, 5*time.Minute, func() error {
		c, err := oracle.ReadCounts(ctx, conn)
		if err != nil {
			return err
		}
		if c.Events < uint64(len(m.Events)) || c.DeadLetters < uint64(len(m.Invalid)) {
			return fmt.Errorf("%+v", c)
		}
		if hook != nil {
			if got, _ := hook.counts(); got < wantAlerts {
				return fmt.Errorf("%d of %d alerts at the webhook", got, wantAlerts)
			}
			if err := natstest.Idle(ctx, js, streams.Notify, notify.DelivererConsumer("hook")); err != nil {
				return err
			}
		}
		for _, c := range topo.Consumers {
			if err := natstest.Idle(ctx, js, c.Stream, c.Config.Durable); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		if hook != nil {
			t.Logf("where the alerts are: %s", alertTrail(ctx, conn, js))
		}
		t.Fatal(err)
	}
	if err := m.Check(ctx, conn); err != nil {
		logDuplicates(t, ctx, conn)
		t.Fatal(err)
	}
	if hook == nil {
		return
	}
	var alertRows, distinct uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(fingerprint) FROM alerts").Scan(&alertRows, &distinct); err != nil {
		t.Fatal(err)
	}
	ids, bad := hook.counts()
	if alertRows != uint64(wantAlerts) || distinct != uint64(wantAlerts) || ids != wantAlerts || bad != 0 {
		t.Fatalf("alerts: %d rows (%d distinct), %d webhook-ids, %d badly signed; want %d", alertRows, distinct, ids, bad, wantAlerts)
	}
}

// alertTrail says how far alert changes got: ALERTS (evaluated), the alerts table
// (stored by the sink), notify's consumer (routed), NOTIFY and the deliverers'
// consumers (delivered) — which step lost what a webhook lacks.
func alertTrail(ctx context.Context, conn driver.Conn, js jetstream.JetStream) string {
	var b strings.Builder
	var rows uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM alerts").Scan(&rows); err != nil {
		fmt.Fprintf(&b, "alerts table: %v; ", err)
	} else {
		fmt.Fprintf(&b, "alerts table: %d rows; ", rows)
	}
	b.WriteString(streamTrail(ctx, js, streams.Alerts, streams.Notify))
	return b.String()
}

// streamTrail says, for each stream of names, how many messages it holds and how
// far each of its consumers got.
func streamTrail(ctx context.Context, js jetstream.JetStream, names ...string) string {
	var b strings.Builder
	for _, name := range names {
		s, err := js.Stream(ctx, name)
		if err != nil {
			fmt.Fprintf(&b, "%s: %v; ", name, err)
			continue
		}
		fmt.Fprintf(&b, "%s: %d messages, last seq %d; ", name, s.CachedInfo().State.Msgs, s.CachedInfo().State.LastSeq)
		for c := range s.ListConsumers(ctx).Info() {
			fmt.Fprintf(&b, "consumer %s: delivered %d, ack floor %d, %d pending, %d unacked, %d redelivered; ",
				c.Name, c.Delivered.Stream, c.AckFloor.Stream, c.NumPending, c.NumAckPending, c.NumRedelivered)
		}
	}
	return b.String()
}

// logDuplicates logs rows stored twice: dead letters of one input, events of one
// key, with the stream sequences that tell where the repeat came from.
func logDuplicates(t *testing.T, ctx context.Context, conn driver.Conn) {
	t.Helper()
	if rows, err := conn.Query(ctx, "SELECT any(payload), groupArray(source_seq), groupArray(stream_seq) FROM dead_letters GROUP BY source_stream, source_seq HAVING count() > 1 LIMIT 5"); err == nil {
		for rows.Next() {
			var payload string
			var src, seq []uint64
			_ = rows.Scan(&payload, &src, &seq)
			t.Logf("dead letter twice: source_seq %v stream_seq %v: %.80q", src, seq, payload)
		}
		rows.Close()
	}
	if rows, err := conn.Query(ctx, "SELECT key, groupArray(stream_seq) FROM events GROUP BY key HAVING count() > 1 LIMIT 8"); err == nil {
		for rows.Next() {
			var key string
			var seq []uint64
			_ = rows.Scan(&key, &seq)
			t.Logf("event twice: %s ENRICHED seqs %v", key, seq)
		}
		rows.Close()
	}
}
