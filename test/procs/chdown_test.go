package procs

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
	"github.com/sluicehq/sluice/test/procstat"
)

// sinkMemoryCap is what the sink's memory must stay under while ClickHouse is down:
// its batch (SINK_BATCH_MAX_ROWS, here 20,000) and the consumer's max_ack_pending
// (100,000 messages of about 600 bytes) bound what it holds.
const sinkMemoryCap = 256 << 20

// TestClickHouseDown60s stops ClickHouse for 60 s while events flow through the
// whole pipeline (services as processes): the sink stops acking, its memory stays
// under the cap, and when ClickHouse is back everything lands once by itself.
func TestClickHouseDown60s(t *testing.T) {
	clickHouseDown(t, services, nil, "sink")
}

// TestClickHouseDown60sPipeline is TestClickHouseDown60s with the pipeline stage,
// whose memory (batches of 5,000) stays under the same cap: it stops reading while
// it cannot insert.
func TestClickHouseDown60sPipeline(t *testing.T) {
	clickHouseDown(t, pipelineServices, map[string][]string{
		"sink": pipelineEnv["sink"], "pipeline": {"PIPELINE_BATCH_MAX_ROWS=5000"},
	}, "pipeline")
}

// clickHouseDown runs names as processes (with env added), stops ClickHouse 60 s
// and checks the memory of capped and the oracle.
func clickHouseDown(t *testing.T, names []string, extra map[string][]string, capped string) {
	bin := build(t)
	ns := runNATS(t)
	srv := chtest.Start(t)
	chs, conn := chtest.Database(t, srv)
	nc, js := ns.connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	env := []string{"NATS_URL=" + ns.url(), "SLUICE_APPLY_TOPOLOGY=false",
		"CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_DATA_DIR=" + t.TempDir(),
		"SINK_BATCH_MAX_ROWS=20000"}
	var all []*svc
	var watched *svc
	for _, name := range names {
		s := startService(t, bin, name, append(slices.Clone(env), extra[name]...))
		all = append(all, s)
		if name == capped {
			watched = s
		}
	}
	for _, s := range all {
		s.waitReady(t)
	}
	outputs := func() string {
		var b strings.Builder
		for _, s := range all {
			fmt.Fprintf(&b, "--- %s\n%s", s.name, s.output())
		}
		return b.String()
	}
	m := oracle.NewManifest(oracle.Spec{Total: 60_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 5})
	first := &oracle.Manifest{Publishes: m.Publishes[:20_000]}
	rest := &oracle.Manifest{Publishes: m.Publishes[20_000:]}
	if err := first.PublishAll(nc, 200); err != nil {
		t.Fatal(err)
	}
	if err := oracle.WaitFor(ctx, time.Minute, func() error {
		var n uint64
		if err := conn.QueryRow(ctx, "SELECT count() FROM events").Scan(&n); err != nil || n == 0 {
			return fmt.Errorf("%d rows, %v", n, err)
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, outputs())
	}
	dir := srv.Dir
	_, portText, _ := net.SplitHostPort(srv.Addr)
	port, _ := strconv.Atoi(portText)
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	down := time.Now()
	if err := rest.PublishAll(nc, 200); err != nil {
		t.Fatal(err)
	}
	peak := int64(0)
	for time.Since(down) < 60*time.Second {
		_, rss := procstat.Usage(watched.cmd.Process.Pid)
		peak = max(peak, rss)
		time.Sleep(500 * time.Millisecond)
	}
	_, hwm := procstat.Usage(watched.cmd.Process.Pid)
	peak = max(peak, hwm)
	t.Logf("%s peak RSS while ClickHouse was down: %.0f MiB", capped, float64(peak)/(1<<20))
	if peak > sinkMemoryCap {
		t.Fatalf("%s peak RSS %d MiB, over the %d MiB cap", capped, peak>>20, sinkMemoryCap>>20)
	}
	if capped == "sink" {
		info, err := js.Consumer(ctx, streams.Enriched, "sink")
		if err != nil {
			t.Fatal(err)
		}
		ci, err := info.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		stream, err := js.Stream(ctx, streams.Enriched)
		if err != nil {
			t.Fatal(err)
		}
		// Not NumPending: the sink may have had every message delivered (and given
		// back with a delay) by now; what it must not have done is ack them all.
		if last := stream.CachedInfo().State.LastSeq; ci.AckFloor.Stream >= last {
			t.Fatalf("nothing waited for ClickHouse: the sink acked up to %d of %d while it was down", ci.AckFloor.Stream, last)
		}
	}
	srv2, err := chserver.Start(ctx, dir, port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv2.Stop() })
	var rows uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM events").Scan(&rows); err == nil && rows >= uint64(len(m.Events)) {
		t.Fatalf("%d rows as soon as ClickHouse was back: nothing waited for it?", rows)
	}
	if err := oracle.WaitFor(ctx, 3*time.Minute, func() error {
		c, err := oracle.ReadCounts(ctx, conn)
		if err != nil {
			return err
		}
		if c.Events < uint64(len(m.Events)) || c.DeadLetters < uint64(len(m.Invalid)) {
			return fmt.Errorf("%+v", c)
		}
		idle := [][2]string{{streams.Enriched, "sink"}, {streams.DLQ, "sink"}}
		if capped != "sink" {
			idle = idle[1:]
		}
		for _, c := range idle {
			if err := natstest.Idle(ctx, js, c[0], c[1]); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("%v\n%s", err, outputs())
	}
	if err := m.Check(ctx, conn); err != nil {
		t.Fatal(err)
	}
}
