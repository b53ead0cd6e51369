package alert

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/streams"
)

type harness struct {
	t  testing.TB
	nc *nats.Conn
	js jetstream.JetStream
	n  int
}

func newHarness(t testing.TB) *harness {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	return &harness{t: t, nc: nc, js: js}
}

// publish puts an enriched event on ENRICHED, as the enrich stage does.
func (h *harness) publish(typ string, at time.Time, data string) {
	h.t.Helper()
	h.n++
	e := &events.Event{ID: fmt.Sprint("e", h.n), Source: "test", Type: typ, Time: at, Key: fmt.Sprint("test/e", h.n), Data: json.RawMessage(data)}
	b, err := e.Marshal()
	if err != nil {
		h.t.Fatal(err)
	}
	if _, err := h.js.Publish(context.Background(), "enriched.test", b); err != nil {
		h.t.Fatal(err)
	}
}

type stageHandle struct {
	cancel context.CancelFunc
	done   chan struct{}
	err    error
	reg    *prometheus.Registry
}

func (s *stageHandle) stop(t testing.TB) {
	t.Helper()
	s.cancel()
	<-s.done
	if s.err != nil {
		t.Fatal(s.err)
	}
}

// start runs the stage on the config file at path.
func (h *harness) start(path string) *stageHandle {
	h.t.Helper()
	f, err := configfile.Load(path)
	if err != nil {
		h.t.Fatal(err)
	}
	cfg, err := LoadConfig(f)
	if err != nil {
		h.t.Fatal(err)
	}
	cfg.GroupsDir = h.t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	s := &stageHandle{cancel: cancel, done: make(chan struct{}), reg: prometheus.NewRegistry()}
	ready := make(chan struct{})
	go func() {
		defer close(s.done)
		s.err = Run(ctx, cfg, Deps{NATS: h.nc, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Registerer: s.reg, Ready: func() { close(ready) }})
	}()
	select {
	case <-ready:
	case <-s.done:
		h.t.Fatalf("alert stage stopped: %v", s.err)
	}
	h.t.Cleanup(func() {
		cancel()
		<-s.done
	})
	return s
}

// alertsInStream returns every alert in ALERTS, in order.
func (h *harness) alertsInStream() []*alerts.Alert {
	h.t.Helper()
	ctx := context.Background()
	s, err := h.js.Stream(ctx, streams.Alerts)
	if err != nil {
		h.t.Fatal(err)
	}
	var out []*alerts.Alert
	for seq := uint64(1); seq <= s.CachedInfo().State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			continue
		}
		a, err := alerts.Decode(m.Data)
		if err != nil {
			h.t.Fatal(err)
		}
		out = append(out, a)
	}
	return out
}

