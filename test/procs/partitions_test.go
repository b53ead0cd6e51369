package procs

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestPartitionedWorkersKill9: three pipeline workers share eight partitions
// against a nats-server process while 40,000 publishes (repeats and invalid input
// among them) flow; a worker is SIGKILLed four times (and started again), a fourth
// worker joins and one stops cleanly. Every unique event lands once, every invalid
// one in dead_letters, and each partition ends owned by a running worker.
func TestPartitionedWorkersKill9(t *testing.T) {
	const partitions = 8
	bin := build(t)
	dir := t.TempDir()
	ns := runNATS(t)
	srv := chtest.Start(t)
	chs, conn := chtest.Database(t, srv)
	nc, js := ns.connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc); err != nil {
		t.Fatal(err)
	}
	topo := shortAckWaits(t, js)
	cfgPath := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte("dedup:\n  window: 1h\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	type running struct {
		cmd  *exec.Cmd
		done chan struct{}
		log  string
	}
	start := func(name string, env ...string) *running {
		c := exec.Command(filepath.Join(bin, name))
		c.Env = append(cleanEnv(), "NATS_URL="+ns.url(), "METRICS_ADDR=", "LOG_LEVEL=info", "SLUICE_APPLY_TOPOLOGY=false",
			"CLICKHOUSE_ADDR="+chs.Addr, "CLICKHOUSE_DATABASE="+chs.Database, "SLUICE_CONFIG="+cfgPath)
		c.Env = append(c.Env, env...)
		logPath := filepath.Join(dir, fmt.Sprintf("%s-%d.log", name, time.Now().UnixNano()))
		logFile, err := os.Create(logPath)
		if err != nil {
			t.Fatal(err)
		}
		c.Stdout, c.Stderr = logFile, logFile
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		logFile.Close()
		r := &running{cmd: c, done: make(chan struct{}), log: logPath}
		go func() { _ = c.Wait(); close(r.done) }()
		t.Cleanup(func() { _ = c.Process.Kill(); <-r.done })
		return r
	}
	worker := func(i int) *running {
		return start("pipeline", fmt.Sprintf("PIPELINE_REPLICA=w%d", i), fmt.Sprintf("SLUICE_PARTITIONS=%d", partitions),
			"PIPELINE_LEASE_TTL=3s", "PIPELINE_SNAPSHOT_INTERVAL=500ms")
	}
	start("sink", "SINK_TABLES=dead_letters,alerts")
	workers := map[int]*running{0: worker(0), 1: worker(1), 2: worker(2)}

	m := oracle.NewManifest(oracle.Spec{Total: 40_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 23})
	pubCtx, stopPub := context.WithTimeout(ctx, 10*time.Minute)
	defer stopPub()
	published := make(chan error, 1)
	go func() {
		// About 5,000 publishes a second, so the run outlasts the faults.
		published <- m.PublishAcked(pubCtx, js, 500, func() { time.Sleep(100 * time.Millisecond) })
	}()
	rng := rand.New(rand.NewPCG(23, 24))
	for round := range 4 {
		time.Sleep(time.Duration(500+rng.IntN(1000)) * time.Millisecond)
		victim := rng.IntN(3)
		w := workers[victim]
		select {
		case <-w.done:
			out, _ := os.ReadFile(w.log)
			t.Fatalf("worker %d exited by itself (%v):\n%s", victim, w.cmd.ProcessState, out[max(0, len(out)-3000):])
		default:
		}
		_ = w.cmd.Process.Signal(syscall.SIGKILL)
		<-w.done
		workers[victim] = worker(victim)
		t.Logf("round %d: SIGKILLed worker %d", round+1, victim)
		if round == 1 {
			workers[3] = worker(3)
			t.Log("worker 3 joined")
		}
		if round == 2 {
			w := workers[0]
			_ = w.cmd.Process.Signal(syscall.SIGTERM)
			<-w.done
			if !w.cmd.ProcessState.Success() {
				out, _ := os.ReadFile(w.log)
				t.Fatalf("worker 0 did not stop cleanly (%v):\n%s", w.cmd.ProcessState, out[max(0, len(out)-3000):])
			}
			delete(workers, 0)
			t.Log("worker 0 stopped cleanly")
		}
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	waitDrained(t, ctx, conn, js, readBy(topo, []string{"pipeline", "sink"}), m, nil, 0)
	// The keying step acked all of EVENTS.
	if err := natstest.Idle(ctx, js, streams.Events, "partitioner"); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, pipeline.Bucket)
	if err != nil {
		t.Fatal(err)
	}
	if err := oracle.WaitFor(ctx, time.Minute, func() error {
		for p := range partitions {
			o, err := partition.Owner(ctx, kv, p)
			if err != nil {
				return err
			}
			if o.Worker != "w1" && o.Worker != "w2" && o.Worker != "w3" {
				return fmt.Errorf("partition %d owned by %q", p, o.Worker)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
