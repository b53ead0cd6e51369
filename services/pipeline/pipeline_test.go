package pipeline

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/schemas/keyed"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/services/sink"
	"github.com/sluicehq/sluice/streams"
)

var testLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

type fixture struct {
	nc *nats.Conn
	js jetstream.JetStream
	ch driver.Conn
	// shards, set for a ClickHouse cluster: the workers write through them, and
	// ch reads the Distributed tables.
	shards *chconn.Shards
}

func setup(t *testing.T) *fixture {
	t.Helper()
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	_, ch := chtest.Database(t, chtest.Start(t))
	return &fixture{nc: nc, js: js, ch: ch}
}

// testConfig has small batches, frequent snapshots, a short lease and one match
// rule (type "test.refunded"), not watched.
func testConfig(t *testing.T, replica string) Config {
	t.Helper()
	cfg, _ := configFrom(t, replica, `
rules:
  - name: refund
    kind: match
    filter: type == "test.refunded"
`)
	cfg.Alert.ConfigPath = ""
	return cfg
}

// configFrom is a test config (small batches, frequent snapshots, a short lease)
// with yaml as SLUICE_CONFIG, watched for changes at the returned path.
func configFrom(t *testing.T, replica, yaml string) (Config, string) {
	t.Helper()
	cfg := DefaultConfig()
	cfg.MaxRows, cfg.FlushInterval, cfg.SnapshotInterval = 100, 20*time.Millisecond, 100*time.Millisecond
	cfg.Replica, cfg.LeaseTTL = replica, time.Second
	path := t.TempDir() + "/sluice.yaml"
	if err := os.WriteFile(path, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := configfile.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Alert, err = alert.LoadConfig(f); err != nil {
		t.Fatal(err)
	}
	if cfg.Ingest, err = dedup.LoadIngest(f); err != nil {
		t.Fatal(err)
	}
	return cfg, path
}

// start runs the stage; the returned func stops it and waits.
func (f *fixture) start(t *testing.T, cfg Config) func() {
	t.Helper()
	return f.startWith(t, cfg, &telemetry.Readiness{})
}

// startWith is start reporting readiness to ready.
func (f *fixture) startWith(t *testing.T, cfg Config, ready *telemetry.Readiness) func() {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, cfg, Deps{NATS: f.nc, ClickHouse: f.ch, Shards: f.shards, Logger: testLog, Ready: ready})
	}()
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
	t.Cleanup(stop)
	return stop
}