func writeConfig(t testing.TB, text string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

const loginRule = `
alert: {snapshot_interval: 100ms, idle_after: 1h}
rules:
  - name: failed-logins
    kind: threshold
    filter: type == "login.failed"
    group_by: [data.user]
    window: 1m
    step: 10s
    op: ">"
    threshold: 3
    allowed_lateness: 1s
`

// count returns how many alerts in list have the status, by the value of label.
func count(list []*alerts.Alert, status, label string) map[string]int {
	out := map[string]int{}
	for _, a := range list {
		if a.Status == status {
			out[a.Labels[label]]++
		}
	}
	return out
}

// A burst fires one alert per group; a restart from an older snapshot (as after
// a crash) re-reads the input and publishes nothing twice, even with ALERTS's
// duplicate window long past. The same with the groups on disk (one in memory).
func TestStageRestartFromOlderSnapshot(t *testing.T) {
	for _, rule := range []string{loginRule, strings.Replace(loginRule, "idle_after: 1h}", "idle_after: 1h, store: disk, hot_groups: 1}", 1)} {
		t.Run(map[bool]string{true: "memory", false: "disk"}[rule == loginRule], func(t *testing.T) { testStageRestartFromOlderSnapshot(t, rule) })
	}
}

func testStageRestartFromOlderSnapshot(t *testing.T, rule string) {
	h := newHarness(t)
	ctx := context.Background()
	// Shrink ALERTS's duplicate window, so only the stage's own check can stop a
	// second publication.
	s, err := h.js.Stream(ctx, streams.Alerts)
	if err != nil {
		t.Fatal(err)
	}
	scfg := s.CachedInfo().Config
	scfg.Duplicates = 100 * time.Millisecond
	if _, err := h.js.UpdateStream(ctx, scfg); err != nil {
		t.Fatal(err)
	}
	path := writeConfig(t, rule)
	base := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	st := h.start(path)
	for u := range 3 {
		for i := range 5 {
			h.publish("login.failed", base.Add(time.Duration(i)*time.Second), fmt.Sprintf(`{"user":"u%d"}`, u))
		}
	}
	st.stop(t)
	store, err := h.js.ObjectStore(ctx, StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	stopped, err := store.GetInfo(ctx, "state")
	if err != nil {
		t.Fatal(err)
	}
	st = h.start(path)
	// The snapshot written at start has the burst but no alert yet. Waited for: on a
	// slow machine the one the first run wrote at its stop is still there a while.
	savedSince(t, store, stopped.NUID, "the second run has not saved its state yet")
	older, err := store.GetBytes(ctx, "state")
	if err != nil {
		t.Fatal(err)
	}
	// Its checkpoint files, as they are now: the run keeps the files of its last two
	// saves only, and on a slow machine it saves more than once (every 100 ms while
	// the state changes) before it stops, so they may be gone by then. A snapshot
	// whose files are gone is no state to restart from; one whose files are there is
	// what this test restarts from.
	files := map[string][]byte{}
	infos, err := store.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, info := range infos {
		if info.Name == "state" {
			continue
		}
		if files[info.Name], err = store.GetBytes(ctx, info.Name); err != nil {
			t.Fatal(err)
		}
	}
	h.publish("login.failed", base.Add(30*time.Second), `{"user":"late"}`) // closes the windows ending at 10 and 20 s
	poll.Until(t, 10*time.Second, func() error {
		if n := len(h.alertsInStream()); n != 3 {
			return fmt.Errorf("%d alerts", n)
		}
		return nil
	})
	st.stop(t)
	for name, b := range files {
		if _, err := store.GetInfo(ctx, name); errors.Is(err, jetstream.ErrObjectNotFound) {
			if _, err := store.PutBytes(ctx, name, b); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := store.PutBytes(ctx, "state", older); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // past ALERTS's shortened duplicate window
	st = h.start(path)
	list := h.resolveBurst(st, base)
	if len(list) != 6 {
		t.Fatalf("%d alert changes in ALERTS, want 6", len(list))
	}
	if skipped := metricValue(t, st.reg, "sluice_alert_republish_skipped_total"); skipped != 3 {
		t.Fatalf("skipped %v republications, want the 3 firings", skipped)
	}
}

// Replicas of the split stage run at once and each saves the one state object:
// whichever saved last, every file its checkpoint names is there (each replica
// deletes only its own files), and a new replica restores from it.
func TestStageReplicasShareTheState(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	path := writeConfig(t, loginRule)
	var store jetstream.ObjectStore
	// state reads the state object and checks that the files it names are there.
	state := func() (snapshot, error) {
		var snap snapshot
		b, err := store.GetBytes(ctx, "state")
		if err != nil {
			return snap, err
		}
		if err := json.Unmarshal(b, &snap); err != nil {
			return snap, err
		}
		for _, sg := range snap.Checkpoint {
			if _, err := store.GetInfo(ctx, sg.File.Object); err != nil {
				return snap, fmt.Errorf("the state names %s: %w", sg.File.Object, err)
			}
		}
		return snap, nil
	}
	// writers returns the replicas that wrote checkpoint files (their nonces).
	writers := func() map[string]bool {
		infos, err := store.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]bool{}
		for _, info := range infos {
			if f := strings.Split(info.Name, "."); len(f) > 4 && f[0] == "groups" {
				out[f[3]] = true
			}
		}
		return out
	}
	base := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	for u := range 3 {
		for i := range 5 {
			h.publish("login.failed", base.Add(time.Duration(i)*time.Second), fmt.Sprintf(`{"user":"u%d"}`, u))
		}
	}
	// Groups enough that a checkpoint's base outweighs its deltas: it stays
	// while the replicas run (and is named by every state).
	for u := range 2000 {
		h.publish("login.failed", base.Add(5*time.Second), fmt.Sprintf(`{"user":"quiet%d"}`, u))
	}
	first := h.start(path)
	store, err := h.js.ObjectStore(ctx, StateBucket)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, func() error {
		snap, err := state()
		if err == nil && snap.Seq < 2015 {
			err = fmt.Errorf("state at %d", snap.Seq)
		}
		return err
	})
	second := h.start(path)
	poll.Until(t, 10*time.Second, func() error {
		if n := len(writers()); n < 2 {
			return fmt.Errorf("%d replicas wrote checkpoint files", n)
		}
		return nil
	})
	h.publish("login.failed", base.Add(30*time.Second), `{"user":"late"}`)
	// The second stops, then the first: the state is the first's, begun before
	// the second, and whole.
	second.stop(t)
	first.stop(t)
	if _, err := state(); err != nil {
		t.Fatal(err)
	}
	h.resolveBurst(h.start(path), base)
	if _, err := state(); err != nil {
		t.Fatal(err)
	}
}

// resolveBurst publishes the event that resolves the alerts of a burst of users
// u0 to u2 at base, stops st once the six changes are in ALERTS, and checks that
// each user's alert fired and resolved once; it returns ALERTS's changes.
func (h *harness) resolveBurst(st *stageHandle, base time.Time) []*alerts.Alert {
	t := h.t
	t.Helper()
	h.publish("login.failed", base.Add(200*time.Second), `{"user":"late"}`)
	poll.Until(t, 10*time.Second, func() error {
		if n := len(h.alertsInStream()); n < 6 {
			return fmt.Errorf("%d alerts", n)
		}
		return nil
	})
	st.stop(t)
	list := h.alertsInStream()
	firing, resolved := count(list, alerts.Firing, "user"), count(list, alerts.Resolved, "user")
	for u := range 3 {
		user := fmt.Sprint("u", u)
		if firing[user] != 1 || resolved[user] != 1 {
			t.Errorf("%s: fired %d, resolved %d times; want once each", user, firing[user], resolved[user])
		}
	}
	return list
}

func metricValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			sum := 0.0
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
			return sum
		}
	}
	return 0
}

