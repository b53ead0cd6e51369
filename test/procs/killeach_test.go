package procs

import (
	"context"
	"io"
	"math/rand/v2"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestKillEachService runs the five services as processes while 20,000 events flow
// (5% repeats, 1% invalid, some firing an alert to a webhook) and kills each service
// in turn with SIGKILL, twice each, restarting it every time. At the end: every
// unique valid event is in ClickHouse once, every invalid one in dead_letters, every
// alert in the alerts table once and at the webhook under one webhook-id with a
// valid signature.
func TestKillEachService(t *testing.T) {
	bin := build(t)
	ns := runNATS(t)
	srv := chtest.Start(t)
	chs, conn := chtest.Database(t, srv)
	nc, js := ns.connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	topo := shortAckWaits(t, js)
	hook := newSignedHook(t)
	dir := t.TempDir()
	cfgPath := writeAlertConfig(t, dir, hook)
	env := []string{"NATS_URL=" + ns.url(), "METRICS_ADDR=", "LOG_LEVEL=error", "SLUICE_APPLY_TOPOLOGY=false",
		"CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_CONFIG=" + cfgPath, "HOOK_SECRET=" + hookSecret,
		"SLUICE_DATA_DIR=" + filepath.Join(dir, "state")}
	type running struct {
		cmd  *exec.Cmd
		done chan struct{}
	}
	startSvc := func(name string) *running {
		c := exec.Command(filepath.Join(bin, name))
		c.Env = append(cleanEnv(), env...)
		c.Stdout, c.Stderr = io.Discard, io.Discard
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		r := &running{cmd: c, done: make(chan struct{})}
		go func() { _ = c.Wait(); close(r.done) }()
		t.Cleanup(func() { _ = c.Process.Kill(); <-r.done })
		return r
	}
	procs := map[string]*running{}
	for _, name := range services {
		procs[name] = startSvc(name)
	}
	// As in combinedFaults: input before the rules have a state would be replays.
	if err := oracle.WaitFor(ctx, time.Minute, rulesRestored(ctx, js, slices.Contains(services, "pipeline"))); err != nil {
		t.Fatal(err)
	}

	m := oracle.NewManifest(oracle.Spec{Total: 20_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 11})
	published := make(chan error, 1)
	go func() {
		// About 4,000 publishes a second, so the run outlasts the kills.
		for i := 0; i < len(m.Publishes); i += 400 {
			part := &oracle.Manifest{Publishes: m.Publishes[i:min(i+400, len(m.Publishes))]}
			if err := part.PublishAll(nc, 100); err != nil {
				published <- err
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		published <- nil
	}()
	rng := rand.New(rand.NewPCG(8, 9))
	for round := range 2 {
		for _, name := range services {
			time.Sleep(time.Duration(150+rng.IntN(250)) * time.Millisecond)
			p := procs[name]
			select {
			case <-p.done:
				t.Fatalf("%s exited by itself", name)
			default:
			}
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.done
			procs[name] = startSvc(name)
			t.Logf("round %d: killed and restarted %s", round+1, name)
		}
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	wantAlerts := (len(m.Events) + 999) / 1000 // data.n of every thousandth event
	waitDrained(t, ctx, conn, js, readBy(topo, services), m, hook, wantAlerts)
}
