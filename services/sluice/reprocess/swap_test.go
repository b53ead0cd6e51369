package reprocess

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go/jetstream"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/sink"
	"github.com/sluicehq/sluice/streams"
)

// A merge of the month's parts running when the swap comes (the pipeline's inserts
// make parts, and the server merges them all the time): replacePartition stops it
// before the swap, so the month holds the shadow's rows and nothing else. Without
// the stop, 18.16 adds the merge's result after the swap and every row it merged
// is back (seen in CI: a month's rows twice after a replay under live ingestion).
func TestSwapStopsRunningMerges(t *testing.T) {
	srv := chtest.Start(t)
	_, ch := chtest.Database(t, srv)
	ctx := context.Background()
	exec := func(q string) {
		t.Helper()
		if err := ch.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	count := func(q string) (n uint64) {
		t.Helper()
		if err := ch.QueryRow(ctx, q).Scan(&n); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
		return n
	}
	exec("CREATE TABLE t (k UInt64, s String) ENGINE = MergeTree() PARTITION BY intDiv(k, 100000000) ORDER BY k")
	// Six parts in partition 0, big enough that merging them takes a while; none
	// merged before the OPTIMIZE below (the server would merge some as they come).
	exec("SYSTEM STOP MERGES t")
	const parts, rows = 6, 1_000_000
	for range parts {
		exec(fmt.Sprintf("INSERT INTO t (k, s) SELECT number, concat(toString(number), '-', toString(rand()), '-', toString(rand64())) FROM numbers(%d)", rows))
	}
	exec("CREATE TABLE shadow AS t")
	exec("INSERT INTO shadow (k, s) SELECT number, 'new' FROM numbers(10)")
	exec("SYSTEM START MERGES t")

	merged := make(chan error, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { merged <- ch.Exec(ctx, "OPTIMIZE TABLE t PARTITION 0 FINAL") })
	poll.Until(t, time.Minute, func() error {
		var n uint64
		var progress float64
		if err := ch.QueryRow(ctx, "SELECT count(), max(progress) FROM system.merges WHERE database = currentDatabase() AND table = 't'").Scan(&n, &progress); err != nil {
			return err
		}
		if n == 0 || progress < 0.1 {
			return errors.New("no merge under way yet")
		}
		return nil
	})
	if err := replacePartition(ctx, ch, "t", "0", "shadow", time.Minute, func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	t.Logf("the merge: %v", <-merged) // cancelled (an error), or nil where 18.16 returns early
	poll.Until(t, time.Minute, func() error {
		if n := count("SELECT count() FROM system.merges WHERE database = currentDatabase() AND table = 't'"); n > 0 {
			return fmt.Errorf("%d merges running", n)
		}
		return nil
	})
	if n := count("SELECT count() FROM t"); n != 10 {
		t.Fatalf("%d rows after the swap; want the shadow's 10", n)
	}
	// The merge was under way at the swap and never ended: no merged part.
	if n := count("SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 't' AND level > 0"); n != 0 {
		t.Fatalf("%d merged part(s): the merge ended before or after the swap", n)
	}
	// Merges run again: two more parts are merged.
	exec("INSERT INTO t (k, s) SELECT 20, 'a'")
	exec("INSERT INTO t (k, s) SELECT 21, 'b'")
	exec("OPTIMIZE TABLE t PARTITION 0 FINAL")
	if n := count("SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 't' AND active"); n != 1 {
		t.Fatalf("%d active parts after OPTIMIZE; merges were not started again", n)
	}
}

// A run killed during its swap leaves the table's merges stopped; the next run
// starts them again where no month is held (a held month: another run may be
// swapping, and keeps them stopped).
func TestRunStartsMergesLeftStopped(t *testing.T) {
	ch, js := platformParts(t)
	ctx := context.Background()
	log := slog.New(slog.DiscardHandler)
	exec := func(q string) {
		t.Helper()
		if err := ch.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	// parts is how many active parts events has after an OPTIMIZE (which fails,
	// merging nothing, while merges are stopped).
	parts := func() (n uint64) {
		t.Helper()
		if err := ch.Exec(ctx, "OPTIMIZE TABLE events FINAL"); err != nil && !strings.Contains(err.Error(), "Cancelled merging parts") {
			t.Fatal(err)
		}
		if err := ch.QueryRow(ctx, "SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 'events' AND active").Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	exec("SYSTEM STOP MERGES events") // as a run killed during its swap leaves them
	for _, k := range []string{"a", "b"} {
		exec("INSERT INTO events (key, event_time, stream_seq) SELECT '" + k + "', toDateTime('2026-11-21 10:00:00'), 1")
	}
	if n := parts(); n != 2 {
		t.Fatalf("%d parts with merges stopped; want 2", n)
	}
	run := func() {
		t.Helper()
		if _, err := Run(ctx, js, chconn.OneServer(ch), Config{HoldTTL: time.Minute, Chunk: 10, Log: log}); err != nil {
			t.Fatal(err)
		}
	}
	hold, err := sink.HoldMonth(ctx, ch, 202611, "another-run", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	run()
	if n := parts(); n != 2 {
		t.Fatalf("a run while another holds a month: %d parts; want merges still stopped (2)", n)
	}
	if err := hold.Release(ctx); err != nil {
		t.Fatal(err)
	}
	run()
	if n := parts(); n != 1 {
		t.Fatalf("a run with no month held: %d parts; want them merged (1)", n)
	}
}

// platformParts is a ClickHouse database with the migrations applied and a NATS
// server with the topology, as a run finds them.
func platformParts(t *testing.T) (driver.Conn, jetstream.JetStream) {
	t.Helper()
	srv := chtest.Start(t)
	_, ch := chtest.Database(t, srv)
	ctx := context.Background()
	if err := chmigrate.Migrate(ctx, ch, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	ns := natstest.Run(t)
	_, js := ns.Connect(t)
	topology, err := streams.Load()
	if err != nil {
		t.Fatal(err)
	}
	if err := topology.Apply(ctx, js); err != nil {
		t.Fatal(err)
	}
	return ch, js
}

// While the split stages' sink reads ENRICHED, whose inserts a hold does not hold
// off, a run is refused before it holds anything (a dry run is not); once the sink
// stopped and its pull expired, it runs.
func TestRunRefusedWhileSplitSinkReads(t *testing.T) {
	ch, js := platformParts(t)
	ctx := context.Background()
	cfg := Config{HoldTTL: time.Minute, Chunk: 10, Log: slog.New(slog.DiscardHandler)}
	cons, err := js.Consumer(ctx, streams.Enriched, "sink")
	if err != nil {
		t.Fatal(err)
	}
	// Fetches one after the other, as the split sink pulls.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if res, err := cons.Fetch(100, jetstream.FetchMaxWait(500*time.Millisecond)); err == nil {
				for range res.Messages() {
				}
			}
		}
	})
	stopped := false
	defer func() {
		if !stopped {
			close(stop)
		}
		wg.Wait()
	}()
	poll.Until(t, 10*time.Second, func() error {
		info, err := cons.Info(ctx)
		if err != nil {
			return err
		}
		if info.NumWaiting == 0 {
			return errors.New("no pull waiting yet")
		}
		return nil
	})
	_, err = Run(ctx, js, chconn.OneServer(ch), cfg)
	if err == nil || !strings.Contains(err.Error(), "the split stages' sink is reading ENRICHED") || !strings.Contains(err.Error(), "stop the sink service while replaying") {
		t.Fatalf("a run while the split sink reads: %v", err)
	}
	dry := cfg
	dry.DryRun = true
	if _, err := Run(ctx, js, chconn.OneServer(ch), dry); err != nil {
		t.Fatalf("a dry run while the split sink reads: %v", err)
	}
	close(stop)
	stopped = true
	poll.Until(t, 30*time.Second, func() error {
		_, err := Run(ctx, js, chconn.OneServer(ch), cfg)
		return err
	})
}

// The last check before a swap: it passes with the run's hold in force and the
// month as the shadow has it; it fails when the hold ends too soon (renewals that
// failed, or a hold ended from outside) or the month gained a row under it.
func TestReadyToSwap(t *testing.T) {
	ch, _ := platformParts(t)
	ctx := context.Background()
	r, err := newRun(chconn.OneServer(ch), Config{HoldTTL: time.Minute, Chunk: 10, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	sh := r.shards[0]
	sh.rd = ch
	exec := func(q string) {
		t.Helper()
		if err := ch.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	row := func(table, key string) {
		exec("INSERT INTO " + table + " (key, event_time, stream_seq) SELECT '" + key + "', toDateTime('2026-11-21 10:00:00'), 1")
	}
	row("events", "a")
	exec("CREATE TABLE shadow AS events")
	row("shadow", "a")
	if err := r.readyToSwap(ctx, sh, 202611, "shadow"); err == nil || !strings.Contains(err.Error(), "the month's hold ends in") {
		t.Fatalf("with no hold: %v", err)
	}
	hold, err := sink.HoldMonth(ctx, ch, 202611, r.id, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.readyToSwap(ctx, sh, 202611, "shadow"); err != nil {
		t.Fatalf("the hold in force, the month as the shadow has it: %v", err)
	}
	row("events", "b") // an insert that did not wait for the hold
	if err := r.readyToSwap(ctx, sh, 202611, "shadow"); err == nil || !strings.Contains(err.Error(), "the shadow has 1 rows and events 2: the month changed under the hold") {
		t.Fatalf("a row added under the hold: %v", err)
	}
	row("shadow", "b")
	if err := hold.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.readyToSwap(ctx, sh, 202611, "shadow"); err == nil || !strings.Contains(err.Error(), "the month's hold ends in") {
		t.Fatalf("the hold ended from outside: %v", err)
	}
}