// Input already in ENRICHED before the stage had any state is a replay: its
// alerts are marked; input after is not.
func TestReplayMarked(t *testing.T) {
	h := newHarness(t)
	path := writeConfig(t, `
alert: {snapshot_interval: 100ms}
rules:
  - name: big
    filter: data.amount > 10
`)
	h.publish("order", time.Now(), `{"amount":50}`)
	h.start(path)
	h.publish("order", time.Now(), `{"amount":60}`)
	poll.Until(t, 10*time.Second, func() error {
		if n := len(h.alertsInStream()); n != 2 {
			return fmt.Errorf("%d alerts", n)
		}
		return nil
	})
	list := h.alertsInStream()
	if !list[0].Replay || list[1].Replay {
		t.Fatalf("replay flags %v, %v; want true then false", list[0].Replay, list[1].Replay)
	}
}

// An absence rule fires when events stop: event time moves on with the clock
// once the input is idle; the group's next event resolves it.
func TestAbsenceWhenEventsStop(t *testing.T) {
	h := newHarness(t)
	path := writeConfig(t, `
alert: {snapshot_interval: 100ms, idle_after: 300ms}
rules:
  - name: silent
    kind: absence
    filter: type == "beat"
    group_by: [data.device]
    for: 2s
    allowed_lateness: 100ms
`)
	h.start(path)
	h.publish("beat", time.Now(), `{"device":"d1"}`)
	h.publish("beat", time.Now(), `{"device":"d2"}`)
	poll.Until(t, 15*time.Second, func() error {
		if n := len(count(h.alertsInStream(), alerts.Firing, "device")); n != 2 {
			return fmt.Errorf("%d devices silent", n)
		}
		return nil
	})
	h.publish("beat", time.Now(), `{"device":"d1"}`)
	poll.Until(t, 10*time.Second, func() error {
		list := h.alertsInStream()
		if len(list) != 3 || list[2].Status != alerts.Resolved {
			return fmt.Errorf("%d alerts", len(list))
		}
		return nil
	})
}

