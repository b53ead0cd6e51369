package status

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/services/sink"
	"github.com/sluicehq/sluice/services/sluice/platform/platformtest"
)

// The platform (`sluice up`: embedded NATS, its own ClickHouse, the pipeline,
// notify and the sink) takes valid, repeated and invalid events and fires alerts to
// a receiver nobody answers. Status sees the partition owned and caught up, the
// dead letters ClickHouse holds by reason, the alerts firing, the receiver backing
// off with its error; healthy with generous limits, unhealthy (naming the receiver)
// with a tight one, and unhealthy when ClickHouse does not answer.
func TestCollect(t *testing.T) {
	dir := t.TempDir()
	nobody := testnet.FreeAddr(t) // a receiver that refuses connections
	config := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(`rules:
  - name: big-order
    filter: 'type == "order.created" && data.amount > 1000'
    group_by: [id]
    severity: warning
receivers:
  - {name: ops, url: "http://%s/hook", secret_env: [WEBHOOK_SECRET], allow_private: true}
`, nobody)), 0o644); err != nil {
		t.Fatal(err)
	}
	p := platformtest.Start(t, config, map[string]string{"WEBHOOK_SECRET": "whsec_c2x1aWNlLWRlbW8tc2VjcmV0LWNoYW5nZS1tZQ=="})
	nc, js := p.Connect(t)
	db := p.DB(t)
	chs := p.ClickHouse

	// The pipeline saves its state once before input counts as live (alerts of
	// earlier input are a replay, sent nowhere).
	poll.Until(t, 2*time.Minute, func() error {
		r, err := Collect(context.Background(), js, db, chs.Addr, nil, Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
		if err != nil {
			return err
		}
		if len(r.Partitions) != 1 || r.Partitions[0].SavedAt.IsZero() {
			return fmt.Errorf("partitions %+v", r.Partitions)
		}
		return nil
	})
	publish := func(subject, body string) {
		t.Helper()
		if err := nc.Publish(subject, []byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 50 {
		body := fmt.Sprintf(`{"specversion":"1.0","id":"o-%d","source":"shop","type":"order.created","data":{"order_id":"o-%d","amount":%d}}`, i, i, i*100)
		publish("events.shop.order", body)
		if i%10 == 0 {
			publish("events.shop.order", body) // a repeat
		}
	}
	for i := range 3 {
		publish("events.shop.order", fmt.Sprintf(`{"specversion":"1.0","id":"x-%d","source":"shop","type":"order.created","data":{"order_id":"x","amount":-1}}`, i)) // against order.created's schema
	}
	publish("events.shop.order", `not json`)
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}

	// Everything lands; the state is saved past it.
	var r *Report
	poll.Until(t, 2*time.Minute, func() error {
		var events, dead uint64
		if err := db.QueryRow(context.Background(), "SELECT (SELECT count() FROM events), (SELECT count() FROM dead_letters)").Scan(&events, &dead); err != nil {
			return err
		}
		if events != 50 || dead != 4 {
			return fmt.Errorf("%d events, %d dead letters", events, dead)
		}
		var err error
		r, err = Collect(context.Background(), js, db, chs.Addr, nil, Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
		if err != nil {
			return err
		}
		if p := r.Partitions[0]; p.Pending != 0 || len(r.Receivers) != 1 || r.Receivers[0].State != BackingOff {
			return fmt.Errorf("partition %+v, receivers %+v", p, r.Receivers)
		}
		return nil
	})
	if !r.Healthy || len(r.Problems) != 0 {
		t.Fatalf("unhealthy with an hour's limits: %v", r.Problems)
	}
	var last uint64
	for _, s := range r.Streams {
		if s.Name == "EVENTS" {
			last = s.LastSeq
		}
	}
	if p := r.Partitions[0]; p.Worker == "" || p.Seq != last || p.StoredAt.IsZero() || last != 59 {
		t.Fatalf("partition %+v, EVENTS last %d; want owned, at 59", p, last)
	}
	if !r.ClickHouse.Reachable || r.ClickHouse.LastInsert["events"].IsZero() || r.ClickHouse.LastInsert["dead_letters"].IsZero() {
		t.Fatalf("ClickHouse %+v", r.ClickHouse)
	}
	// Dead letters by reason, as ClickHouse counts them.
	if r.DeadLettersHour != 4 {
		t.Fatalf("%d dead letters in the last hour, want 4", r.DeadLettersHour)
	}
	byReason := map[string]uint64{}
	rows, err := db.Query(context.Background(), "SELECT reason, count() FROM dead_letters GROUP BY reason")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var reason string
		var n uint64
		if err := rows.Scan(&reason, &n); err != nil {
			t.Fatal(err)
		}
		byReason[reason] = n
	}
	rows.Close()
	if len(r.DeadLetters) != len(byReason) || len(byReason) < 2 {
		t.Fatalf("dead letters %+v, ClickHouse %v", r.DeadLetters, byReason)
	}
	for _, d := range r.DeadLetters {
		if byReason[d.Reason] != d.Count || d.Stage != "pipeline" {
			t.Fatalf("dead letters %+v, ClickHouse %v", r.DeadLetters, byReason)
		}
	}
	// Amounts above 1000: o-11 ... o-49, one group each.
	if len(r.Firing) != 1 || r.Firing[0].Rule != "big-order" || r.Firing[0].Count != 39 {
		t.Fatalf("firing %+v, want big-order 39", r.Firing)
	}
	if rc := r.Receivers[0]; rc.Name != "ops" || rc.Pending == 0 || !strings.Contains(rc.LastError, "refused") || rc.Since.IsZero() {
		t.Fatalf("receiver %+v", rc)
	}
	var text bytes.Buffer
	if err := r.Text(&text); err != nil {
		t.Fatal(err)
	}
	t.Logf("sluice status:\n%s", text.String())
	for _, want := range []string{"healthy", "big-order 39", "Dead letters in the last hour: 4", "ops", "backing off"} {
		if !strings.Contains(text.String(), want) {
			t.Fatalf("the text lacks %q:\n%s", want, text.String())
		}
	}

	// A month held by sluice replay is shown, and is no problem.
	hold, err := sink.HoldMonth(context.Background(), db, 202611, "status-test", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	held, err := Collect(context.Background(), js, db, chs.Addr, nil, Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
	if err := hold.Release(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	text.Reset()
	if err := held.Text(&text); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(held.ClickHouse.Held) != "[202611]" || held.Healthy != r.Healthy || !strings.Contains(text.String(), "held by sluice replay (the pipeline's inserts of these months wait): 202611") {
		t.Fatalf("a held month: %+v, healthy %v:\n%s", held.ClickHouse, held.Healthy, text.String())
	}

	// Tight limits: the receiver's notifications wait and it fails for longer.
	// The receiver's deliverer holds naked notifications while it backs off: that
	// is the receiver's state, not a stalled consumer.
	tight, err := Collect(context.Background(), js, db, chs.Addr, nil, Options{MaxLag: time.Millisecond, MaxStateAge: time.Hour, StallAfter: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if tight.Healthy || !strings.Contains(strings.Join(tight.Problems, "\n"), "receiver ops: failing for") ||
		!strings.Contains(strings.Join(tight.Problems, "\n"), "consumer deliver_ops of NOTIFY") ||
		strings.Contains(strings.Join(tight.Problems, "\n"), "deliver_ops of NOTIFY: stalled") {
		t.Fatalf("tight limits: healthy %v, problems %v", tight.Healthy, tight.Problems)
	}
	// Merges stopped (as a replay killed during its swap leaves them) while inserts
	// go on: a partition's parts pile up, a problem before ClickHouse delays inserts.
	exec := func(q string) {
		t.Helper()
		if err := db.Exec(context.Background(), q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	partsProblem := func(r *Report) string {
		for _, p := range r.Problems {
			if strings.Contains(p, "active parts") {
				return p
			}
		}
		return ""
	}
	if p := partsProblem(r); p != "" || r.ClickHouse.MostParts == nil || r.ClickHouse.MostParts.Active >= PartsProblem {
		t.Fatalf("parts before: %+v, %q", r.ClickHouse.MostParts, p)
	}
	exec("SYSTEM STOP MERGES events")
	for i := range PartsProblem {
		exec(fmt.Sprintf("INSERT INTO events (key, event_time, stream_seq) SELECT 'parts-%d', toDateTime('2026-01-15 10:00:00'), 1", i))
	}
	piled, err := Collect(context.Background(), js, db, chs.Addr, nil, Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if p := partsProblem(piled); piled.Healthy || !strings.Contains(p, "table events, partition 202601 has 100 active parts") || !strings.Contains(p, "SYSTEM START MERGES events") {
		t.Fatalf("parts piled up: healthy %v, %+v, problems %v", piled.Healthy, piled.ClickHouse.MostParts, piled.Problems)
	}
	exec("SYSTEM START MERGES events")
	exec("OPTIMIZE TABLE events PARTITION 202601 FINAL")
	merged, err := Collect(context.Background(), js, db, chs.Addr, nil, Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if p := partsProblem(merged); p != "" {
		t.Fatalf("merged again: %s", p)
	}

	// system.parts not read (as for a user without access to it): the parts are
	// not judged, and the report says why. (The server is this test's: 18.16 does
	// not attach the table again.)
	exec("DETACH TABLE system.parts")
	unread, err := Collect(context.Background(), js, db, chs.Addr, nil, Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	text.Reset()
	if err := unread.Text(&text); err != nil {
		t.Fatal(err)
	}
	if !unread.ClickHouse.Reachable || unread.ClickHouse.MostParts != nil || !strings.Contains(unread.ClickHouse.PartsError, "parts") ||
		!strings.Contains(text.String(), "parts not judged (system.parts not read: ") {
		t.Fatalf("system.parts not read: %+v:\n%s", unread.ClickHouse, text.String())
	}

	// A read that fails after the dead letters were read (the alerts table changed
	// under it): nothing of it is shown as counted.
	if err := db.Exec(context.Background(), "ALTER TABLE alerts DROP COLUMN status"); err != nil {
		t.Fatal(err)
	}
	partial, err := Collect(context.Background(), js, db, chs.Addr, nil, Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	text.Reset()
	if err := partial.Text(&text); err != nil {
		t.Fatal(err)
	}
	if partial.ClickHouse.Reachable || partial.DeadLettersHour != 0 || len(partial.DeadLetters) != 0 || len(partial.Firing) != 0 ||
		!strings.Contains(text.String(), "Dead letters in the last hour: unknown") || strings.Contains(text.String(), "pipeline  ") {
		t.Fatalf("a read failing part way: %+v, dead letters %+v:\n%s", partial.ClickHouse, partial.DeadLetters, text.String())
	}
	// ClickHouse not answering (a port nobody listens on).
	down := settings.ClickHouse{Addr: testnet.FreeAddr(t), Database: "sluice", User: "default"}
	_, chErr := chconn.Open(context.Background(), down)
	gone, err := Collect(context.Background(), js, nil, down.Addr, chErr, Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if gone.Healthy || gone.ClickHouse.Reachable || !strings.Contains(strings.Join(gone.Problems, "\n"), "ClickHouse at "+down.Addr) {
		t.Fatalf("ClickHouse down: healthy %v, %+v, problems %v", gone.Healthy, gone.ClickHouse, gone.Problems)
	}
}

// behind counts what an input (all of a stream, or a filter of it) holds after a
// position, and how long ago the oldest of that was stored.
func TestBehind(t *testing.T) {
	srv := natstest.Run(t)
	_, js := srv.Connect(t)
	ctx := context.Background()
	st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "IN", Subjects: []string{"in.>"}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if _, err := js.Publish(ctx, fmt.Sprintf("in.%d", i%2), nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.Info(ctx); err != nil { // refresh the cached state
		t.Fatal(err)
	}
	first, err := st.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	later := first.Time.Add(time.Minute)
	for _, c := range []struct {
		filter  string
		seq     uint64
		pending uint64
		oldest  uint64 // the sequence of the oldest pending message
	}{
		{"", 0, 10, 1}, {"", 4, 6, 5}, {"", 10, 0, 0},
		{"in.1", 0, 5, 2}, {"in.1", 2, 4, 4}, {"in.0", 8, 1, 9}, {"in.0", 9, 0, 0},
	} {
		pending, lag, err := behind(ctx, st, c.filter, c.seq, later)
		if err != nil {
			t.Fatal(err)
		}
		want := 0.0
		if c.oldest > 0 {
			m, err := st.GetMsg(ctx, c.oldest)
			if err != nil {
				t.Fatal(err)
			}
			want = later.Sub(m.Time).Seconds()
		}
		if pending != c.pending || lag != want {
			t.Fatalf("filter %q after %d: %d pending, lag %v; want %d, %v", c.filter, c.seq, pending, lag, c.pending, want)
		}
	}
	// The counting consumers are gone.
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Consumers != 0 {
		t.Fatalf("%d consumers left", info.State.Consumers)
	}
}

// A partition whose inserts hang (its ClickHouse stopped with SIGSTOP) is shown
// stalled, with the watchdog's reason, until it stores again.
func TestCollectStalledPartition(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	srv := chtest.Start(t)
	_, ch := chtest.Database(t, srv)
	cfg := pipeline.DefaultConfig()
	cfg.Replica, cfg.LeaseTTL, cfg.SnapshotInterval = "w1", time.Second, 100*time.Millisecond
	cfg.StallAfter, cfg.InsertTimeout = time.Second, 500*time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	go func() {
		done <- pipeline.Run(ctx, cfg, pipeline.Deps{NATS: nc, ClickHouse: ch, Logger: log, Ready: &telemetry.Readiness{}})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	publish := func(from int) {
		t.Helper()
		for i := from; i < from+20; i++ {
			body := fmt.Sprintf(`{"specversion":"1.0","id":"e-%d","source":"shop","type":"order.created","data":{"order_id":"o","amount":1}}`, i)
			if _, err := js.Publish(context.Background(), "events.shop.order", []byte(body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// ClickHouse is not asked: status reports it unreachable and goes on.
	collect := func() (*Report, error) {
		return Collect(context.Background(), js, nil, srv.Addr, errors.New("not asked"), Options{MaxLag: time.Hour, MaxStateAge: time.Hour})
	}
	stalled := func(r *Report) string {
		for _, p := range r.Problems {
			if strings.HasPrefix(p, "partition 0: stalled") {
				return p
			}
		}
		return ""
	}
	publish(0)
	poll.Until(t, time.Minute, func() error {
		r, err := collect()
		if err != nil {
			return err
		}
		if len(r.Partitions) != 1 || r.Partitions[0].Seq != 20 {
			return fmt.Errorf("partitions %+v, want one at 20", r.Partitions)
		}
		if s := stalled(r); s != "" || r.Partitions[0].Stalled != "" {
			t.Fatalf("stalled before any fault: %s", s)
		}
		return nil
	})
	if err := srv.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resumed := false
	defer func() {
		if !resumed {
			_ = srv.Signal(syscall.SIGCONT)
		}
	}()
	publish(20)
	var r *Report
	poll.Until(t, time.Minute, func() error {
		var err error
		if r, err = collect(); err != nil {
			return err
		}
		if s := stalled(r); !strings.Contains(s, "(worker w1): partition 0 holds 20 messages and stored none") || r.Partitions[0].StalledSince.IsZero() {
			return fmt.Errorf("problems %v, partition %+v", r.Problems, r.Partitions)
		}
		return nil
	})
	var text bytes.Buffer
	if err := r.Text(&text); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(text.String(), "STALLED") {
		t.Fatalf("the text does not show the stall:\n%s", text.String())
	}
	// ClickHouse not read: its counts are unknown, not zero.
	for _, want := range []string{"Dead letters in the last hour: unknown (ClickHouse not read)", "Alerts firing: unknown (ClickHouse not read)"} {
		if !strings.Contains(text.String(), want) {
			t.Fatalf("the text lacks %q:\n%s", want, text.String())
		}
	}
	if err := srv.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	resumed = true
	poll.Until(t, time.Minute, func() error {
		r, err := collect()
		if err != nil {
			return err
		}
		if s := stalled(r); s != "" || r.Partitions[0].Seq != 40 {
			return fmt.Errorf("after ClickHouse resumed: %s, partition %+v", s, r.Partitions[0])
		}
		return nil
	})
}

// A consumer that took messages and acknowledges none (a stage wedged in its
// handler) is shown stalled once it has acknowledged and delivered nothing for
// StallAfter, and not once it acknowledges them.
func TestCollectStalledConsumer(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, "EVENTS", jetstream.ConsumerConfig{Durable: "wedged", AckPolicy: jetstream.AckExplicitPolicy, AckWait: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := js.Publish(ctx, "events.shop.order", fmt.Appendf(nil, `{"id":"%d"}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	batch, err := cons.Fetch(3)
	if err != nil {
		t.Fatal(err)
	}
	var held []jetstream.Msg
	for msg := range batch.Messages() {
		held = append(held, msg)
	}
	if len(held) != 3 {
		t.Fatalf("fetched %d of 3", len(held))
	}
	collect := func() (*Report, Consumer) {
		t.Helper()
		r, err := Collect(ctx, js, nil, "127.0.0.1:1", errors.New("not asked"), Options{MaxLag: time.Hour, MaxStateAge: time.Hour, StallAfter: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range r.Consumers {
			if c.Name == "wedged" {
				return r, c
			}
		}
		t.Fatalf("no consumer wedged in %+v", r.Consumers)
		return nil, Consumer{}
	}
	if r, c := collect(); c.Stalled || strings.Contains(strings.Join(r.Problems, "\n"), "consumer wedged of EVENTS: stalled") {
		t.Fatalf("stalled right after delivery: %+v %v", c, r.Problems)
	}
	poll.Until(t, time.Minute, func() error {
		r, c := collect()
		if !c.Stalled || !strings.Contains(strings.Join(r.Problems, "\n"), "consumer wedged of EVENTS: stalled: holds 3 unacknowledged messages") {
			return fmt.Errorf("consumer %+v, problems %v", c, r.Problems)
		}
		return nil
	})
	for _, msg := range held {
		if err := msg.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if r, c := collect(); c.Stalled || strings.Contains(strings.Join(r.Problems, "\n"), "wedged") {
		t.Fatalf("stalled after acknowledging: %+v %v", c, r.Problems)
	}
}