// input publishes n events to EVENTS, acked: every 10th repeats the one before it
// (another message, same id), every 25th is invalid, every 7th is an
// test.refunded. It returns how many unique valid events, invalid ones and
// refunds it published.
func (f *fixture) input(t *testing.T, from, n int) (unique, invalid, refunds int) {
	t.Helper()
	ctx := context.Background()
	at := time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC)
	for i := from; i < from+n; i++ {
		var body string
		switch {
		case i%25 == 0:
			body = fmt.Sprintf(`{"id":%d,"source":"shop"}`, i) // id is not a string
			invalid++
		case i%10 == 0:
			body = fmt.Sprintf(`{"id":"o-%d","source":"shop","type":"test.created","time":%q,"data":{"n":%d}}`, i-1, at.Format(time.RFC3339), i-1)
		default:
			typ := "test.created"
			if i%7 == 0 {
				typ = "test.refunded"
				refunds++
			}
			body = fmt.Sprintf(`{"id":"o-%d","source":"shop","type":%q,"time":%q,"data":{"n":%d}}`, i, typ, at.Add(time.Duration(i)*time.Millisecond).Format(time.RFC3339Nano), i)
			unique++
		}
		if _, err := f.js.Publish(ctx, "events.shop.order", []byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	return unique, invalid, refunds
}

func (f *fixture) counts() (rows, keys uint64, err error) {
	err = f.ch.QueryRow(context.Background(), "SELECT count(), uniqExact(key) FROM events").Scan(&rows, &keys)
	return rows, keys, err
}

// streamCount is how many messages stream holds on subject.
func (f *fixture) streamCount(t *testing.T, stream, subject string) uint64 {
	t.Helper()
	s, err := f.js.Stream(context.Background(), stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background(), jetstream.WithSubjectFilter(subject))
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, c := range info.State.Subjects {
		n += c
	}
	return n
}

// keyedEntry is an event the keying step copied into PARTITIONS, and the
// partition its subject names.
type keyedEntry struct {
	partition int
	keyed.Entry
}

// partitioned reads every event PARTITIONS holds: each entry of each envelope.
// Every message in it must be an envelope.
func (f *fixture) partitioned(t *testing.T) []keyedEntry {
	t.Helper()
	ctx := context.Background()
	total := f.streamCount(t, streams.Partitions, "partitioned.>")
	cons, err := f.js.OrderedConsumer(ctx, streams.Partitions, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	var out []keyedEntry
	for range total {
		m, err := cons.Next(jetstream.FetchMaxWait(10 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		p, token, err := partition.Parse(m.Subject())
		if err != nil || token != keyed.Token || m.Headers().Get(keyed.HeaderEnvelope) != keyed.Version {
			t.Fatalf("%s in PARTITIONS is not an envelope (%v)", m.Subject(), err)
		}
		n := 0
		if err := keyed.Decode(m.Data(), func(_ int, x keyed.Entry) bool {
			out = append(out, keyedEntry{p, x})
			n++
			return true
		}); err != nil {
			t.Fatal(err)
		}
		if got := m.Headers().Get(keyed.HeaderCount); got != strconv.Itoa(n) {
			t.Fatalf("an envelope of %d events says %s", n, got)
		}
	}
	return out
}

// waitFor polls until the events table holds want rows and DLQ and ALERTS the
// dead letters and alerts expected.
func (f *fixture) waitFor(t *testing.T, rows, dead, alerts int) {
	t.Helper()
	poll.Until(t, time.Minute, func() error {
		r, _, err := f.counts()
		if err != nil {
			return err
		}
		d := f.streamCount(t, streams.DLQ, "dlq.pipeline")
		a := f.streamCount(t, streams.Alerts, "alerts.>")
		if r < uint64(rows) || d < uint64(dead) || a < uint64(alerts) {
			return fmt.Errorf("%d/%d rows, %d/%d dead letters, %d/%d alerts", r, rows, d, dead, a, alerts)
		}
		return nil
	})
}

func (f *fixture) check(t *testing.T, rows, dead, alerts int) {
	t.Helper()
	r, k, err := f.counts()
	if err != nil {
		t.Fatal(err)
	}
	d := f.streamCount(t, streams.DLQ, "dlq.pipeline")
	a := f.streamCount(t, streams.Alerts, "alerts.>")
	if r != uint64(rows) || k != uint64(rows) || d != uint64(dead) || a != uint64(alerts) {
		t.Fatalf("events: %d rows, %d keys; DLQ %d; ALERTS %d; want %d rows and keys, %d dead letters, %d alerts", r, k, d, a, rows, dead, alerts)
	}
}

// Every unique valid event is inserted once, repeats are dropped, invalid input is
// dead-lettered with its reason, matching events fire once each.
func TestPipeline(t *testing.T) {
	f := setup(t)
	unique, invalid, refunds := f.input(t, 1, 2000)
	f.start(t, testConfig(t, "a"))
	f.waitFor(t, unique, invalid, refunds)
	var reason string
	s, _ := f.js.Stream(context.Background(), streams.DLQ)
	m, err := s.GetLastMsgForSubject(context.Background(), "dlq.pipeline")
	if err != nil {
		t.Fatal(err)
	}
	reason = m.Header.Get("Sluice-Reason")
	t.Log(reason)
	f.check(t, unique, invalid, refunds)
	if want := `attribute "id" must be a string, got a number`; !strings.Contains(reason, want) {
		t.Fatalf("reason %q lacks %q", reason, want)
	}
}

// At low load a batch does not wait for rows: with a flush interval of an hour and
// batches of up to 1,000, each event published alone is stored, because a
// partition hands its batch on once nothing of its own is in flight and no input
// waits. Through one partition and through the keying step into four.
func TestBatchGoesOnWhenIdle(t *testing.T) {
	for _, partitions := range []int{1, 4} {
		t.Run(fmt.Sprint(partitions, " partitions"), func(t *testing.T) {
			f := setup(t)
			cfg := testConfig(t, "a")
			cfg.FlushInterval, cfg.MaxRows, cfg.Partitions = time.Hour, 1000, partitions
			f.start(t, cfg)
			for i := 1; i <= 5; i++ {
				u, d, r := f.input(t, i, 1)
				f.waitFor(t, i, d, r)
				if u != 1 {
					t.Fatalf("event %d is not a unique valid one", i)
				}
			}
			f.check(t, 5, 0, 0)
		})
	}
}

// A restart from an older snapshot (as after a crash: output stored, state not
// saved since) decides the input after it again and stores nothing twice: rows
// by stream_seq and key, dead letters and alerts by Nats-Msg-Id. The DLQ and ALERTS
// duplicate windows are cut to 1 s so that only the stage's own checks hold.
func TestRestartFromOlderSnapshot(t *testing.T) {
	f := setup(t)
	ctx := context.Background()
	for _, name := range []string{streams.DLQ, streams.Alerts} {
		s, err := f.js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		cfg := s.CachedInfo().Config
		cfg.Duplicates = time.Second
		if _, err := f.js.UpdateStream(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	cfg := testConfig(t, "a")
	u1, i1, r1 := f.input(t, 1, 1000)
	stop := f.start(t, cfg)
	f.waitFor(t, u1, i1, r1)
	stop()
	store, kv := f.buckets(t)
	claim := func() (jetstream.KeyValueEntry, string) { return f.claimState(t, kv) }
	_, name := claim()
	old, err := store.GetBytes(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	// With the checkpoint files it names, as a backup of a state holds them: later
	// saves delete the files no kept state names (the last two).
	files := map[string][]byte{}
	infos, err := store.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, info := range infos {
		if strings.HasPrefix(info.Name, "keys.") || strings.HasPrefix(info.Name, "alert.") {
			if files[info.Name], err = store.GetBytes(ctx, info.Name); err != nil {
				t.Fatal(err)
			}
		}
	}
	u2, i2, r2 := f.input(t, 1001, 1000)
	stop = f.start(t, cfg)
	f.waitFor(t, u1+u2, i1+i2, r1+r2)
	stop()
	f.check(t, u1+u2, i1+i2, r1+r2)

	// Back to the state after the first 1,000: the second 1,000 come again.
	if _, err := store.PutBytes(ctx, "state.old", old); err != nil {
		t.Fatal(err)
	}
	putBack := 0
	for name, b := range files {
		if _, err := store.GetInfo(ctx, name); errors.Is(err, jetstream.ErrObjectNotFound) {
			if _, err := store.PutBytes(ctx, name, b); err != nil {
				t.Fatal(err)
			}
			putBack++
		} else if err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("%d checkpoint files were there with the older state; %d of them put back", len(files), putBack)
	e, _ := claim()
	if _, err := kv.Update(ctx, "partition.0", []byte(`{"worker":"","state":"state.old"}`), e.Revision()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // past the shortened duplicate windows
	u3, i3, r3 := f.input(t, 2001, 500)
	f.start(t, cfg)
	f.waitFor(t, u1+u2+u3, i1+i2+i3, r1+r2+r3)
	f.check(t, u1+u2+u3, i1+i2+i3, r1+r2+r3)
}

// The state a claim points at cannot be read (deleted here; a corrupt object reads
// the same way): the next run restores the one before it, kept for this, and goes on
// from there; nothing is lost or stored twice, and a run's first save prunes the
// partition's states down to two.
func TestUnreadableStateFallsBack(t *testing.T) {
	f := setup(t)
	ctx := context.Background()
	cfg := testConfig(t, "a")
	u1, i1, r1 := f.input(t, 1, 1000)
	stop := f.start(t, cfg)
	f.waitFor(t, u1, i1, r1)
	stop()
	store, kv := f.buckets(t)
	_, state := f.claimState(t, kv)
	if err := store.Delete(ctx, state); err != nil {
		t.Fatal(err)
	}
	u2, i2, r2 := f.input(t, 1001, 1000)
	stop = f.start(t, cfg)
	f.waitFor(t, u1+u2, i1+i2, r1+r2)
	// The run's saves prune. (A save that times out or is cut short by a stop may
	// leave its object until the next one succeeds: poll while the run saves.)
	poll.Until(t, time.Minute, func() error {
		infos, err := store.List(ctx)
		if err != nil {
			return err
		}
		var states []string
		for _, info := range infos {
			if strings.HasPrefix(info.Name, "state.0.") {
				states = append(states, info.Name)
			}
		}
		if len(states) > 2 {
			return fmt.Errorf("%d states kept: %v", len(states), states)
		}
		return nil
	})
	stop()
	f.check(t, u1+u2, i1+i2, r1+r2)
}

// buckets opens the state object store and the claims' KV bucket.
func (f *fixture) buckets(t *testing.T) (jetstream.ObjectStore, jetstream.KeyValue) {
	t.Helper()
	store, err := f.js.ObjectStore(context.Background(), Bucket)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := f.js.KeyValue(context.Background(), Bucket)
	if err != nil {
		t.Fatal(err)
	}
	return store, kv
}

// claimState is the claim of the only partition and the state it points at.
func (f *fixture) claimState(t *testing.T, kv jetstream.KeyValue) (jetstream.KeyValueEntry, string) {
	t.Helper()
	e, err := kv.Get(context.Background(), "partition.0")
	if err != nil {
		t.Fatal(err)
	}
	var v struct{ State string }
	if err := json.Unmarshal(e.Value(), &v); err != nil || v.State == "" {
		t.Fatalf("claim %s: %v", e.Value(), err)
	}
	return e, v.State
}

// Two replicas at once: one runs, the other takes over when it stops; nothing is
// stored twice.
func TestTwoReplicas(t *testing.T) {
	f := setup(t)
	u1, i1, r1 := f.input(t, 1, 1000)
	stopA := f.start(t, testConfig(t, "a"))
	f.waitFor(t, u1, i1, r1)
	f.start(t, testConfig(t, "b"))
	u2, i2, r2 := f.input(t, 1001, 1000)
	stopA()
	u3, i3, r3 := f.input(t, 2001, 1000)
	f.waitFor(t, u1+u2+u3, i1+i2+i3, r1+r2+r3)
	f.check(t, u1+u2+u3, i1+i2+i3, r1+r2+r3)
}

// alertsOf returns the rules and statuses of ALERTS' messages, in order.
func (f *fixture) alertsOf(t *testing.T) []string {
	t.Helper()
	s, err := f.js.Stream(context.Background(), streams.Alerts)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for seq := uint64(1); seq <= s.CachedInfo().State.LastSeq; seq++ {
		m, err := s.GetMsg(context.Background(), seq)
		if err != nil {
			t.Fatal(err)
		}
		a, err := alerts.Decode(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, a.Rule+":"+a.Status)
	}
	return out
}

func (f *fixture) beat(t *testing.T, id, device string) {
	t.Helper()
	body := fmt.Sprintf(`{"id":%q,"source":"iot","type":"beat","time":%q,"data":{"device":%q}}`, id, time.Now().UTC().Format(time.RFC3339Nano), device)
	if _, err := f.js.Publish(context.Background(), "events.iot.beat", []byte(body)); err != nil {
		t.Fatal(err)
	}
}

// An absence rule fires when events stop (event time moves on with the clock once
// the input is idle), and a changed config reloads the rules without a restart.
func TestIdleAndReload(t *testing.T) {
	f := setup(t)
	cfg, path := configFrom(t, "a", `
alert: {idle_after: 300ms, reload_interval: 50ms}
rules:
  - name: silent
    kind: absence
    filter: type == "beat"
    group_by: [data.device]
    for: 2s
    allowed_lateness: 100ms
`)
	f.start(t, cfg)
	f.beat(t, "b1", "d1")
	poll.Until(t, 15*time.Second, func() error {
		if got := f.alertsOf(t); len(got) != 1 || got[0] != "silent:firing" {
			return fmt.Errorf("alerts %v", got)
		}
		return nil
	})
	if err := os.WriteFile(path, []byte(`
alert: {idle_after: 300ms, reload_interval: 50ms}
rules:
  - name: every-beat
    filter: type == "beat"
`), 0o644); err != nil {
		t.Fatal(err)
	}
	// The removed rule resolves what it had firing; the new one matches the next beat.
	poll.Until(t, 15*time.Second, func() error {
		f.beat(t, fmt.Sprintf("b-%d", time.Now().UnixNano()), "d1")
		got := f.alertsOf(t)
		if !slices.Contains(got, "silent:resolved") || !slices.Contains(got, "every-beat:firing") {
			return fmt.Errorf("alerts %v", got)
		}
		return nil
	})
}

// Partitioned: workers joining and leaving share four partitions; the keying step
// divides EVENTS by key, so repeats meet in one partition and are dropped there;
// nothing is stored twice or lost.
func TestPartitionedWorkers(t *testing.T) {
	f := setup(t)
	worker := func(name string) Config {
		cfg, _ := configFrom(t, name, "")
		cfg.Partitions, cfg.LeaseTTL = 4, 2*time.Second
		return cfg
	}
	u1, i1, _ := f.input(t, 1, 1000)
	stopA := f.start(t, worker("a"))
	f.waitFor(t, u1, i1, 0)
	f.start(t, worker("b"))
	u2, i2, _ := f.input(t, 1001, 1000)
	f.start(t, worker("c"))
	u3, i3, _ := f.input(t, 2001, 1000)
	stopA()
	u4, i4, _ := f.input(t, 3001, 1000)
	f.waitFor(t, u1+u2+u3+u4, i1+i2+i3+i4, 0)
	f.check(t, u1+u2+u3+u4, i1+i2+i3+i4, 0)
	// Every valid input reached PARTITIONS, repeats included. A worker stopping
	// mid-batch leaves its keying step's unacked input to be copied again by another
	// (dedup drops the second copy, as the exact counts above show), so at least once.
	// Each in the partition of its key.
	copied := f.partitioned(t)
	if got, want := len(copied), 4000-(i1+i2+i3+i4); got < want {
		t.Fatalf("PARTITIONS holds %d events, want at least %d", got, want)
	}
	for _, x := range copied {
		if p := partition.Of(x.Key, 4); p != x.partition {
			t.Fatalf("event %s (key %s) in partition %d, its key's is %d", x.Data, x.Key, x.partition, p)
		}
	}
	// Each partition is owned by one of the workers still running.
	kv, err := f.js.KeyValue(context.Background(), Bucket)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 30*time.Second, func() error {
		for p := range 4 {
			e, err := kv.Get(context.Background(), fmt.Sprintf("partition.%d", p))
			if err != nil {
				return err
			}
			if !strings.Contains(string(e.Value()), `"worker":"b"`) && !strings.Contains(string(e.Value()), `"worker":"c"`) {
				return fmt.Errorf("partition %d: %s", p, e.Value())
			}
		}
		return nil
	})
}

// Batches of raw JSON across partitions: the keying step copies each element of a
// batch message to the partition of its own key, so repeats of an element meet its
// first occurrence whichever batch they came in; a bad element is dead-lettered
// alone; every unique event lands once.
func TestPartitionedBatches(t *testing.T) {
	f := setup(t)
	worker := func(name string) Config {
		cfg, _ := configFrom(t, name, `
ingest:
  mappings:
    - subjects: events.logs.>
      envelope: raw
      batch: ndjson
      id: {field: request_id}
      time: {field: at, format: unix}
`)
		cfg.Partitions, cfg.LeaseTTL = 4, 2*time.Second
		return cfg
	}
	ctx := context.Background()
	valid, dead := map[string]bool{}, 0
	publish := func(lines []string) {
		t.Helper()
		if _, err := f.js.Publish(ctx, "events.logs.api", []byte(strings.Join(lines, "\n"))); err != nil {
			t.Fatal(err)
		}
	}
	for b := range 50 {
		var lines []string
		for i := range 20 {
			id := fmt.Sprintf("req-%d", b*15+i) // the last 5 of a batch are the next one's first 5
			if i == 13 {
				lines = append(lines, fmt.Sprintf(`{"request_id":%q,"at":"noon"}`, id))
				dead++
				continue
			}
			valid[id] = true
			lines = append(lines, fmt.Sprintf(`{"request_id":%q,"at":%d.25,"route":"/v1/items","status":200}`, id, 1_764_000_000+b*15+i))
		}
		publish(lines)
		if b == 20 {
			publish(lines) // a batch again, whole: its bad line is another dead letter
			dead++
		}
	}
	rows := len(valid)
	f.start(t, worker("a"))
	f.start(t, worker("b"))
	f.waitFor(t, rows, dead, 0)
	f.check(t, rows, dead, 0)
	// The elements of a batch message were copied one by one, each to its key's
	// partition: a batch's elements are spread over the partitions.
	spread := map[uint64]map[int]bool{}
	for _, x := range f.partitioned(t) {
		if x.Element < 0 {
			t.Fatalf("a copy of a whole batch message: %s", x.Data)
		}
		if p := partition.Of(x.Key, 4); p != x.partition {
			t.Fatalf("element %d of EVENTS %d (key %s) in partition %d, its key's is %d", x.Element, x.Seq, x.Key, x.partition, p)
		}
		if spread[x.Seq] == nil {
			spread[x.Seq] = map[int]bool{}
		}
		spread[x.Seq][x.partition] = true
	}
	if len(spread) != 51 {
		t.Fatalf("elements of %d EVENTS messages in PARTITIONS, want 51", len(spread))
	}
	for seq, ps := range spread {
		if len(ps) < 2 {
			t.Fatalf("the elements of EVENTS %d all went to partition(s) %v", seq, ps)
		}
	}
}

// setupOwn is setup for a test that stops or proxies its ClickHouse server: the
// server and its database's settings are returned too.
func setupOwn(t *testing.T) (*fixture, *chserver.Server, settings.ClickHouse) {
	t.Helper()
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	srv := chtest.Start(t)
	s, ch := chtest.Database(t, srv)
	return &fixture{nc: nc, js: js, ch: ch}, srv, s
}

// runOn runs a worker with cfg writing through ch until the test ends, and returns
// its metrics' registry.
func (f *fixture) runOn(t *testing.T, cfg Config, ch driver.Conn, ready *telemetry.Readiness) *prometheus.Registry {
	t.Helper()
	reg := prometheus.NewRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, cfg, Deps{NATS: f.nc, ClickHouse: ch, Logger: testLog, Ready: ready, Registerer: reg})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
	return reg
}

// pause stops srv (SIGSTOP: it takes connections and never answers) and returns
// what resumes it (SIGCONT); the test's end resumes it if the test did not.
func pause(t *testing.T, srv *chserver.Server) (resume func()) {
	t.Helper()
	if err := srv.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	t.Cleanup(func() {
		if !resumed {
			_ = srv.Signal(syscall.SIGCONT)
		}
	})
	return func() {
		t.Helper()
		resumed = true
		if err := srv.Signal(syscall.SIGCONT); err != nil {
			t.Fatal(err)
		}
	}
}

// The watchdog: ClickHouse hung (SIGSTOP: it takes connections and never answers)
// while input waits. After stall_after the partition is reported stalled on
// /readyz and in sluice_pipeline_stalled; when ClickHouse resumes (SIGCONT) both
// clear, and every event lands once.
func TestWatchdogStalledPartition(t *testing.T) {
	f, srv, _ := setupOwn(t)
	cfg := testConfig(t, "a")
	cfg.StallAfter, cfg.InsertTimeout = time.Second, 500*time.Millisecond
	ready := &telemetry.Readiness{}
	reg := f.runOn(t, cfg, f.ch, ready)
	gauge := func(name string) float64 { return metricValue(reg, name) }
	stalled := func() float64 { return gauge("sluice_pipeline_stalled") }
	// savedSeq is the EVENTS sequence of the last state saved.
	savedSeq := func() float64 { return gauge("sluice_pipeline_snapshot_sequence") }
	u1, i1, r1 := f.input(t, 1, 200)
	f.waitFor(t, u1, i1, r1)
	if stalled() != 0 || ready.Check() != nil {
		t.Fatalf("stalled %v, ready %v before any fault", stalled(), ready.Check())
	}
	poll.Until(t, time.Minute, func() error {
		if s := savedSeq(); s != 200 {
			return fmt.Errorf("state saved at sequence %v, want 200", s)
		}
		return nil
	})
	resume := pause(t, srv)
	u2, i2, r2 := f.input(t, 201, 200)
	poll.Until(t, time.Minute, func() error {
		err := ready.Check()
		if stalled() != 1 || err == nil || !strings.Contains(err.Error(), "partition 0 holds") {
			return fmt.Errorf("stalled %v, ready %v", stalled(), err)
		}
		return nil
	})
	// The second input is decided (states are captured past it every 100 ms) but
	// not stored: no state saved may cover it, or a crash now would lose it.
	if s := savedSeq(); s != 200 {
		t.Fatalf("while ClickHouse is stopped a state was saved at sequence %v, past the last stored (200)", s)
	}
	resume()
	f.waitFor(t, u1+u2, i1+i2, r1+r2)
	poll.Until(t, time.Minute, func() error {
		if err := ready.Check(); stalled() != 0 || err != nil {
			return fmt.Errorf("stalled %v, ready %v after ClickHouse resumed", stalled(), err)
		}
		if s := savedSeq(); s != 400 {
			return fmt.Errorf("state saved at sequence %v after ClickHouse resumed, want 400", s)
		}
		return nil
	})
	f.check(t, u1+u2, i1+i2, r1+r2)
}

// A batch decided in parts while it fills is stored when the worker stops before it
// is cut. ClickHouse is stopped (SIGSTOP) while one insert runs; the input after it
// is prepared and decided in parts into the next batch, which is not cut (no flush
// interval, idle time or state save comes in the test's time); the worker is
// stopped and ClickHouse resumes. The stop hands the open batch to the writer before
// it saves the state, so the next worker finds every event stored once (a state
// saved past an open batch dropped at the stop would lose its events).
func TestStopWhileBatchFills(t *testing.T) {
	f, srv, _ := setupOwn(t)
	cfg := testConfig(t, "a")
	cfg.FlushInterval, cfg.SnapshotInterval, cfg.Alert.IdleAfter = time.Hour, time.Hour, time.Hour
	cfg.LeaseTTL = 6 * time.Second // the stop stores within a third of it
	reg := prometheus.NewRegistry()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Run(ctx, cfg, Deps{NATS: f.nc, ClickHouse: f.ch, Logger: testLog, Ready: &telemetry.Readiness{}, Registerer: reg})
	}()
	stopped := false
	defer func() {
		if !stopped {
			cancel()
			<-done
		}
	}()
	u1, i1, r1 := f.input(t, 1, 50)
	f.waitFor(t, u1, i1, r1)
	repeats := metricValue(reg, "sluice_pipeline_duplicates_total")
	resume := pause(t, srv)
	// 51..140 ends with a repeat (140 repeats 139): once every repeat is counted,
	// all of the input is decided.
	u2, i2, r2 := f.input(t, 51, 90)
	for i := 51; i <= 140; i++ {
		if i%10 == 0 && i%25 != 0 {
			repeats++
		}
	}
	poll.Until(t, time.Minute, func() error {
		if got := metricValue(reg, "sluice_pipeline_duplicates_total"); got != repeats {
			return fmt.Errorf("%v repeats decided, want %v", got, repeats)
		}
		if parts := metricValue(reg, "sluice_pipeline_batch_parts_total"); parts < 1 {
			return fmt.Errorf("%v batch parts decided, want some", parts)
		}
		return nil
	})
	cancel()
	stopped = true
	resume()
	if err := <-done; err != nil {
		t.Fatalf("the worker's stop: %v", err)
	}
	f.runOn(t, testConfig(t, "b"), f.ch, &telemetry.Readiness{})
	f.waitFor(t, u1+u2, i1+i2, r1+r2)
	f.check(t, u1+u2, i1+i2, r1+r2)
}

// Alert rules across partitions: workers sharing four partitions hand the events
// their rules match, and their progress, to RULES, and the one alert runner
// (claimed by one worker, handed over when it stops) evaluates them. The alert
// changes — match alerts and a per-user threshold whose users cross partitions —
// are, by id, those of one engine fed the input in order (the oracle), each stored
// once. The rules' allowed lateness covers the disorder the keying step makes when
// two workers copy the input at once (docs/scaling.md).
func TestPartitionedRules(t *testing.T) {
	want := ruleOracle(t, ruleYAML, 1240)
	f := setup(t)
	start := func(name string) func() {
		cfg, _ := configFrom(t, name, ruleYAML)
		cfg.Alert.ConfigPath = ""
		cfg.Partitions, cfg.LeaseTTL = 4, 2*time.Second
		return f.start(t, cfg)
	}
	publish := func(from, to int) { f.publishRuleInput(t, from, to) }
	stopA := start("a")
	start("b")
	publish(0, 600)
	f.waitFor(t, 600, 0, 0)
	stopA() // hands its partitions, and the alert runner if it held it, to b
	start("c")
	publish(600, 1200)
	f.waitFor(t, 1200, 0, 0)
	publish(1200, 1240)
	f.waitFor(t, 1240, 0, 0)
	f.checkAlertIDs(t, "4 partitions", want)
}

// An event dated years ahead of its arrival (a producer's clock gone wrong) is
// dead-lettered, saying why, and does not move the rules' event time: the input
// after it gives the alerts one engine gives without it. Before, it moved the
// watermark to 2099 and every later event was late: no alert fired.
func TestEventAheadOfItsArrival(t *testing.T) {
	want := ruleOracle(t, ruleYAML, 1240)
	f := setup(t)
	cfg, _ := configFrom(t, "a", ruleYAML)
	cfg.Alert.ConfigPath = ""
	f.start(t, cfg)
	ahead := `{"id":"ahead","source":"shop","type":"login.failed","time":"2099-01-01T00:00:00Z","data":{"user":"u1","n":-1}}`
	if _, err := f.js.Publish(context.Background(), "events.shop.order", []byte(ahead)); err != nil {
		t.Fatal(err)
	}
	f.publishRuleInput(t, 0, 1240)
	f.waitFor(t, 1240, 0, 0)
	f.checkAlertIDs(t, "after an event years ahead", want)
	f.check(t, 1240, 1, len(want))
	s, err := f.js.Stream(context.Background(), streams.DLQ)
	if err != nil {
		t.Fatal(err)
	}
	m, err := s.GetLastMsgForSubject(context.Background(), "dlq.pipeline")
	if err != nil {
		t.Fatal(err)
	}
	if reason := m.Header.Get("Sluice-Reason"); !strings.Contains(reason, "time 2099-01-01T00:00:00Z is") || !strings.Contains(reason, "ahead of when the event was received") {
		t.Fatalf("dead letter's reason %q", reason)
	}
}

// A restart carries the alert windows on, from the state's checkpoint and from
// the binary and JSON forms earlier releases saved (the second and third restarts'
// states are rewritten into them). After each stop the input the state covers is purged from EVENTS, so
// only the state can hold the windows: the alert changes must be, by id, those of
// one engine fed the whole input.
//
// With alert.store disk and two groups in memory, most of the seven users' groups
// are on disk when a window is evaluated and when the state is saved.
func TestAlertWindowsAcrossRestarts(t *testing.T) {
	want := ruleOracle(t, ruleYAML, 1240)
	for _, store := range []string{"memory", "disk"} {
		t.Run(store, func(t *testing.T) {
			yaml := strings.Replace(ruleYAML, "alert:\n", "alert:\n  store: "+store+"\n  hot_groups: 2\n", 1)
			testAlertWindowsAcrossRestarts(t, yaml, store == "disk", want)
		})
	}
}

func testAlertWindowsAcrossRestarts(t *testing.T, yaml string, onDisk bool, want []string) {
	f := setup(t)
	ctx := context.Background()
	cfg, _ := configFrom(t, "a", yaml)
	cfg.Alert.ConfigPath = ""
	cfg.DataDir = t.TempDir()
	stopAt := func(legacy string) {
		store, kv := f.buckets(t)
		e, name := f.claimState(t, kv)
		b, err := store.GetBytes(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		n := binary.BigEndian.Uint32(b)
		var snap snapshot
		if err := json.Unmarshal(b[4:4+n], &snap); err != nil {
			t.Fatal(err)
		}
		if snap.AlertCheckpoint == nil || snap.AlertBinary != nil || snap.Alert != nil {
			t.Fatalf("the state holds the windows in no checkpoint (%d bytes of binary)", len(snap.AlertBinary))
		}
		s, err := f.js.Stream(ctx, streams.Events)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Purge(ctx, jetstream.WithPurgeSequence(snap.Seq+1)); err != nil {
			t.Fatal(err)
		}
		if legacy == "" {
			return
		}
		// The state rewritten as an earlier release saved it: the windows in the
		// state itself, in binary or JSON.
		log := slog.New(slog.DiscardHandler)
		files := partition.NewSharedFiles(store, "alert", func(string) bool { return true }, t.TempDir(), time.Hour, log)
		cp := alert.NewCheckpoints(files, filepath.Join(t.TempDir(), "segments"), log)
		eng, err := cp.Open(ctx, alert.DefaultSettings(), cfg.Alert.Rules, snap.AlertCheckpoint, nil, nil, "")
		if err != nil {
			t.Fatal(err)
		}
		snap.AlertCheckpoint = nil
		if legacy == "json" {
			snap.Alert = eng.State()
		} else if snap.AlertBinary, err = eng.State().MarshalBinary(); err != nil {
			t.Fatal(err)
		}
		head, err := json.Marshal(snap)
		if err != nil {
			t.Fatal(err)
		}
		old := append(binary.BigEndian.AppendUint32(nil, uint32(len(head))), head...)
		if _, err := store.PutBytes(ctx, "state.legacy", append(old, b[4+n:]...)); err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Update(ctx, "partition.0", []byte(`{"worker":"","state":"state.legacy"}`), e.Revision()); err != nil {
			t.Fatal(err)
		}
	}
	for _, phase := range []struct {
		from, to int
		legacy   string
	}{{0, 300, ""}, {300, 600, "json"}, {600, 870, "binary"}, {870, 1240, ""}} {
		stop := f.start(t, cfg)
		f.publishRuleInput(t, phase.from, phase.to)
		f.waitFor(t, phase.to, 0, 0)
		if dirs, _ := filepath.Glob(filepath.Join(cfg.DataDir, "pipeline", "alert", "groups-*")); onDisk != (len(dirs) == 1) {
			t.Fatalf("alert groups on disk in %q, want them there: %v", dirs, onDisk)
		}
		stop()
		if phase.to < 1240 {
			stopAt(phase.legacy)
		}
	}
	f.start(t, cfg)
	f.checkAlertIDs(t, "restarts", want)
}

// ruleYAML is a match rule and a windowed rule by user, for ruleInput.
const ruleYAML = `
alert:
  idle_after: 1h
rules:
  - name: refund
    kind: match
    filter: type == "test.refunded"
  - name: failed-logins
    kind: threshold
    filter: type == "login.failed"
    group_by: [data.user]
    window: 1s
    step: 100ms
    allowed_lateness: 15s
    op: ">"
    threshold: 3
`

// ruleInput is event i of a run of ruleYAML's input: failed logins of seven users
// in bursts, refunds, other events; event time moves on 10 ms an event. From 1,200
// on, events an hour later that no rule matches close every window (in every
// partition).
func ruleInput(i int) []byte {
	at := time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC)
	typ, when := "test.created", at.Add(time.Duration(i)*10*time.Millisecond)
	switch {
	case i >= 1200:
		when = at.Add(time.Hour)
	case i%7 == 0:
		typ = "test.refunded"
	case i%40 < 12:
		typ = "login.failed"
	}
	return fmt.Appendf(nil, `{"id":"e-%d","source":"shop","type":%q,"time":%q,"data":{"user":"u%d","n":%d}}`,
		i, typ, when.Format(time.RFC3339Nano), i%40%7, i)
}

// ruleOracle is the alert message ids one engine gives for the first n of
// ruleInput under yaml's rules.
func ruleOracle(t *testing.T, yaml string, n int) []string {
	t.Helper()
	cfg, _ := configFrom(t, "oracle", yaml)
	oracle := alert.NewEngine(cfg.Alert.Rules, nil)
	var want []string
	for i := range n {
		e, err := events.Unmarshal(ruleInput(i))
		if err != nil {
			t.Fatal(err)
		}
		e.Key = dedup.Key(e, events.Message{Subject: "events.shop.order"})
		out, _ := oracle.Observe(alert.Env(e))
		for _, a := range out {
			want = append(want, alerts.MsgID(a))
		}
	}
	return want
}

func (f *fixture) publishRuleInput(t *testing.T, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		if _, err := f.js.Publish(context.Background(), "events.shop.order", ruleInput(i)); err != nil {
			t.Fatal(err)
		}
	}
}

// checkAlertIDs waits for ALERTS to hold as many changes as want (the oracle's
// ids; at least 20), then fails t unless their ids are want's.
func (f *fixture) checkAlertIDs(t *testing.T, what string, want []string) {
	t.Helper()
	var got []string
	poll.Until(t, time.Minute, func() error {
		var err error
		if got, err = natstest.MsgIDs(context.Background(), f.js, streams.Alerts); err != nil {
			return err
		}
		if len(got) < len(want) {
			return fmt.Errorf("%d of %d alert changes", len(got), len(want))
		}
		return nil
	})
	slices.Sort(want)
	slices.Sort(got)
	if len(want) < 20 || !slices.Equal(got, want) {
		t.Fatalf("%s gave %d alert changes, the oracle %d:\n got %q\nwant %q", what, len(got), len(want), got, want)
	}
}

// With StallRestart, a partition whose insert never returns (its ClickHouse
// connection gone silent: no bytes, no close, and no insert timeout to end it)
// ends its run and starts again on fresh connections: every event once.
func TestWatchdogRestartsStalledPartition(t *testing.T) {
	f, proxy, reg := stallRestarting(t)
	u1, i1, r1 := f.input(t, 1, 200)
	f.waitFor(t, u1, i1, r1)
	if n := stallRestarts(reg); n != 0 {
		t.Fatalf("%v stall restarts before any fault", n)
	}
	proxy.FreezeOpen()
	u2, i2, r2 := f.input(t, 201, 200)
	// The insert of the second input hangs on a silenced connection; only the
	// restart ends it.
	waitStallRestart(t, reg)
	// The silenced connections die (as a dead peer's are reset in the end): a run
	// after the restart that takes one idle in the pool fails at once and retries,
	// rather than after the client's 60 s read timeout (each of the pool's four idle
	// connections could cost that).
	proxy.CloseFrozen()
	f.waitFor(t, u1+u2, i1+i2, r1+r2)
	f.check(t, u1+u2, i1+i2, r1+r2)
	// What the stalled run held in flight went back to the worker when it ended.
	poll.Until(t, time.Minute, func() error {
		if n := metricValue(reg, "sluice_pipeline_events_in_flight"); n != 0 {
			return fmt.Errorf("%v events in flight with everything stored", n)
		}
		return nil
	})
}

// stallRestarting runs a worker with StallRestart and a 1 s StallAfter (no insert
// timeout) that reaches ClickHouse through a proxy whose connections the test can
// silence or hold.
func stallRestarting(t *testing.T) (*fixture, *testnet.Freezer, *prometheus.Registry) {
	t.Helper()
	f, srv, s := setupOwn(t)
	proxy := testnet.NewFreezer(t, srv.Addr)
	s.Addr = proxy.Addr()
	viaProxy, err := chconn.Open(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = viaProxy.Close() })
	cfg := testConfig(t, "a")
	cfg.StallAfter, cfg.StallRestart, cfg.InsertTimeout = time.Second, true, time.Hour
	return f, proxy, f.runOn(t, cfg, viaProxy, &telemetry.Readiness{})
}

// stallRestarts is how many stall restarts the worker of reg made.
func stallRestarts(reg prometheus.Gatherer) float64 {
	return max(metricValue(reg, "sluice_pipeline_stall_restarts_total"), 0)
}

// waitStallRestart waits until the worker of reg has made a stall restart.
func waitStallRestart(t *testing.T, reg prometheus.Gatherer) {
	t.Helper()
	poll.Until(t, time.Minute, func() error {
		if n := stallRestarts(reg); n < 1 {
			return fmt.Errorf("%v stall restarts while an insert waits on the network: want at least one", n)
		}
		return nil
	})
}

// A run started again by the watchdog fences out the run before it: an insert of
// the stalled run that reaches ClickHouse only after the new run stored the same
// input (a cut network whose retransmissions arrive once it heals) stores nothing.
// The claim is kept across the restart, so the run's generation is its own
// (Claim.NextGeneration); with the claim's (before), the late insert passed the
// fence and its events were stored twice.
func TestStallRestartFencesTheRunBefore(t *testing.T) {
	f, proxy, reg := stallRestarting(t)
	u1, i1, r1 := f.input(t, 1, 200)
	f.waitFor(t, u1, i1, r1)
	// The next insert's query reaches the server, which asks for its data; the
	// data is held on the way. The server runs the insert, waiting for it.
	proxy.HoldAfterAnswer()
	u2, i2, r2 := f.input(t, 201, 200)
	waitStallRestart(t, reg)
	// The new run waited for the insert to end (a lease TTL), then stored the same
	// input itself.
	f.waitFor(t, u1+u2, i1+i2, r1+r2)
	if proxy.Held() == 0 {
		t.Fatal("no insert's data is held")
	}
	// The stalled run's insert reaches the server now, and is answered.
	proxy.Release()
	poll.Until(t, time.Minute, func() error {
		if proxy.Answered() == 0 {
			return errors.New("the late insert is not answered yet")
		}
		return nil
	})
	f.check(t, u1+u2, i1+i2, r1+r2)
}

// A worker's partitions together hold at most two batches of events read and not
// stored: with ClickHouse stopped (SIGSTOP) and a backlog, the four partitions of
// one worker fill that and no more; once it runs again everything lands and
// nothing stays counted in flight. Filled: an envelope of w events waits while
// fewer than w are free (the bound is taken in order), so the events in flight
// come within the largest envelope's count of the bound (how many events the keying
// step puts in one envelope depends on how far behind the input it is).
func TestInflightBounded(t *testing.T) {
	f, srv, _ := setupOwn(t)
	cfg := testConfig(t, "a")
	cfg.Partitions, cfg.MaxRows = 4, 50
	// One worker owns every partition throughout: a claim lost to a slow machine
	// could not be taken again while ClickHouse is stopped (a run starts with its
	// fence), and the bound would never be reached.
	cfg.LeaseTTL = 10 * time.Second
	// Batches are cut at MaxRows or when the room in flight runs out, not at the
	// flush interval: a slow machine's keying step keeps up with the publisher in
	// envelopes of a few events, and batches cut every 20 ms fill the hand-offs
	// between the stages (up to seven batches a partition) before the room in flight
	// (it failed so in CI: 53 of 100 events in flight after a minute).
	cfg.FlushInterval = time.Hour
	reg := f.runOn(t, cfg, f.ch, &telemetry.Readiness{})
	inflight := func() float64 { return metricValue(reg, "sluice_pipeline_events_in_flight") }
	u1, i1, r1 := f.input(t, 1, 100)
	f.waitFor(t, u1, i1, r1)
	if err := syscall.Kill(srv.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = syscall.Kill(srv.Pid(), syscall.SIGCONT)
		}
	}
	defer resume()
	u2, i2, r2 := f.input(t, 101, 2000)
	limit := float64(inflightBatches * cfg.MaxRows)
	peak := 0.0
	poll.Until(t, time.Minute, func() error {
		n := inflight()
		if n > limit {
			t.Fatalf("%v events in flight, over the worker's %v", n, limit)
		}
		peak = max(peak, n)
		largest, err := largestEnvelope(f.js)
		if err != nil {
			return err
		}
		if peak <= limit-min(largest, limit) {
			return fmt.Errorf("%v events in flight, envelopes of up to %v events", n, largest)
		}
		return nil
	})
	resume()
	f.waitFor(t, u1+u2, i1+i2, r1+r2)
	f.check(t, u1+u2, i1+i2, r1+r2)
	poll.Until(t, time.Minute, func() error {
		if n := inflight(); n != 0 {
			return fmt.Errorf("%v events in flight with everything stored", n)
		}
		return nil
	})
}

// largestEnvelope is how many events the largest envelope in PARTITIONS holds.
func largestEnvelope(js jetstream.JetStream) (float64, error) {
	largest := 1
	err := natstest.EachMsg(context.Background(), js, streams.Partitions, func(m *jetstream.RawStreamMsg) {
		if n, err := strconv.Atoi(m.Header.Get(keyed.HeaderCount)); err == nil {
			largest = max(largest, n)
		}
	})
	return float64(largest), err
}

// metricValue is the value of reg's gauge or counter name (its first series), -1
// when it has none.
func metricValue(reg prometheus.Gatherer, name string) float64 {
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				if c := m.GetCounter(); c != nil {
					return c.GetValue()
				}
				return m.GetGauge().GetValue()
			}
		}
	}
	return -1
}