// A changed config file reloads the rules without a restart.
func TestRulesReload(t *testing.T) {
	h := newHarness(t)
	path := writeConfig(t, "alert: {reload_interval: 50ms}\nrules:\n  - name: a\n    filter: data.n == 1\n")
	h.start(path)
	h.publish("x", time.Now(), `{"n":2}`)
	if err := os.WriteFile(path, []byte("alert: {reload_interval: 50ms}\nrules:\n  - name: b\n    filter: data.n == 2\n  - name: broken\n    filter: nope(\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, func() error {
		h.publish("x", time.Now(), `{"n":2}`)
		for _, a := range h.alertsInStream() {
			if a.Rule == "b" {
				return nil
			}
		}
		return fmt.Errorf("rule b not loaded yet")
	})
}

// savedSince waits until the state object is another than the one of NUID nuid
// (a save since); why is the failure's message.
func savedSince(t *testing.T, store jetstream.ObjectStore, nuid, why string) {
	t.Helper()
	poll.Until(t, 30*time.Second, func() error {
		info, err := store.GetInfo(context.Background(), "state")
		if err != nil {
			return err
		}
		if info.NUID == nuid {
			return errors.New(why)
		}
		return nil
	})
}

// loginConfig is the stage's config of loginRule, its groups on disk.
func loginConfig(t *testing.T) Config {
	t.Helper()
	f, err := configfile.Load(writeConfig(t, loginRule))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := LoadConfig(f)
	if err != nil {
		t.Fatal(err)
	}
	cfg.GroupsDir = t.TempDir()
	return cfg
}

// heldState is a StateStore whose saves wait, once hold is set, until released:
// a slow object store.
type heldState struct {
	StateStore
	hold    atomic.Bool
	held    chan struct{} // a save is waiting
	release chan struct{}
}

