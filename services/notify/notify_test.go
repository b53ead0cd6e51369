package notify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/lease"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/testlog"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/streams"
)

const testSecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

// hook is a webhook receiver that records what it was sent; answer, if set,
// decides each response by the request's number (from 1).
type hook struct {
	mu     sync.Mutex
	n      int
	answer func(n int, w http.ResponseWriter) bool
	got    []hookRequest
	srv    *httptest.Server
}

type hookRequest struct {
	id      string
	payload Payload
	err     error
}

func newHook(t *testing.T, answer func(n int, w http.ResponseWriter) bool) *hook {
	h := &hook{answer: answer}
	secret, _ := ParseSecret(testSecret)
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		h.mu.Lock()
		h.n++
		n, answer := h.n, h.answer
		h.mu.Unlock()
		if answer != nil && !answer(n, w) {
			return
		}
		req := hookRequest{id: r.Header.Get(HeaderID), err: Verify(secret, r.Header, body, time.Now(), 5*time.Minute)}
		if err := json.Unmarshal(body, &req.payload); err != nil {
			req.err = errors.Join(req.err, err)
		}
		h.mu.Lock()
		h.got = append(h.got, req)
		h.mu.Unlock()
	}))
	t.Cleanup(h.srv.Close)
	return h
}

// delivered returns the requests answered 2xx, and how many requests came in all.
func (h *hook) delivered() ([]hookRequest, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]hookRequest(nil), h.got...), h.n
}

// waitEachUserOnce waits until alerts of n users arrived, failing if one user's
// alert arrived under two webhook-ids.
func (h *hook) waitEachUserOnce(t *testing.T, n int) {
	t.Helper()
	users := map[string]string{}
	poll.Until(t, 30*time.Second, func() error {
		got, _ := h.delivered()
		clear(users)
		for _, r := range got {
			for _, a := range r.payload.Alerts {
				if id, ok := users[a.Labels["user"]]; ok && id != r.id {
					t.Fatalf("user %s in %s and %s", a.Labels["user"], id, r.id)
				}
				users[a.Labels["user"]] = r.id
			}
		}
		if len(users) < n {
			return fmt.Errorf("%d of %d users notified", len(users), n)
		}
		return nil
	})
}

type notifyRun struct {
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

func (r *notifyRun) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	<-r.done
	if r.err != nil {
		t.Fatal(r.err)
	}
}

