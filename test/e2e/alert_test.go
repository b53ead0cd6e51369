package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/test/oracle"
)

type received struct {
	id    string
	alert alerts.Alert
	err   error
}

// receiver records webhooks; it answers 503 to the first request of each id, so
// every alert is delivered through a retry.
type receiver struct {
	mu     sync.Mutex
	secret notify.Secret
	got    []received
	seen   map[string]int
}

func (rc *receiver) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rc.mu.Lock()
	defer rc.mu.Unlock()
	id := r.Header.Get(notify.HeaderID)
	rc.seen[id]++
	if rc.seen[id] == 1 {
		w.Header().Set("Retry-After", "1")
		http.Error(w, "try again", http.StatusServiceUnavailable)
		return
	}
	rec := received{id: id, err: notify.Verify(rc.secret, r.Header, body, time.Now(), 5*time.Minute)}
	var p notify.Payload
	if err := json.Unmarshal(body, &p); err != nil || len(p.Alerts) != 1 {
		rec.err = fmt.Errorf("want one alert in the notification: %d, %v", len(p.Alerts), err)
	} else {
		rec.alert = *p.Alerts[0]
	}
	rc.got = append(rc.got, rec)
}

// TestAlertReachesWebhook: a match rule fires once per matching unique event (a
// repeat fires nothing), each alert reaches the receiver signed, after a retry,
// and lands in the alerts table.
func TestAlertReachesWebhook(t *testing.T) {
	secret := "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	s, _ := notify.ParseSecret(secret)
	rc := &receiver{secret: s, seen: map[string]int{}}
	hook := httptest.NewServer(rc)
	defer hook.Close()
	cfg := fmt.Sprintf(`
rules:
  - name: big-order
    kind: match
    filter: type == "order.created" && data.amount > 1000
    severity: critical
    labels: {team: shop}
    annotations:
      summary: "order {{ .data.order_id }} of {{ .data.amount }}"
receivers:
  - name: local
    url: %s/hook
    secret_env: [HOOK_SECRET]
    allow_private: true
`, hook.URL)
	p := startPipeline(t, cfg, map[string]string{"HOOK_SECRET": secret})
	pub := func(id string, amount float64) {
		data, _ := json.Marshal(map[string]any{"specversion": "1.0", "id": id, "source": "shop", "type": "order.created",
			"data": map[string]any{"order_id": id, "amount": amount}})
		if err := p.nc.PublishMsg(&nats.Msg{Subject: "events.shop.order", Data: data}); err != nil {
			t.Fatal(err)
		}
	}
	pub("o-1", 5000)
	pub("o-2", 10)
	pub("o-3", 2500)
	pub("o-1", 5000) // a repeat: no second alert
	ctx := context.Background()
	err := oracle.WaitFor(ctx, time.Minute, func() error {
		rc.mu.Lock()
		n := len(rc.got)
		rc.mu.Unlock()
		var rows uint64
		if err := p.ch.QueryRow(ctx, "SELECT count() FROM alerts").Scan(&rows); err != nil {
			return err
		}
		if n < 2 || rows < 2 {
			return fmt.Errorf("webhooks %d, alert rows %d, want 2 each", n, rows)
		}
		return p.idle(ctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if len(rc.got) != 2 {
		t.Fatalf("got %d webhooks, want 2: %+v", len(rc.got), rc.got)
	}
	orders := map[string]bool{}
	for _, r := range rc.got {
		if r.err != nil {
			t.Errorf("webhook %s: %v", r.id, r.err)
		}
		if rc.seen[r.id] != 2 {
			t.Errorf("webhook %s was requested %d times, want 2 (one 503, one success)", r.id, rc.seen[r.id])
		}
		if r.alert.Rule != "big-order" || r.alert.Severity != "critical" || r.alert.Labels["team"] != "shop" {
			t.Errorf("alert = %+v", r.alert)
		}
		orders[r.alert.Annotations["summary"]] = true
	}
	if !orders["order o-1 of 5000"] || !orders["order o-3 of 2500"] {
		t.Errorf("summaries = %v", orders)
	}
	var rows, firing, open uint64
	if err := p.ch.QueryRow(ctx, "SELECT count(), countIf(status = 'firing'), countIf(ends_at = toDateTime(0) AND isNull(value)) FROM alerts WHERE rule = 'big-order'").Scan(&rows, &firing, &open); err != nil {
		t.Fatal(err)
	}
	if rows != 2 || firing != 2 || open != 2 {
		t.Errorf("alerts table: %d rows, %d firing, %d without end and value; want 2", rows, firing, open)
	}
}

// TestThresholdLifecycle: a windowed rule fires once for a burst and resolves when
// the burst leaves the window; both changes land in the alerts table with their
// start, end and value.
func TestThresholdLifecycle(t *testing.T) {
	cfg := `
rules:
  - name: failed-logins
    kind: threshold
    filter: type == "login.failed"
    group_by: [data.user]
    window: 1m
    op: ">"
    threshold: 3
    allowed_lateness: 1s
`
	p := startPipeline(t, cfg, nil)
	base := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	pub := func(id, user string, at time.Time) {
		data, _ := json.Marshal(map[string]any{"specversion": "1.0", "id": id, "source": "auth", "type": "login.failed",
			"time": at.Format(time.RFC3339Nano), "data": map[string]any{"user": user}})
		if err := p.nc.Publish("events.auth.login", data); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		pub(fmt.Sprint("l-", i), "u1", base.Add(time.Duration(i)*time.Second))
	}
	pub("l-4", "u1", base.Add(4*time.Second)) // a repeat id: deduplicated, not counted
	pub("l-5", "u2", base.Add(3*time.Minute)) // moves event time on: the windows close
	ctx := context.Background()
	type row struct {
		status     string
		start, end time.Time
		value      *float64
		labels     string
	}
	var rows []row
	err := oracle.WaitFor(ctx, time.Minute, func() error {
		r, err := p.ch.Query(ctx, "SELECT status, starts_at, ends_at, value, labels FROM alerts WHERE rule = 'failed-logins' ORDER BY status")
		if err != nil {
			return err
		}
		defer r.Close()
		rows = rows[:0]
		for r.Next() {
			var x row
			if err := r.Scan(&x.status, &x.start, &x.end, &x.value, &x.labels); err != nil {
				return err
			}
			rows = append(rows, x)
		}
		if len(rows) < 2 {
			return fmt.Errorf("%d alert rows", len(rows))
		}
		return p.idle(ctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 2 || rows[0].status != "firing" || rows[1].status != "resolved" {
		t.Fatalf("rows = %+v, want one firing and one resolved", rows)
	}
	fired, resolved := rows[0], rows[1]
	if !fired.start.Equal(base.Add(6*time.Second)) || fired.value == nil || *fired.value != 5 || !strings.Contains(fired.labels, `"user":"u1"`) {
		t.Errorf("firing row %+v: want start 12:00:06 (the first step's end) and value 5", fired)
	}
	if !resolved.start.Equal(fired.start) || !resolved.end.Equal(base.Add(66*time.Second)) {
		t.Errorf("resolved row %+v: want the same start and end 12:01:06", resolved)
	}
}
