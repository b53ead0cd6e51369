package procs

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/crash"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/test/oracle"
)

// pageViewSchema is a user's schema for the data of the oracle's events.
const pageViewSchema = `{
  "type": "object",
  "required": ["n", "user", "path"],
  "properties": {"n": {"type": "integer"}, "user": {"type": "string"}, "path": {"type": "string"}}
}`

// TestTypedTableKill9: the pipeline process fills events and a typed table
// (page.view) while 30,000 publishes flow, and SIGKILLs itself eight times at
// points of its insert cycle in turn: before the events insert, during it, after
// it (the typed rows not yet inserted), and during the typed insert; the test
// kills it when it lives too long. Each unique event ends once in events and once
// in page_view, whose sum(n) is the manifest's.
func TestTypedTableKill9(t *testing.T) {
	bin := build(t)
	dir := t.TempDir()
	ns := runNATS(t)
	srv := chtest.Start(t)
	chs, conn := chtest.Database(t, srv)
	nc, js := ns.connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	topo := shortAckWaits(t, js)
	schemas := filepath.Join(dir, "types")
	if err := os.MkdirAll(schemas, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(schemas, "page.view.json"), []byte(pageViewSchema), 0o644); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte("typed_tables:\n  types: [page.view]\ningest:\n  schemas: "+schemas+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	start := func(name string, env ...string) *process {
		return startProcess(t, bin, dir, name, append([]string{"NATS_URL=" + ns.url(), "METRICS_ADDR=", "LOG_LEVEL=info",
			"SLUICE_APPLY_TOPOLOGY=false", "CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_CONFIG=" + cfgPath}, env...))
	}
	pipeline := func(crash string) *process {
		return start("pipeline", "PIPELINE_LEASE_TTL=2s", "PIPELINE_SNAPSHOT_INTERVAL=500ms", "PIPELINE_BATCH_MAX_ROWS=2000", "SLUICE_TEST_CRASH="+crash)
	}
	start("sink", "SINK_TABLES=dead_letters,alerts")
	points := []string{crash.BeforeInsert, crash.DuringInsert, crash.AfterInsert, crash.DuringTypedInsert}
	victim := pipeline(points[0] + ":0.3")

	m := oracle.NewManifest(oracle.Spec{Total: 30_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 31})
	pubCtx, stopPub := context.WithTimeout(ctx, 10*time.Minute)
	defer stopPub()
	published := make(chan error, 1)
	go func() {
		// About 2,500 publishes a second, so the run outlasts the kills (the pause
		// paces the producer; it waits on no condition).
		published <- m.PublishAcked(pubCtx, js, 250, func() { time.Sleep(100 * time.Millisecond) })
	}()
	rng := rand.New(rand.NewPCG(31, 32))
	for kill := range 8 {
		how := "by itself"
		select {
		case <-victim.done:
		case <-time.After(time.Duration(3000+rng.IntN(2000)) * time.Millisecond):
			how = "by the test"
			_ = victim.cmd.Process.Signal(syscall.SIGKILL)
			<-victim.done
		}
		if ws, ok := victim.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("the pipeline exited otherwise than by SIGKILL (%v):\n%s", victim.cmd.ProcessState, victim.tail())
		}
		t.Logf("kill %d (%s, %s)", kill+1, points[kill%len(points)], how)
		victim = pipeline(points[(kill+1)%len(points)] + ":0.3")
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	// The last one runs without faults to the end.
	_ = victim.cmd.Process.Signal(syscall.SIGKILL)
	<-victim.done
	start("pipeline", "PIPELINE_LEASE_TTL=2s")
	waitDrained(t, ctx, conn, js, readBy(topo, []string{"pipeline", "sink"}), m, nil, 0)
	if err := oracle.WaitFor(ctx, 2*time.Minute, func() error { return pageViewOnce(ctx, conn, m) }); err != nil {
		t.Fatal(err)
	}
	// Each row of page_view is its event's.
	var mismatched uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM page_view AS p ANY INNER JOIN (SELECT key AS event_key, stream_seq AS seq FROM events) AS e USING event_key WHERE p.stream_seq != e.seq").Scan(&mismatched); err != nil {
		t.Fatal(err)
	}
	if mismatched != 0 {
		t.Fatalf("%d rows of page_view have another stream_seq than their events row", mismatched)
	}
}

// pageViewOnce checks that page_view (pageViewSchema's typed table) holds each of
// m's unique events once: its count, its distinct keys and the sum of data.n.
func pageViewOnce(ctx context.Context, conn driver.Conn, m *oracle.Manifest) error {
	var wantSum int64
	for i := range m.Events {
		wantSum += int64(i) // the oracle's data.n is the event's index
	}
	var (
		n, keys uint64
		sum     int64
	)
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(event_key), sum(n) FROM page_view").Scan(&n, &keys, &sum); err != nil {
		return err
	}
	if n != uint64(len(m.Events)) || keys != n || sum != wantSum {
		return fmt.Errorf("page_view: count()=%d uniqExact(event_key)=%d sum(n)=%d, want %d events once, sum %d", n, keys, sum, len(m.Events), wantSum)
	}
	return nil
}