// testConfig is the stage's config loaded from yaml, every secret testSecret.
func testConfig(t *testing.T, yaml string) Config {
	t.Helper()
	f, err := configfile.Parse("test.yaml", []byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(f, func(string) (string, bool) { return testSecret, true })
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// startNotify runs the stage with the config in yaml until stopped (or the test
// ends); opts change the loaded config.
func startNotify(t *testing.T, nc *nats.Conn, yaml string, opts ...func(*Config)) *notifyRun {
	t.Helper()
	cfg := testConfig(t, yaml)
	for _, o := range opts {
		o(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &notifyRun{cancel: cancel, done: make(chan struct{})}
	ready := make(chan struct{})
	go func() {
		defer close(r.done)
		r.err = Run(ctx, cfg, Deps{NATS: nc, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Registerer: prometheus.NewRegistry(),
			Ready: func() { close(ready) }})
	}()
	select {
	case <-ready:
	case <-r.done:
		t.Fatalf("notify stopped: %v", r.err)
	}
	t.Cleanup(func() {
		cancel()
		<-r.done
	})
	return r
}

func setup(t *testing.T) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	return nc, js
}

func publishAlert(t *testing.T, js jetstream.JetStream, a *alerts.Alert) {
	t.Helper()
	body, _ := json.Marshal(a)
	msg := nats.NewMsg(a.Subject())
	msg.Header.Set(nats.MsgIdHdr, fmt.Sprintf("alert:%s:%s:%d", a.Fingerprint, a.Status, a.StartsAt.UnixMilli()))
	msg.Data = body
	if _, err := js.PublishMsg(context.Background(), msg); err != nil {
		t.Fatal(err)
	}
}

// deadLetters returns the reasons of the DLQ's messages.
func deadLetters(t *testing.T, js jetstream.JetStream) []string {
	t.Helper()
	ctx := context.Background()
	s, err := js.Stream(ctx, streams.DLQ)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for seq := uint64(1); seq <= s.CachedInfo().State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			continue
		}
		out = append(out, m.Header.Get(stage.HeaderReason))
	}
	return out
}

func hookConfig(h *hook, extra string) string {
	return fmt.Sprintf("receivers:\n  - name: hook\n    url: %s\n    secret_env: [S]\n    allow_private: true\n%s", h.srv.URL, extra)
}

// A burst fires many alerts; group_wait gathers each group's into one signed
// notification.
func TestBurstOneNotificationPerGroup(t *testing.T) {
	nc, js := setup(t)
	h := newHook(t, nil)
	startNotify(t, nc, hookConfig(h, "routes:\n  - receivers: [hook]\n    group_by: [alertname]\n    group_wait: 500ms\n"))
	for i := range 5 {
		publishAlert(t, js, alert("logins", "firing", i, "user", fmt.Sprint("u", i)))
	}
	publishAlert(t, js, alert("other", "firing", 0, "user", "x"))
	publishAlert(t, js, alert("other", "firing", 0, "user", "y"))
	poll.Until(t, 10*time.Second, func() error {
		if got, _ := h.delivered(); len(got) < 2 {
			return fmt.Errorf("%d notifications", len(got))
		}
		return nil
	})
	got, n := h.delivered()
	sizes := map[string]int{}
	for _, r := range got {
		if r.err != nil {
			t.Errorf("notification %s: %v", r.id, r.err)
		}
		sizes[r.payload.GroupLabels["alertname"]] += len(r.payload.Alerts)
	}
	if n != 2 || sizes["logins"] != 5 || sizes["other"] != 2 {
		t.Fatalf("%d requests, alerts per group %v; want 2 requests with 5 and 2 alerts", n, sizes)
	}
}

// The receiver answers 500, then times out, then answers 200: every notification
// arrives, each webhook-id delivered once, nothing dead-lettered.
func TestReceiverDownThenUp(t *testing.T) {
	nc, js := setup(t)
	start := time.Now()
	h := newHook(t, func(n int, w http.ResponseWriter) bool {
		switch since := time.Since(start); {
		case since < 2*time.Second:
			http.Error(w, "down", http.StatusInternalServerError)
			return false
		case since < 4*time.Second:
			time.Sleep(600 * time.Millisecond) // past the receiver's 300ms timeout
			return false
		}
		return true
	})
	startNotify(t, nc, hookConfig(h, "    timeout: 300ms\n"))
	const alertsN = 10
	for i := range alertsN {
		publishAlert(t, js, alert("logins", "firing", i, "user", fmt.Sprint("u", i)))
	}
	poll.Until(t, 60*time.Second, func() error {
		if got, _ := h.delivered(); len(got) < alertsN {
			return fmt.Errorf("%d of %d delivered", len(got), alertsN)
		}
		return nil
	})
	got, n := h.delivered()
	ids := map[string]int{}
	users := map[string]bool{}
	for _, r := range got {
		ids[r.id]++
		if r.err != nil {
			t.Errorf("%s: %v", r.id, r.err)
		}
		for _, a := range r.payload.Alerts {
			users[a.Labels["user"]] = true
		}
	}
	if len(ids) != alertsN || len(users) != alertsN || n <= alertsN {
		t.Fatalf("%d ids, %d users, %d requests: want %d of each, after failed requests", len(ids), len(users), n, alertsN)
	}
	for id, c := range ids {
		if c != 1 {
			t.Errorf("%s delivered %d times", id, c)
		}
	}
	if dl := deadLetters(t, js); len(dl) != 0 {
		t.Fatalf("dead letters: %q", dl)
	}
}

// A receiver failing is recorded in the state bucket with its last error while it
// fails (what `sluice status` shows as backing off), and cleared once a delivery
// succeeds.
func TestFailingReceiverRecorded(t *testing.T) {
	nc, js := setup(t)
	var up atomic.Bool
	h := newHook(t, func(n int, w http.ResponseWriter) bool {
		if !up.Load() {
			http.Error(w, "down for maintenance", http.StatusServiceUnavailable)
			return false
		}
		return true
	})
	startNotify(t, nc, hookConfig(h, ""))
	publishAlert(t, js, alert("logins", "firing", 1, "user", "u1"))
	kv, err := js.KeyValue(context.Background(), StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, time.Minute, func() error {
		rs, err := ReadReceivers(context.Background(), kv)
		if err != nil {
			return err
		}
		f := rs["hook"].Failing
		if f == nil || f.Attempts < 2 || !strings.Contains(f.Error, "503") || f.Since.After(f.At) {
			return fmt.Errorf("receivers %+v, failing %+v", rs, f)
		}
		return nil
	})
	up.Store(true)
	poll.Until(t, time.Minute, func() error {
		if got, _ := h.delivered(); len(got) != 1 {
			return fmt.Errorf("%d delivered", len(got))
		}
		rs, err := ReadReceivers(context.Background(), kv)
		if err != nil {
			return err
		}
		if len(rs) != 0 {
			return fmt.Errorf("receivers after a delivery: %+v", rs)
		}
		return nil
	})
}

// 410 Gone disables the receiver: that notification and the next go to the DLQ
// with the reason; after `sluice receiver enable`, delivery resumes.
func TestGoneDisablesReceiver(t *testing.T) {
	nc, js := setup(t)
	gone := true
	var mu sync.Mutex
	h := newHook(t, func(n int, w http.ResponseWriter) bool {
		mu.Lock()
		defer mu.Unlock()
		if gone {
			http.Error(w, "gone", http.StatusGone)
			return false
		}
		return true
	})
	startNotify(t, nc, hookConfig(h, ""))
	publishAlert(t, js, alert("r", "firing", 0, "user", "a"))
	poll.Until(t, 10*time.Second, func() error {
		if dl := deadLetters(t, js); len(dl) != 1 || !strings.Contains(dl[0], "410 Gone") {
			return fmt.Errorf("dead letters %q", dl)
		}
		return nil
	})
	publishAlert(t, js, alert("r", "firing", 0, "user", "b"))
	poll.Until(t, 10*time.Second, func() error {
		if dl := deadLetters(t, js); len(dl) != 2 || !strings.Contains(dl[1], "receiver hook is disabled (410 Gone at") {
			return fmt.Errorf("dead letters %q", dl)
		}
		return nil
	})
	if _, n := h.delivered(); n != 1 {
		t.Fatalf("a disabled receiver got %d requests, want only the first", n)
	}
	mu.Lock()
	gone = false
	mu.Unlock()
	kv, err := js.KeyValue(context.Background(), StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	if err := EnableReceiver(context.Background(), kv, "hook"); err != nil {
		t.Fatal(err)
	}
	// Notify sees the enabling through its watch, a moment later: each try is a
	// new alert (the same one again would be dropped by the stream as a repeat of
	// its message id, and one sent before the watch caught up is dead-lettered).
	try := 0
	poll.Until(t, 10*time.Second, func() error {
		try++
		publishAlert(t, js, alert("r", "firing", 0, "user", fmt.Sprintf("c%d", try)))
		if got, _ := h.delivered(); len(got) == 0 {
			return errors.New("nothing delivered after enabling")
		}
		return nil
	})
}

// A notification not delivered within max_age goes to the DLQ with the last error.
func TestMaxAgeDeadLetters(t *testing.T) {
	nc, js := setup(t)
	h := newHook(t, func(n int, w http.ResponseWriter) bool {
		http.Error(w, "busy", http.StatusServiceUnavailable)
		return false
	})
	startNotify(t, nc, hookConfig(h, "    max_age: 1s\n"))
	publishAlert(t, js, alert("r", "firing", 0, "user", "a"))
	poll.Until(t, 20*time.Second, func() error {
		dl := deadLetters(t, js)
		if len(dl) != 1 {
			return fmt.Errorf("dead letters %q", dl)
		}
		if !strings.Contains(dl[0], "not delivered within max_age 1s; last error: receiver hook answered 503") || strings.Contains(dl[0], testSecret) {
			t.Fatalf("reason %q", dl[0])
		}
		return nil
	})
}

// A silence stored in the KV bucket mutes what it matches; the rest is sent.
func TestSilenceInKV(t *testing.T) {
	nc, js := setup(t)
	h := newHook(t, nil)
	ctx := context.Background()
	kv, err := SilenceStore(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := AddSilence(ctx, kv, Silence{Matchers: []string{"user=a"}, EndsAt: time.Now().Add(time.Hour), Comment: "test"}, time.Now()); err != nil {
		t.Fatal(err)
	}
	startNotify(t, nc, hookConfig(h, ""))
	publishAlert(t, js, alert("r", "firing", 0, "user", "a"))
	publishAlert(t, js, alert("r", "firing", 0, "user", "b"))
	poll.Until(t, 10*time.Second, func() error {
		if got, _ := h.delivered(); len(got) == 0 {
			return errors.New("nothing delivered")
		}
		return nil
	})
	// Let the stage go idle, then check a never went out.
	poll.Until(t, 10*time.Second, func() error { return natstest.Idle(ctx, js, streams.Alerts, "notify") })
	poll.Until(t, 10*time.Second, func() error { return natstest.Idle(ctx, js, streams.Notify, DelivererConsumer("hook")) })
	got, _ := h.delivered()
	if len(got) != 1 || got[0].payload.Alerts[0].Labels["user"] != "b" {
		t.Fatalf("delivered %+v, want only b", got)
	}
	list, err := ListSilences(ctx, kv)
	if err != nil || len(list) != 1 || list[0].Comment != "test" {
		t.Fatalf("silences %+v, %v", list, err)
	}
}

// Restarting the stage mid-burst changes nothing the receiver sees: every alert
// arrives in exactly one notification id.
func TestRestartMidBurst(t *testing.T) {
	nc, js := setup(t)
	h := newHook(t, func(n int, w http.ResponseWriter) bool {
		time.Sleep(20 * time.Millisecond)
		return true
	})
	cfg := hookConfig(h, "routes:\n  - receivers: [hook]\n    group_by: [user]\n")
	run := startNotify(t, nc, cfg)
	const alertsN = 60
	for i := range alertsN {
		publishAlert(t, js, alert("r", "firing", 0, "user", fmt.Sprint("u", i)))
	}
	poll.Until(t, 10*time.Second, func() error {
		if got, _ := h.delivered(); len(got) < 5 {
			return fmt.Errorf("%d delivered", len(got))
		}
		return nil
	})
	run.stop(t)
	startNotify(t, nc, cfg)
	h.waitEachUserOnce(t, alertsN)
}

// Two replicas at once: one routes (the lease holder), both deliver, never two
// requests to the receiver at a time; when the router stops, the other takes over
// and every alert still arrives in exactly one notification id.
func TestReplicas(t *testing.T) {
	nc, js := setup(t)
	var (
		mu               sync.Mutex
		inFlight, maxFly int
	)
	h := newHook(t, func(n int, w http.ResponseWriter) bool {
		mu.Lock()
		inFlight++
		maxFly = max(maxFly, inFlight)
		mu.Unlock()
		time.Sleep(10 * time.Millisecond)
		mu.Lock()
		inFlight--
		mu.Unlock()
		return true
	})
	cfg := hookConfig(h, "routes:\n  - receivers: [hook]\n    group_by: [user]\n")
	replica := func(name string) func(*Config) {
		return func(c *Config) { c.Replica, c.LeaseTTL = name, time.Second }
	}
	a := startNotify(t, nc, cfg, replica("a"))
	const alertsN = 40
	for i := range alertsN / 2 {
		publishAlert(t, js, alert("r", "firing", 0, "user", fmt.Sprint("u", i)))
	}
	poll.Until(t, 10*time.Second, func() error {
		if got, _ := h.delivered(); len(got) < 5 {
			return fmt.Errorf("%d delivered", len(got))
		}
		return nil
	})
	startNotify(t, nc, cfg, replica("b")) // a holds the lease: b only delivers
	a.stop(t)
	for i := alertsN / 2; i < alertsN; i++ {
		publishAlert(t, js, alert("r", "firing", 0, "user", fmt.Sprint("u", i)))
	}
	h.waitEachUserOnce(t, alertsN)
	mu.Lock()
	defer mu.Unlock()
	if maxFly != 1 {
		t.Fatalf("%d requests in flight at once, want 1", maxFly)
	}
}

// A lease not renewed (its holder crashed) is taken over once it expired, and the
// old holder's next renewal fails.
func TestLeaseTakeover(t *testing.T) {
	_, js := setup(t)
	ctx := context.Background()
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "lease_test"})
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	a := &lease.Lease{KV: kv, Key: "lease.router", Holder: "a", TTL: 3 * time.Second, Log: log}
	b := &lease.Lease{KV: kv, Key: "lease.router", Holder: "b", TTL: 3 * time.Second, Log: log}
	now := time.Now()
	revA, err := a.Acquire(ctx, 0, false, now)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Acquire(ctx, 0, false, now.Add(time.Second)); !errors.Is(err, lease.ErrTaken) {
		t.Fatalf("b took a live lease: %v", err)
	}
	if revA, err = a.Acquire(ctx, revA, true, now.Add(time.Second)); err != nil {
		t.Fatalf("a renews: %v", err)
	}
	if _, err := b.Acquire(ctx, 0, false, now.Add(5*time.Second)); err != nil {
		t.Fatalf("b takes over the expired lease: %v", err)
	}
	if _, err := a.Acquire(ctx, revA, true, now.Add(5*time.Second)); !errors.Is(err, lease.ErrTaken) {
		t.Fatalf("a renewed a lease b holds: %v", err)
	}
}

// Loopback addresses are refused at connect time unless allowed.
func TestPrivateAddressRefused(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	r, err := NewReceiver(ReceiverConfig{Name: "x", URL: srv.URL, SecretEnv: []string{"S"}}, func(string) (string, bool) { return "secret", true })
	if err != nil {
		t.Fatal(err)
	}
	err = r.Deliver(context.Background(), "msg_1", []byte(`{}`))
	var perm *PermanentError
	if err == nil || !strings.Contains(err.Error(), "address not allowed") || !errors.As(err, &perm) {
		t.Fatalf("err = %v, want a permanent refusal of the loopback address", err)
	}
	if strings.Contains(err.Error(), "secret") {
		t.Fatal("the error shows the secret")
	}
}

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"", 0},
		{"5", 5 * time.Second},
		{"-3", 0},
		{"999999", time.Hour},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{"soon", 0},
	}
	for _, tt := range tests {
		if got := retryAfter(tt.in, now); got != tt.want {
			t.Errorf("retryAfter(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

// A router that cannot start (its ALERTS consumer is missing, as while a cluster
// elects its leader) is started again, and routes once it can; it neither ends
// notify nor waits for ever.
func TestRouterStartsAgain(t *testing.T) {
	nc, js := setup(t)
	ctx := context.Background()
	if err := js.DeleteConsumer(ctx, streams.Alerts, "notify"); err != nil {
		t.Fatal(err)
	}
	h := newHook(t, nil)
	f, err := configfile.Parse("test.yaml", []byte(hookConfig(h, "")))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(f, func(string) (string, bool) { return testSecret, true })
	if err != nil {
		t.Fatal(err)
	}
	var logs testlog.Buffer
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- Run(runCtx, cfg, Deps{NATS: nc, Logger: slog.New(slog.NewTextHandler(&logs, nil)), Registerer: prometheus.NewRegistry()})
	}()
	poll.Until(t, 30*time.Second, func() error {
		select {
		case err := <-done:
			t.Fatalf("notify ended: %v", err)
		default:
		}
		if !strings.Contains(logs.String(), "routing stopped; starting it again") {
			return errors.New("the router has not failed yet")
		}
		return nil
	})
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	publishAlert(t, js, alert("logins", "firing", 0, "user", "u0"))
	h.waitEachUserOnce(t, 1)
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// An alert is acked only once the groups it changed are saved. A save that fails
// (the bucket refusing it, as while a node is lost) leaves the group changed in
// memory; the alert comes again and changes nothing the second time, and acking it
// then would lose it: routing that starts again from the bucket has no trace of it.
func TestAckedOnlyOnceSaved(t *testing.T) {
	nc, js := setup(t)
	ctx := context.Background()
	h := newHook(t, nil)
	// A long group_wait: nothing is flushed (and saved by the flush) meanwhile.
	startNotify(t, nc, hookConfig(h, "routes:\n  - receivers: [hook]\n    group_wait: 1h\n"))
	bucket, err := js.Stream(ctx, "KV_"+StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	limit := func(size int32) {
		t.Helper()
		cfg := bucket.CachedInfo().Config
		cfg.MaxMsgSize = size
		if _, err := js.UpdateStream(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	// The bucket takes the lease's renewals (under 256 bytes) and refuses the group.
	limit(256)
	a := alert("logins", "firing", 0, "user", "u0", "note", strings.Repeat("a long label ", 40))
	publishAlert(t, js, a)
	notifyConsumer, err := js.Consumer(ctx, streams.Alerts, "notify")
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 30*time.Second, func() error {
		info, err := notifyConsumer.Info(ctx)
		if err != nil {
			return err
		}
		if info.NumRedelivered == 0 && info.AckFloor.Stream == 0 {
			return errors.New("the alert has not come again yet")
		}
		return nil
	})
	kv, err := js.KeyValue(ctx, StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	saved := func() error {
		keys, err := kv.ListKeysFiltered(ctx, "group.*")
		if err != nil {
			return err
		}
		for range keys.Keys() {
			return nil
		}
		return errors.New("no group saved")
	}
	if info, err := notifyConsumer.Info(ctx); err != nil {
		t.Fatal(err)
	} else if info.AckFloor.Stream > 0 {
		if err := saved(); err != nil {
			t.Fatalf("the alert was acked and its group is not in the bucket: %v", err)
		}
	}
	limit(-1)
	poll.Until(t, 30*time.Second, func() error {
		if err := natstest.Idle(ctx, js, streams.Alerts, "notify"); err != nil {
			return err
		}
		return saved()
	})
}

// A group grown past what a NATS message holds can be neither saved nor queued as
// one notification: the alerts that do not fit go to the DLQ with the reason, and
// routing goes on for the other groups (it neither retries for ever nor stops).
func TestGroupTooLarge(t *testing.T) {
	nc, js := setup(t)
	ctx := context.Background()
	h := newHook(t, nil)
	startNotify(t, nc, hookConfig(h, "routes:\n  - receivers: [hook]\n    group_by: [alertname]\n    group_wait: 100ms\n    group_interval: 100ms\n"))
	big := strings.Repeat("x", 300_000)
	for i := range 6 {
		publishAlert(t, js, alert("wide", "firing", i, "user", fmt.Sprint("u", i), "note", big))
	}
	poll.Until(t, 30*time.Second, func() error { return natstest.Idle(ctx, js, streams.Alerts, "notify") })
	var tooLarge int
	for _, reason := range deadLetters(t, js) {
		if strings.Contains(reason, "more than a NATS message holds") {
			tooLarge++
		}
	}
	// Three alerts of 300 kB fit in a 1 MiB message, with room for the rest.
	if tooLarge < 3 || tooLarge > 4 {
		t.Fatalf("%d alerts dead-lettered as too large for their group, want 3 or 4 of 6 (reasons: %q)", tooLarge, deadLetters(t, js))
	}
	publishAlert(t, js, alert("narrow", "firing", 0, "user", "u0"))
	poll.Until(t, 30*time.Second, func() error {
		got, _ := h.delivered()
		for _, r := range got {
			for _, a := range r.payload.Alerts {
				if a.Labels["alertname"] == "narrow" {
					return nil
				}
			}
		}
		return errors.New("the other group's alert has not arrived")
	})
}

// A flush cut off while it queues (its lead ended) has marked notifications sent
// that NOTIFY never got: nothing of that router may be saved again — an alert
// routed into the group afterwards would save it as sent, and routing starting
// over from the bucket would never send it. The alert is refused (redelivered to
// the next router) and the bucket keeps the group unsent.
func TestCutFlushSavesNothing(t *testing.T) {
	nc, js := setup(t)
	ctx := context.Background()
	h := newHook(t, nil)
	f, err := configfile.Parse("test.yaml", []byte(hookConfig(h, "routes:\n  - receivers: [hook]\n    group_by: [alertname]\n")))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(f, func(string) (string, bool) { return testSecret, true })
	if err != nil {
		t.Fatal(err)
	}
	state, err := streams.KeyValue(ctx, js, jetstream.KeyValueConfig{Bucket: StateBucket})
	if err != nil {
		t.Fatal(err)
	}
	s := &stageRun{js: js, state: state, log: slog.New(slog.DiscardHandler), m: newMetrics(prometheus.NewRegistry()), silences: &Silences{},
		wake: make(chan struct{}, 1), maxPayload: nc.MaxPayload(), router: NewRouter(cfg.Routes, cfg.inhibit, nil)}
	route := s.route()
	// The alerts as the router's consumer gets them.
	publishAlert(t, js, alert("logins", "firing", 0, "user", "u0"))
	publishAlert(t, js, alert("logins", "firing", 1, "user", "u1"))
	cons, err := js.OrderedConsumer(ctx, streams.Alerts, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(2, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	var msgs []jetstream.Msg
	for m := range batch.Messages() {
		msgs = append(msgs, m)
	}
	if len(msgs) != 2 {
		t.Fatalf("fetched %d alerts, want 2", len(msgs))
	}
	if _, err := route(msgs[0]); err != nil {
		t.Fatal(err)
	}
	// NOTIFY refuses the notification; the flush retries until its lead ends.
	notifyStream, err := js.Stream(ctx, streams.Notify)
	if err != nil {
		t.Fatal(err)
	}
	ncfg := notifyStream.CachedInfo().Config
	ncfg.MaxMsgSize = 16
	if _, err := js.UpdateStream(ctx, ncfg); err != nil {
		t.Fatal(err)
	}
	fctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	if err := s.flush(fctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("flush with NOTIFY refusing: %v, want the lead's end", err)
	}
	if _, err := route(msgs[1]); err == nil {
		t.Fatal("an alert was routed by a router whose flush was cut off")
	}
	groups, err := loadGroups(ctx, state)
	if err != nil {
		t.Fatal(err)
	}
	if len(groups) != 1 || groups[0].Flushes != 0 || len(groups[0].Sent) != 0 {
		t.Fatalf("the bucket holds %d groups, the first sent %d times (%v): want one, not sent", len(groups), groups[0].Flushes, groups[0].Sent)
	}
}

// A receiver whose consumer cannot be made (here: one of its name exists with a
// deliver policy that cannot be changed) ends Run with the error, after the
// receivers started before it stopped. Before, Run waited for those receivers,
// which only the end of its caller's context stopped: it never returned.
func TestReceiverConsumerFailureEndsRun(t *testing.T) {
	nc, js := setup(t)
	h := newHook(t, nil)
	yaml := fmt.Sprintf("receivers:\n  - name: a\n    url: %s\n    secret_env: [S]\n    allow_private: true\n  - name: b\n    url: %s\n    secret_env: [S]\n    allow_private: true\n", h.srv.URL, h.srv.URL)
	if _, err := js.CreateOrUpdateConsumer(context.Background(), streams.Notify, jetstream.ConsumerConfig{
		Durable: DelivererConsumer("b"), FilterSubject: "notify.b", AckPolicy: jetstream.AckExplicitPolicy, DeliverPolicy: jetstream.DeliverNewPolicy,
	}); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, yaml)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, cfg, Deps{NATS: nc, Logger: slog.New(slog.DiscardHandler), Registerer: prometheus.NewRegistry()})
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), DelivererConsumer("b")) {
			t.Fatalf("Run: %v, want the error of receiver b's consumer", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return 30 s after receiver b's consumer failed")
	}
}

// A receiver's URL may be a secret (Slack's incoming webhooks: the path is the
// token): url_env reads it from the environment, and a delivery's error shows the
// scheme and host only (Go's error named the whole URL, and it reached the log and
// the dead letter's reason).
func TestReceiverURLKeptSecret(t *testing.T) {
	addr := testnet.FreeAddr(t) // nothing listens there
	secretURL := "http://" + addr + "/services/T000/B000/XXXXTOKEN?key=QQQQ"
	env := func(k string) (string, bool) {
		v, ok := map[string]string{"SLACK_URL": secretURL, "BAD_URL": "hooks/XXXXTOKEN"}[k]
		return v, ok
	}
	r, err := NewReceiver(ReceiverConfig{Name: "chat", URLEnv: "SLACK_URL", Format: FormatSlack, AllowPrivate: true}, env)
	if err != nil {
		t.Fatal(err)
	}
	err = r.Deliver(context.Background(), "msg_1", []byte(`{}`))
	if err == nil || strings.Contains(err.Error(), "XXXXTOKEN") || strings.Contains(err.Error(), "QQQQ") || !strings.Contains(err.Error(), "http://"+addr+"/…") {
		t.Fatalf("err = %v; want the scheme and host only", err)
	}
	for _, c := range []struct {
		cfg  ReceiverConfig
		want string
	}{
		{ReceiverConfig{Name: "a", URLEnv: "NOPE", Format: FormatSlack}, "environment variable NOPE (url_env) is not set"},
		{ReceiverConfig{Name: "a", URLEnv: "BAD_URL", Format: FormatSlack}, `environment variable BAD_URL (url_env): scheme "", want http or https`},
		// A URL in the file is not shown either: a typo in its scheme, a space.
		{ReceiverConfig{Name: "a", URL: "htps://hooks.example/XXXXTOKEN", Format: FormatSlack}, `url: scheme "htps", want http or https`},
		{ReceiverConfig{Name: "a", URL: "https://hooks.example/XXXXTOKEN\x7f", Format: FormatSlack}, "url does not parse as a URL"},
		{ReceiverConfig{Name: "a", URL: "https:///XXXXTOKEN", Format: FormatSlack}, "url has no host (want https://host/path)"},
		{ReceiverConfig{Name: "a", URL: "https://x.example", URLEnv: "SLACK_URL", Format: FormatSlack}, "set url or url_env, not both"},
	} {
		_, err := NewReceiver(c.cfg, env)
		if err == nil || err.Error() != c.want || strings.Contains(err.Error(), "XXXXTOKEN") {
			t.Errorf("%+v: %v; want %q", c.cfg, err, c.want)
		}
	}
}
