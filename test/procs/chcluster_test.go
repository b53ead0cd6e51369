package procs

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chcluster"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/crash"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestClusterWriterKill9: two pipeline worker processes on four partitions write
// to a ClickHouse cluster of 2 shards × 2 replicas (18.16, ZooKeeper), the sink
// its dead letters, while 30,000 publishes flow; the events also fill a typed
// table (page.view). Each worker SIGKILLs itself at a point of its insert cycle in
// turn (before, during, after the events insert, during the typed insert), six
// times in all, and the first replica of shard 2 is stopped for 60 s meanwhile.
// Read through the Distributed tables, every unique event is there once, in events
// and in page_view, and every invalid one in dead_letters.
func TestClusterWriterKill9(t *testing.T) {
	bin := build(t)
	dir := t.TempDir()
	ns := runNATS(t)
	c := chcluster.Start(t, 2, 2)
	ctx := context.Background()
	chs := settings.ClickHouse{Addr: c.Nodes[0][0].Addr, Database: "sluice", User: "default", Cluster: chcluster.Name}
	nc, js := ns.connect(t)
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
	if err := os.WriteFile(cfgPath, []byte("dedup:\n  window: 1h\ntyped_tables:\n  types: [page.view]\ningest:\n  schemas: "+schemas+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	start := func(name string, env ...string) *process {
		return startProcess(t, bin, dir, name, append([]string{"NATS_URL=" + ns.url(), "METRICS_ADDR=", "LOG_LEVEL=info",
			"SLUICE_APPLY_TOPOLOGY=false", "CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=sluice",
			"CLICKHOUSE_CLUSTER=" + chcluster.Name, "SLUICE_CONFIG=" + cfgPath}, env...))
	}
	worker := func(i int, crash string) *process {
		return start("pipeline", fmt.Sprintf("PIPELINE_REPLICA=w%d", i), "SLUICE_PARTITIONS=4", "PIPELINE_LEASE_TTL=3s",
			"PIPELINE_SNAPSHOT_INTERVAL=500ms", "PIPELINE_BATCH_MAX_ROWS=2000", "PIPELINE_INSERT_TIMEOUT=20s", "SLUICE_TEST_CRASH="+crash)
	}
	// The migrations first, once, as production.md has it (`sluice migrate` with the
	// whole cluster up): the sink and both workers each applying a migration's ALTER
	// ... ON CLUSTER at once waited on 18.16's distributed DDL past their minute's
	// read timeout in CI, and ended before any insert. Started after, the services
	// find every migration recorded.
	migrator, err := chconn.Open(ctx, chs)
	if err != nil {
		t.Fatal(err)
	}
	if err := chmigrate.MigrateTo(ctx, migrator, chmigrate.Target{Cluster: chs.Cluster, Database: chs.Database}, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatalf("migrate the cluster: %v", err)
	}
	migrator.Close()
	start("sink", "SINK_TABLES=dead_letters,alerts")
	points := []string{crash.BeforeInsert, crash.DuringInsert, crash.AfterInsert, crash.DuringTypedInsert}
	workers := []*process{worker(0, points[0]+":0.2"), worker(1, points[1]+":0.2")}

	m := oracle.NewManifest(oracle.Spec{Total: 30_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 37})
	pubCtx, stopPub := context.WithTimeout(ctx, 10*time.Minute)
	defer stopPub()
	published := make(chan error, 1)
	go func() {
		// About 2,500 publishes a second, so the run outlasts the faults (the pause
		// paces the producer; it waits on no condition).
		published <- m.PublishAcked(pubCtx, js, 250, func() { time.Sleep(100 * time.Millisecond) })
	}()
	// The oracle reads through the Distributed tables (once every replica has
	// fetched its shard's parts, at the end).
	var reader driver.Conn
	err = oracle.WaitFor(ctx, 2*time.Minute, func() error {
		// A worker that killed itself at its crash point starts again: both may
		// die before any of their inserts is stored (it happened in CI).
		for i, w := range workers {
			select {
			case <-w.done:
				workers[i] = worker(i, points[i]+":0.2")
			default:
			}
		}
		var err error
		if reader == nil {
			if reader, err = chconn.Open(ctx, chs); err != nil {
				return err
			}
		}
		// Both writers past their start (the migrations, which need every node).
		var rows, dead uint64
		if err := reader.QueryRow(ctx, "SELECT (SELECT count() FROM events), (SELECT count() FROM dead_letters)").Scan(&rows, &dead); err != nil {
			return err
		}
		if rows == 0 || dead == 0 {
			return fmt.Errorf("%d events and %d dead letters stored", rows, dead)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("%v; %s", err, streamTrail(ctx, js, streams.Events, streams.Partitions, streams.DLQ))
	}
	defer reader.Close()
	// A replica stopped for 60 s while the workers insert and die.
	replica := c.Nodes[1][0]
	if err := replica.Stop(); err != nil {
		t.Fatal(err)
	}
	stoppedAt := time.Now()
	restarted := false
	rng := rand.New(rand.NewPCG(37, 38))
	for kill := range 6 {
		i := kill % 2
		w := workers[i]
		how := "by itself"
		select {
		case <-w.done:
		case <-time.After(time.Duration(4000+rng.IntN(2000)) * time.Millisecond): // the fault's timing
			how = "by the test"
			_ = w.cmd.Process.Signal(syscall.SIGKILL)
			<-w.done
		}
		if ws, ok := w.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("worker %d exited otherwise than by SIGKILL (%v):\n%s", i, w.cmd.ProcessState, w.tail())
		}
		t.Logf("kill %d: worker %d (%s)", kill+1, i, how)
		workers[i] = worker(i, points[(kill+2)%len(points)]+":0.2")
		if !restarted && time.Since(stoppedAt) >= 60*time.Second {
			if err := replica.Start(ctx); err != nil {
				t.Fatal(err)
			}
			restarted = true
			t.Log("the stopped replica is started again")
		}
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	if !restarted {
		time.Sleep(time.Until(stoppedAt.Add(60 * time.Second))) // the fault's length: 60 s down
		if err := replica.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// The last ones run without faults to the end.
	for i, w := range workers {
		_ = w.cmd.Process.Signal(syscall.SIGKILL)
		<-w.done
		start("pipeline", fmt.Sprintf("PIPELINE_REPLICA=w%d", i), "SLUICE_PARTITIONS=4", "PIPELINE_LEASE_TTL=3s")
	}
	syncAll := func() error {
		for _, addr := range c.Addrs() {
			conn, err := chconn.Open(ctx, settings.ClickHouse{Addr: addr, Database: "sluice", User: "default"})
			if err != nil {
				return err
			}
			for _, table := range []string{"events_local", "dead_letters_local", "page_view_local"} {
				if err := conn.Exec(ctx, "SYSTEM SYNC REPLICA "+table); err != nil {
					conn.Close()
					return fmt.Errorf("%s %s: %w", addr, table, err)
				}
			}
			conn.Close()
		}
		return nil
	}
	consumers := readBy(topo, []string{"pipeline", "sink"})
	err = oracle.WaitFor(ctx, 5*time.Minute, func() error {
		if err := syncAll(); err != nil {
			return err
		}
		got, err := oracle.ReadCounts(ctx, reader)
		if err != nil {
			return err
		}
		if got.Events < uint64(len(m.Events)) || got.DeadLetters < uint64(len(m.Invalid)) {
			return fmt.Errorf("%+v", got)
		}
		for _, c := range consumers.Consumers {
			if err := natstest.Idle(ctx, js, c.Stream, c.Config.Durable); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := syncAll(); err != nil {
		t.Fatal(err)
	}
	if err := m.Check(ctx, reader); err != nil {
		logDuplicates(t, ctx, reader)
		t.Fatal(err)
	}
	err = oracle.WaitFor(ctx, 2*time.Minute, func() error {
		if err := syncAll(); err != nil {
			return err
		}
		return pageViewOnce(ctx, reader, m)
	})
	if err != nil {
		t.Fatal(err)
	}
}
