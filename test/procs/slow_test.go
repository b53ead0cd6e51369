package procs

import (
	"context"
	"io"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestSlowHandlers runs the services as processes against a nats-server process,
// with dedup and enrich handlers 2.5 s slower than the 2 s ack wait on 0.5% of
// events (SLUICE_TEST_SLOW), while 2,000 publishes flow. Each stage keeps the
// message it works on from redelivery (InProgress); messages waiting behind it
// may be redelivered, and the next hop drops what they produce again. Pass: the
// oracle holds and every consumer drains by itself.
func TestSlowHandlers(t *testing.T) {
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
	for _, name := range services {
		env := []string{"NATS_URL=" + ns.url(), "METRICS_ADDR=", "LOG_LEVEL=error", "SLUICE_APPLY_TOPOLOGY=false",
			"CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_DATA_DIR=" + filepath.Join(dir, name)}
		if name == "dedup" || name == "enrich" {
			env = append(env, "SLUICE_TEST_SLOW=0.005:2500ms")
		}
		c := exec.Command(filepath.Join(bin, name))
		c.Env = append(cleanEnv(), env...)
		c.Stdout, c.Stderr = io.Discard, io.Discard
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = c.Wait(); close(done) }()
		t.Cleanup(func() { _ = c.Process.Kill(); <-done })
	}
	m := oracle.NewManifest(oracle.Spec{Total: 2000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 23})
	if err := m.PublishAcked(ctx, js, 200, nil); err != nil {
		t.Fatal(err)
	}
	topo = readBy(topo, services)
	waitDrained(t, ctx, conn, js, topo, m, nil, 0)
	for _, c := range topo.Consumers {
		if info, err := js.Consumer(ctx, c.Stream, c.Config.Durable); err == nil {
			t.Logf("%s/%s: %d redelivered", c.Stream, c.Config.Durable, info.CachedInfo().NumRedelivered)
		}
	}
}
