package procs

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestPartitionedWorkersKill9: three pipeline workers share eight partitions
// against a nats-server process while 40,000 publishes (repeats and invalid input
// among them) flow; a worker is SIGKILLed four times (and started again), a fourth
// worker joins and one stops cleanly. Every unique event lands once, every invalid
// one in dead_letters, and each partition ends owned by a running worker.
func TestPartitionedWorkersKill9(t *testing.T) { partitionedWorkersKill9(t, "memory") }

// TestPartitionedWorkersKill9Disk is TestPartitionedWorkersKill9 with the dedup
// keys on disk (dedup.store: disk), each worker its own data dir, kept across its
// restarts like a machine's disk: SIGKILL lands during writes, compactions and
// checkpoint uploads (a checkpoint every 500 ms), partitions move to workers whose
// disks never held them.
func TestPartitionedWorkersKill9Disk(t *testing.T) { partitionedWorkersKill9(t, "disk") }

func partitionedWorkersKill9(t *testing.T, store string) {
	const partitions = 8
	r := newWorkerRig(t)
	ctx, conn, js, topo, start := context.Background(), r.conn, r.js, r.topo, r.start
	cfgPath := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte("dedup:\n  window: 1h\n  store: "+store+"\n  disk:\n    cache_mb: 16\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	dataDirs := t.TempDir()
	worker := func(i int) *process {
		return start("pipeline", fmt.Sprintf("PIPELINE_REPLICA=w%d", i), fmt.Sprintf("SLUICE_PARTITIONS=%d", partitions),
			"PIPELINE_LEASE_TTL=3s", "PIPELINE_SNAPSHOT_INTERVAL=500ms", "SLUICE_CONFIG="+cfgPath,
			"SLUICE_DATA_DIR="+filepath.Join(dataDirs, fmt.Sprint("w", i)))
	}
	start("sink", "SINK_TABLES=dead_letters,alerts")
	workers := map[int]*process{0: worker(0), 1: worker(1), 2: worker(2)}

	m := oracle.NewManifest(oracle.Spec{Total: 40_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 23})
	pubCtx, stopPub := context.WithTimeout(ctx, 10*time.Minute)
	defer stopPub()
	published := make(chan error, 1)
	go func() {
		// About 5,000 publishes a second, so the run outlasts the faults (the pause
		// paces the producer; it waits on no condition).
		published <- m.PublishAcked(pubCtx, js, 500, func() { time.Sleep(100 * time.Millisecond) })
	}()
	rng := rand.New(rand.NewPCG(23, 24))
	for round := range 4 {
		// The fault's timing: a random moment of the run, not a wait for a condition.
		time.Sleep(time.Duration(500+rng.IntN(1000)) * time.Millisecond)
		victim := rng.IntN(3)
		w := workers[victim]
		select {
		case <-w.done:
			t.Fatalf("worker %d exited by itself (%v):\n%s", victim, w.cmd.ProcessState, w.tail())
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
				t.Fatalf("worker 0 did not stop cleanly (%v):\n%s", w.cmd.ProcessState, w.tail())
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
	if err := oracle.WaitFor(ctx, time.Minute, ownedBy(ctx, kv, partitions, "w1", "w2", "w3")); err != nil {
		t.Fatal(err)
	}
	if store == "disk" {
		// The keys went through checkpoints on disk.
		objects, err := js.ObjectStore(ctx, pipeline.Bucket)
		if err != nil {
			t.Fatal(err)
		}
		infos, err := objects.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(infos, func(o *jetstream.ObjectInfo) bool { return strings.HasPrefix(o.Name, "keys.") }) {
			t.Fatal("no checkpoint files of keys on disk in the object store")
		}
	}
}

// workerRig is what a test of pipeline worker processes starts with: the binaries,
// a nats-server process with the topology applied (short ack waits), a ClickHouse
// database and a config file with a dedup window of an hour.
type workerRig struct {
	ns   *natsProcess
	chs  settings.ClickHouse
	conn driver.Conn
	js   jetstream.JetStream
	topo *streams.Topology
	// start runs a service as a process, startIn in a network namespace; env adds to
	// (and overrides) what every process gets.
	start   func(name string, env ...string) *process
	startIn func(netns, name string, env ...string) *process
	env     func(env []string) []string
}

func newWorkerRig(t *testing.T) *workerRig {
	t.Helper()
	bin := build(t)
	dir := t.TempDir()
	r := &workerRig{ns: runNATS(t)}
	srv := chtest.Start(t)
	r.chs, r.conn = chtest.Database(t, srv)
	nc, js := r.ns.connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	r.js, r.topo = js, shortAckWaits(t, js)
	cfgPath := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte("dedup:\n  window: 1h\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// env comes last: a variable it sets again wins.
	r.env = func(env []string) []string {
		return append([]string{"NATS_URL=" + r.ns.url(), "METRICS_ADDR=", "LOG_LEVEL=info",
			"SLUICE_APPLY_TOPOLOGY=false", "CLICKHOUSE_ADDR=" + r.chs.Addr, "CLICKHOUSE_DATABASE=" + r.chs.Database, "SLUICE_CONFIG=" + cfgPath}, env...)
	}
	// Each process has a data directory of its own (not ./data under the test's
	// directory, shared by every process and left in the source tree).
	own := func(env []string) []string { return r.env(append([]string{"SLUICE_DATA_DIR=" + t.TempDir()}, env...)) }
	r.start = func(name string, env ...string) *process { return startProcess(t, bin, dir, name, own(env)) }
	r.startIn = func(netns, name string, env ...string) *process {
		return startProcessIn(t, netns, bin, dir, name, own(env))
	}
	return r
}

// eachOwner returns a condition: check holds for the claim of each of the
// partitions.
func eachOwner(ctx context.Context, kv jetstream.KeyValue, partitions int, check func(p int, o partition.Ownership) error) func() error {
	return func() error {
		for p := range partitions {
			o, err := partition.Owner(ctx, kv, p)
			if err != nil {
				return err
			}
			if err := check(p, o); err != nil {
				return err
			}
		}
		return nil
	}
}

// restored reports whether every partition's owner saved its state (a run's
// restore ends by saving it).
func restored(ctx context.Context, kv jetstream.KeyValue, partitions int) func() error {
	return eachOwner(ctx, kv, partitions, func(p int, o partition.Ownership) error {
		if o.State == "" {
			return fmt.Errorf("partition %d (%s) has no state yet", p, o.Worker)
		}
		return nil
	})
}

// ownedBy returns a condition: each of the partitions is owned by one of workers.
func ownedBy(ctx context.Context, kv jetstream.KeyValue, partitions int, workers ...string) func() error {
	return eachOwner(ctx, kv, partitions, func(p int, o partition.Ownership) error {
		if !slices.Contains(workers, o.Worker) {
			return fmt.Errorf("partition %d owned by %q", p, o.Worker)
		}
		return nil
	})
}