func (h *heldState) Save(ctx context.Context, b []byte) error {
	if h.hold.Load() {
		select {
		case h.held <- struct{}{}:
		default:
		}
		select {
		case <-h.release:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return h.StateStore.Save(ctx, b)
}

// The stage goes on reading its input and publishing alert changes while a save
// of its state waits for the store: the save runs beside the loop, not in it. Once
// the store answers, the state is saved, and the stop's final save follows it.
func TestAlertsGoOnWhileASaveWaits(t *testing.T) {
	h := newHarness(t)
	ctx := context.Background()
	cfg := loginConfig(t)
	store, err := streams.ObjectStore(ctx, h.js, jetstream.ObjectStoreConfig{Bucket: StateBucket, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	state := &heldState{StateStore: objectState{store, replicaEnded(cfg.SnapshotInterval)}, held: make(chan struct{}, 1), release: make(chan struct{})}
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(state.release) }) }
	defer release()
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	ready, done := make(chan struct{}), make(chan error, 1)
	go func() {
		done <- RunWith(runCtx, cfg, Deps{NATS: h.nc, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Registerer: prometheus.NewRegistry(), Ready: func() { close(ready) }}, state)
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("the stage stopped: %v", err)
	}
	state.hold.Store(true)
	select {
	case <-state.held:
	case <-time.After(30 * time.Second):
		t.Fatal("no save began within 30 s of snapshot_interval 100ms")
	}

	base := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	for i := range 5 {
		h.publish("login.failed", base.Add(time.Duration(i)*time.Second), `{"user":"u"}`)
	}
	h.publish("login.failed", base.Add(30*time.Second), `{"user":"late"}`) // closes the windows ending at 10 and 20 s
	poll.Until(t, 30*time.Second, func() error {
		if n := count(h.alertsInStream(), alerts.Firing, "user")["u"]; n != 1 {
			return fmt.Errorf("%d firing alerts for u while the save waits; want 1", n)
		}
		return nil
	})

	state.hold.Store(false)
	before, err := store.GetInfo(ctx, "state")
	if err != nil {
		t.Fatal(err)
	}
	release()
	savedSince(t, store, before.NUID, "the state is not saved again after the store answered")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// armedState is a StateStore that arms f at the stage's first read of its state:
// the read's first answer passes, what the stage sends after it is held.
type armedState struct {
	StateStore
	f    *testnet.Freezer
	once sync.Once
}

func (a *armedState) Load(ctx context.Context) ([]byte, error) {
	a.once.Do(a.f.HoldAfterAnswer)
	return a.StateStore.Load(ctx)
}

// A stage whose restore goes unanswered for longer than a request's timeout (a
// NATS server just restarted) restores again rather than stopping, and runs once
// JetStream answers: its saved state read, its rules firing.
func TestRestoreWhileJetStreamSilent(t *testing.T) {
	ctx := context.Background()
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, nc: nc, js: js}
	cfg := loginConfig(t)
	deps := func(nc *nats.Conn, ready func()) Deps {
		return Deps{NATS: nc, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Registerer: prometheus.NewRegistry(), Ready: ready}
	}
	storeOf := func(js jetstream.JetStream) StateStore {
		store, err := streams.ObjectStore(ctx, js, jetstream.ObjectStoreConfig{Bucket: StateBucket, Storage: jetstream.FileStorage})
		if err != nil {
			t.Fatal(err)
		}
		return objectState{store, replicaEnded(cfg.SnapshotInterval)}
	}
	// A first run saves a state, for the second to read.
	base := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	h.publish("login.failed", base, `{"user":"u"}`)
	runCtx, cancel := context.WithCancel(ctx)
	if err := RunWith(runCtx, cfg, deps(nc, cancel), storeOf(js)); err != nil {
		t.Fatal(err)
	}

	fr := testnet.NewFreezer(t, strings.TrimPrefix(ns.URL, "nats://"))
	pnc, err := nats.Connect("nats://"+fr.Addr(), nats.MaxReconnects(-1))
	if err != nil {
		t.Fatal(err)
	}
	defer pnc.Close()
	pjs, err := jetstream.New(pnc)
	if err != nil {
		t.Fatal(err)
	}
	state := &armedState{StateStore: storeOf(pjs), f: fr}
	runCtx, cancel = context.WithCancel(ctx)
	defer cancel()
	ready, done := make(chan struct{}), make(chan error, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { done <- RunWith(runCtx, cfg, deps(pnc, func() { close(ready) }), state) })
	// Longer than a request's timeout (5 s): the state's read goes unanswered.
	select {
	case err := <-done:
		t.Fatalf("the stage stopped while JetStream was silent: %v", err)
	case <-time.After(6 * time.Second):
	}
	if fr.Held() == 0 {
		t.Fatal("nothing the stage sent was held: the fault did not happen")
	}
	fr.Release()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("the stage stopped: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("the stage was not ready within a minute of JetStream answering again")
	}
	// The first run's event counts: four more fire the rule (five in a window).
	for i := 1; i < 5; i++ {
		h.publish("login.failed", base.Add(time.Duration(i)*time.Second), `{"user":"u"}`)
	}
	h.publish("login.failed", base.Add(30*time.Second), `{"user":"late"}`) // closes the windows
	poll.Until(t, 30*time.Second, func() error {
		if n := count(h.alertsInStream(), alerts.Firing, "user")["u"]; n != 1 {
			return fmt.Errorf("%d firing alerts for u; want 1", n)
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
