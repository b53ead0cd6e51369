package procs

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/streams"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestCombinedFaults runs two replicas of every service as processes against a
// nats-server process while 200,000 publishes flow (5% repeats, 1% invalid, one
// event in a thousand firing an alert to a webhook), and meanwhile kills a replica
// of each service in turn with SIGKILL, five times each, and the NATS server twice;
// producers publish through JetStream and retry what was not acknowledged. Then,
// with no help, every consumer drains and the oracle holds: each unique valid event
// in ClickHouse once, each invalid one in dead_letters, each alert in the alerts
// table once and at the webhook under one webhook-id with a valid signature.
func TestCombinedFaults(t *testing.T) {
	combinedFaults(t, services, nil, nil)
}

// TestCombinedFaultsPipeline is TestCombinedFaults with the pipeline stage: two
// pipeline workers of one partition (one runs it, one waits to take it over), notify
// and the sink. Each round kills the running pipeline worker, found by the claim.
func TestCombinedFaultsPipeline(t *testing.T) {
	combinedFaults(t, pipelineServices, pipelineEnv, func(ctx context.Context, js jetstream.JetStream) (int, error) {
		kv, err := js.KeyValue(ctx, pipeline.Bucket)
		if err != nil {
			return 0, err
		}
		o, err := partition.Owner(ctx, kv, 0)
		if err != nil {
			return 0, err
		}
		return strconv.Atoi(strings.TrimPrefix(o.Worker, "pipeline"))
	})
}

// combinedFaults runs two replicas of each of names with env added, kills one of
// each in turn (the one leader says, when set and it knows), and checks the oracle.
func combinedFaults(t *testing.T, names []string, env map[string][]string, leader func(context.Context, jetstream.JetStream) (int, error)) {
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

	hook := newSignedHook(t)
	cfgPath := writeAlertConfig(t, dir, hook)
	startSvc := func(name string, replica int) *process {
		env := append([]string{"NATS_URL=" + ns.url(), "METRICS_ADDR=", "LOG_LEVEL=info", "SLUICE_APPLY_TOPOLOGY=false",
			"CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_CONFIG=" + cfgPath, "HOOK_SECRET=" + hookSecret,
			"SLUICE_DATA_DIR=" + filepath.Join(dir, "state", name+strconv.Itoa(replica)),
			"PIPELINE_REPLICA=" + name + strconv.Itoa(replica), "PIPELINE_LEASE_TTL=3s"}, env[name]...)
		return startProcess(t, bin, dir, name, env)
	}
	procs := map[string][2]*process{}
	for _, name := range names {
		procs[name] = [2]*process{startSvc(name, 0), startSvc(name, 1)}
	}

	// Publishing starts once the rules have a state (a restore writes the first):
	// a first start with input already in the stream marks the alerts of that
	// input replays, which receivers are not sent.
	if err := oracle.WaitFor(ctx, time.Minute, rulesRestored(ctx, js, slices.Contains(names, "pipeline"))); err != nil {
		t.Fatal(err)
	}
	const total = 200_000
	m := oracle.NewManifest(oracle.Spec{Total: total, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 17})
	pubCtx, stopPub := context.WithTimeout(ctx, 10*time.Minute)
	defer stopPub()
	published := make(chan error, 1)
	go func() {
		// About 10,000 publishes a second, so the run outlasts the faults.
		published <- m.PublishAcked(pubCtx, js, 1000, func() { time.Sleep(100 * time.Millisecond) })
	}()
	rng := rand.New(rand.NewPCG(17, 18))
	for round := range 5 {
		for _, name := range names {
			time.Sleep(time.Duration(200+rng.IntN(400)) * time.Millisecond)
			pair := procs[name]
			victim := (round + rng.IntN(2)) % 2
			if leader != nil && name == "pipeline" {
				if l, err := leader(ctx, js); err == nil && (l == 0 || l == 1) {
					victim = l
				}
			}
			p := pair[victim]
			select {
			case <-p.done:
				t.Fatalf("%s replica %d exited by itself (%v):\n%s", name, victim, p.cmd.ProcessState, p.tail())
			default:
			}
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.done
			pair[victim] = startSvc(name, victim)
			procs[name] = pair
		}
		if round == 1 || round == 3 {
			ns.kill()
			ns.start(t)
			t.Logf("round %d: killed and restarted nats-server", round+1)
		}
		t.Logf("round %d: killed a replica of each service", round+1)
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	wantAlerts := (len(m.Events) + 999) / 1000
	waitDrained(t, ctx, conn, js, readBy(topo, names), m, hook, wantAlerts)
}

// rulesRestored returns a condition: the alert rules have a state, the pipeline's
// partition (one) or the alert stage's.
func rulesRestored(ctx context.Context, js jetstream.JetStream, pipelined bool) func() error {
	return func() error {
		if pipelined {
			kv, err := js.KeyValue(ctx, pipeline.Bucket)
			if err != nil {
				return err
			}
			return restored(ctx, kv, 1)()
		}
		store, err := js.ObjectStore(ctx, alert.StateBucket)
		if err != nil {
			return err
		}
		_, err = store.GetInfo(ctx, "state")
		return err
	}
}

// readBy is topo without the consumers no process of names reads: with the
// pipeline, nothing reads EVENTS, UNIQUE or ENRICHED through a durable; without it,
// nothing reads the pipeline workers' keying consumer (partitioner, used with more
// than one partition; the tests that run it check it themselves).
func readBy(topo *streams.Topology, names []string) *streams.Topology {
	pipeline := slices.Contains(names, "pipeline")
	out := &streams.Topology{Streams: topo.Streams}
	for _, c := range topo.Consumers {
		if c.Stream == streams.Events && c.Config.Durable == "partitioner" {
			continue
		}
		if pipeline && (c.Stream == streams.Events || c.Stream == streams.Unique || c.Stream == streams.Enriched) {
			continue
		}
		out.Consumers = append(out.Consumers, c)
	}
	return out
}