// An event too large for an envelope is copied into its partition alone (and lands
// once); one too large even for that, with its key and position, is dead-lettered
// by the keying step with the reason; the envelopes around them carry the rest.
func TestPartitionedLargeEvents(t *testing.T) {
	f := setup(t)
	ctx := context.Background()
	limit := f.nc.MaxPayload()
	body := func(id string, pad int) []byte {
		head := fmt.Sprintf(`{"id":%q,"source":"shop","type":"test.created","time":"2026-11-22T03:00:00Z","data":{"pad":"`, id)
		return []byte(head + strings.Repeat("x", pad-len(head)-3) + `"}}`)
	}
	for i := range 100 {
		if _, err := f.js.Publish(ctx, "events.shop.order", body(fmt.Sprintf("small-%d", i), 200)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.js.Publish(ctx, "events.shop.order", body("alone", int(limit)-2048)); err != nil {
		t.Fatal(err)
	}
	if _, err := f.js.Publish(ctx, "events.shop.order", body("too-large", int(limit)-40)); err != nil {
		t.Fatal(err)
	}
	cfg, _ := configFrom(t, "a", "")
	cfg.Partitions = 4
	f.start(t, cfg)
	f.waitFor(t, 101, 1, 0)
	f.check(t, 101, 1, 0)
	var n uint64
	if err := f.ch.QueryRow(ctx, "SELECT count() FROM events WHERE id = 'alone' AND length(data) > 1000000").Scan(&n); err != nil || n != 1 {
		t.Fatalf("the large event: %d rows (%v)", n, err)
	}
	cons, err := f.js.OrderedConsumer(ctx, streams.DLQ, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	m, err := cons.Next()
	if err != nil {
		t.Fatal(err)
	}
	if r := m.Headers().Get(stage.HeaderReason); !strings.Contains(r, "too large to copy into its partition") {
		t.Fatalf("dead letter's reason: %q", r)
	}
	if got := f.streamCount(t, streams.Partitions, "partitioned.*."+keyed.Token); got == 0 {
		t.Fatal("no envelopes in PARTITIONS")
	}
	if got := f.streamCount(t, streams.Partitions, "partitioned.*.events.>"); got != 1 {
		t.Fatalf("%d events copied alone, want 1", got)
	}
	// With one keying step, each partition has its events in EVENTS' order, the
	// one copied alone included.
	pc, err := f.js.OrderedConsumer(ctx, streams.Partitions, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	last := map[int]uint64{}
	for range f.streamCount(t, streams.Partitions, "partitioned.>") {
		m, err := pc.Next(jetstream.FetchMaxWait(10 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		p, _, err := partition.Parse(m.Subject())
		if err != nil {
			t.Fatal(err)
		}
		next := func(seq uint64) {
			if seq <= last[p] {
				t.Fatalf("partition %d has EVENTS %d after %d", p, seq, last[p])
			}
			last[p] = seq
		}
		if m.Headers().Get(keyed.HeaderEnvelope) == "" {
			seq, _ := strconv.ParseUint(m.Headers().Get(HeaderEventsSeq), 10, 64)
			next(seq)
			continue
		}
		if err := keyed.Decode(m.Data(), func(_ int, x keyed.Entry) bool { next(x.Seq); return true }); err != nil {
			t.Fatal(err)
		}
	}
}

// The dead letter of an event from an envelope is that of its EVENTS message: its
// subject, headers, payload, position and the producer's id.
func TestEnvelopeEntryDeadLetter(t *testing.T) {
	x := keyed.Entry{Subject: "events.shop.order", Header: map[string][]string{nats.MsgIdHdr: {"p-1"}, "X-Trace": {"t"}}, Data: []byte(`{"id":1}`),
		Seq: 42, Received: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC), Key: "shop|p-1", Element: -1}
	dl := stage.DeadLetter(Name, &entryMsg{x: x}, "cannot be a row", 1<<20)
	for h, want := range map[string]string{
		stage.HeaderSubject: x.Subject, stage.HeaderStream: streams.Events, stage.HeaderStreamSeq: "42", "X-Trace": "t",
		"Sluice-Msg-Id": "p-1", nats.MsgIdHdr: "dlq:EVENTS:42", stage.HeaderReceivedAt: "2026-12-01T00:00:00Z",
	} {
		if got := dl.Header.Get(h); got != want {
			t.Errorf("%s: %q, want %q", h, got, want)
		}
	}
	if string(dl.Data) != `{"id":1}` {
		t.Errorf("payload %s", dl.Data)
	}
	x.Element = 3
	if el := stage.ElementDeadLetter(Name, &entryMsg{x: x}, 3, x.Data, "bad", 1<<20); el.Header.Get(nats.MsgIdHdr) != "dlq:EVENTS:42:3" {
		t.Errorf("element's dead letter id %q", el.Header.Get(nats.MsgIdHdr))
	}
}

// Another platform (a NATS of its own: a second `sluice up` that found the same
// ClickHouse) records a newer generation of partition 0 in the same database: the
// inserts of this run store nothing from then on, though the server answers them.
// The run must not record its position past them: its next save finds the fence,
// it starts again from its last state under a generation of its own claim above
// that one, and every event lands once. Before, the events after the other fence
// were lost: the run saved its position over them.
func TestFencedByAnotherPlatform(t *testing.T) {
	f := setup(t)
	f.start(t, testConfig(t, "w1"))
	u1, i1, r1 := f.input(t, 1, 100)
	f.waitFor(t, u1, i1, r1)

	ctx := context.Background()
	kv, err := f.js.KeyValue(ctx, Bucket)
	if err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The next revision of this NATS's bucket: the run's generation once it starts
	// again is at least that.
	other := st.(*jetstream.KeyValueBucketStatus).StreamInfo().State.LastSeq + 1
	if _, _, err := sink.NewFence(ctx, f.ch, 0, other, "another-platform", time.Second); err != nil {
		t.Fatal(err)
	}
	u2, i2, r2 := f.input(t, 101, 100)
	f.waitFor(t, u1+u2, i1+i2, r1+r2)
	f.check(t, u1+u2, i1+i2, r1+r2)
}
