package compose

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestComposeCluster brings up the clustered profile (compose.cluster.yaml: three
// NATS nodes, every stream and bucket in three copies, two pipeline workers) and
// runs the oracle through it while containers are cut off the network (docker
// network disconnect: a NATS node; the pipeline worker that holds the partition,
// whose claim the other takes over) and killed (the first NATS node, and the
// worker holding the partition). Every unique event lands once, every invalid one
// in dead_letters, every alert reaches the receiver once.
func TestComposeCluster(t *testing.T) {
	s := newStack(t, "cluster", "compose.cluster.yaml", "test/compose/compose.cluster.override.yaml")
	h := newHook(t)
	s.env = append(s.env, fmt.Sprintf("SLUICE_TEST_NATS_PORT=%d", testnet.FreePort(t)), fmt.Sprintf("SLUICE_TEST_NATS2_PORT=%d", testnet.FreePort(t)),
		fmt.Sprintf("SLUICE_TEST_NATS3_PORT=%d", testnet.FreePort(t)), fmt.Sprintf("SLUICE_TEST_CLICKHOUSE_PORT=%d", testnet.FreePort(t)))
	s.writeConfig(hookConfig(h))
	s.up()
	s.urls = []string{s.addr("nats", 4222), s.addr("nats-2", 4222), s.addr("nats-3", 4222)}
	ch := openClickHouse(t, s.addr("clickhouse", 9000), s.Passwords["CLICKHOUSE_PASSWORD"])
	const parts = 6
	r := newOracleRun(t, s, h, oracle.Spec{Total: 24_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 43}, parts)

	// Every stream is in three copies on three nodes.
	for _, name := range []string{"EVENTS", "ALERTS", "DLQ", "NOTIFY", "KV_" + pipeline.Bucket, "OBJ_" + pipeline.Bucket} {
		st, err := r.js.Stream(context.Background(), name)
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		if info := st.CachedInfo(); info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
			t.Fatalf("stream %s: %d replicas configured, cluster %+v; want 3 copies", name, info.Config.Replicas, info.Cluster)
		}
	}
	if err := r.publish(r.part(0)); err != nil {
		t.Fatal(err)
	}
	network := s.project + "_default"
	r.during(t, 1, "nats-2 cut off for 20 s", func() {
		node := s.container("nats-2")
		s.docker("network", "disconnect", network, node)
		time.Sleep(20 * time.Second) // how long the fault lasts
		s.docker("network", "connect", "--alias", "nats-2", network, node)
	})
	r.during(t, 2, "the worker holding the partition cut off until the other took it over, and 10 s more", func() {
		worker := s.owner(r)
		s.docker("network", "disconnect", network, worker)
		// The other worker takes the partition over.
		s.waitOwner(r, func(c string) bool { return c != worker })
		time.Sleep(10 * time.Second) // the cut-off worker stays away a while longer
		s.docker("network", "connect", "--alias", "pipeline", network, worker)
	})
	r.during(t, 3, "killed and started nats (the first node)", func() {
		s.kill("nats")
		s.up("nats")
	})
	r.during(t, 4, "killed the worker holding the partition", func() {
		worker := s.owner(r)
		s.docker("kill", "--signal", "SIGKILL", worker)
		s.waitOwner(r, func(c string) bool { return c != worker })
		s.up("pipeline")
	})
	if err := r.publish(r.part(parts - 1)); err != nil {
		t.Fatal(err)
	}
	r.check(t, ch)
	s.noViolations("nats", "nats-2", "nats-3")
}

// owner is the container of the pipeline worker holding partition 0: worker names
// begin with their host name, which in a container is its short id.
func (s *stack) owner(r *oracleRun) string {
	s.t.Helper()
	var id string
	s.waitOwner(r, func(c string) bool { id = c; return true })
	return id
}

// waitOwner waits until a pipeline container holds partition 0 and ok takes it.
func (s *stack) waitOwner(r *oracleRun, ok func(container string) bool) {
	s.t.Helper()
	poll.Until(s.t, 2*time.Minute, func() error {
		// Looked up each time: a node just restarted may leave a request unanswered.
		kv, err := r.js.KeyValue(context.Background(), pipeline.Bucket)
		if err != nil {
			return err
		}
		o, err := partition.Owner(context.Background(), kv, 0)
		if err != nil {
			return err
		}
		if o.Worker == "" {
			return fmt.Errorf("no worker holds partition 0")
		}
		for _, c := range strings.Fields(s.must("ps", "--quiet", "--no-trunc", "pipeline")) {
			if strings.HasPrefix(o.Worker, c[:12]+"-") {
				if !ok(c) {
					return fmt.Errorf("partition 0 is still held by %s", o.Worker)
				}
				return nil
			}
		}
		return fmt.Errorf("partition 0 is held by %s, no running pipeline container", o.Worker)
	})
}
