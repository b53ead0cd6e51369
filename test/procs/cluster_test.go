package procs

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// natsCluster is three nats-server processes in one JetStream cluster. Nodes 0 and
// 1 listen on the host's end of a veth pair; node 2 runs in its own network
// namespace at the other end, so cut can drop every packet between it and the rest
// (real packet loss, by iptables in its namespace) while it keeps running.
type natsCluster struct {
	nodes    []*natsProcess
	monitors []string
	netns    string
}

// Addresses of the veth pair runCluster creates.
const (
	clusterHostIP = "10.213.0.1"
	clusterNSIP   = "10.213.0.2"
	clusterNetns  = "sluice-test"
	clusterVeth   = "sluicetest0"
)

// runCluster builds nats-server and runs a 3-node cluster until the test ends. It
// needs root and iproute2 and iptables (apt-get install iproute2 iptables).
func runCluster(t *testing.T) *natsCluster {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "nats-server")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/nats-io/nats-server/v2").CombinedOutput(); err != nil {
		t.Fatalf("build nats-server: %v\n%s", err, out)
	}
	vethNamespace(t, clusterNetns, clusterVeth, clusterHostIP, clusterNSIP)

	c := &natsCluster{netns: clusterNetns}
	hosts := []string{clusterHostIP, clusterHostIP, clusterNSIP}
	ports := make([][3]int, 3) // client, cluster, monitor
	for i := range ports {
		for j := range 3 {
			_, p, _ := net.SplitHostPort(testnet.FreeAddr(t))
			ports[i][j], _ = strconv.Atoi(p)
		}
	}
	var routes []string
	for i, h := range hosts {
		routes = append(routes, fmt.Sprintf("%q", "nats://"+net.JoinHostPort(h, strconv.Itoa(ports[i][1]))))
	}
	for i, h := range hosts {
		conf := filepath.Join(dir, fmt.Sprintf("n%d.conf", i))
		// A link that drops packets shows no error: only missed pings end it. The
		// default (a ping every 2 minutes, 2 unanswered) keeps the pooled routes
		// to a cut-off node open for minutes, and requests JetStream sends a
		// replica over them (direct gets) go unanswered that long.
		text := fmt.Sprintf(`server_name: n%d
ping_interval: "2s"
ping_max: 3
listen: %q
http: %q
jetstream { store_dir: %q }
cluster {
  name: sluice
  no_advertise: true
  listen: %q
  routes: [%s]
}
`, i, net.JoinHostPort(h, strconv.Itoa(ports[i][0])), net.JoinHostPort(h, strconv.Itoa(ports[i][2])),
			filepath.Join(dir, fmt.Sprintf("store%d", i)), net.JoinHostPort(h, strconv.Itoa(ports[i][1])), strings.Join(routes, ", "))
		if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		n := &natsProcess{bin: bin, port: ports[i][0], conf: conf, host: h, log: filepath.Join(dir, fmt.Sprintf("n%d.log", i))}
		if i == 2 {
			n.netns = clusterNetns
		}
		c.nodes = append(c.nodes, n)
		c.monitors = append(c.monitors, "http://"+net.JoinHostPort(h, strconv.Itoa(ports[i][2])))
	}
	for _, n := range c.nodes {
		n.launch(t)
		t.Cleanup(n.kill)
	}
	for i := range c.nodes {
		c.waitHealthy(t, i)
	}
	return c
}

// connect connects to the nodes at urls (reconnecting for ever; closed when the
// test ends) and applies sluice's topology with every stream in three copies.
func (c *natsCluster) connect(t *testing.T, urls string) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, js := dial(t, urls)
	if err := service.ApplyTopology(context.Background(), nc, 3); err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// urls is every node's client URL, comma-separated, as NATS_URL takes them.
func (c *natsCluster) urls() string {
	var u []string
	for _, n := range c.nodes {
		u = append(u, n.url())
	}
	return strings.Join(u, ",")
}

// waitHealthy waits until node i says, on its monitoring port, that it and its
// JetStream assets are current (/healthz answers 200).
func (c *natsCluster) waitHealthy(t *testing.T, i int) {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	// A node killed mid-run catches up on every stream's copy (the partitions' hold
	// the run's events): on a slow day that took more than two minutes once.
	poll.Until(t, 5*time.Minute, func() error {
		resp, err := client.Get(c.monitors[i] + "/healthz")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 500))
			return fmt.Errorf("node %d: /healthz: %s: %s", i, resp.Status, bytes.TrimSpace(body))
		}
		return nil
	})
}

// restart SIGKILLs node i and starts it again on its store, then waits until it
// is current.
func (c *natsCluster) restart(t *testing.T, i int) {
	t.Helper()
	c.nodes[i].kill()
	c.nodes[i].launch(t)
	c.waitHealthy(t, i)
}

// leaderOf is the index of the node leading stream, or with consumer set, the
// stream's consumer.
func leaderOf(ctx context.Context, js jetstream.JetStream, stream, consumer string) (int, error) {
	var cluster *jetstream.ClusterInfo
	if consumer == "" {
		s, err := js.Stream(ctx, stream)
		if err != nil {
			return 0, err
		}
		info, err := s.Info(ctx)
		if err != nil {
			return 0, err
		}
		cluster = info.Cluster
	} else {
		c, err := js.Consumer(ctx, stream, consumer)
		if err != nil {
			return 0, err
		}
		info, err := c.Info(ctx)
		if err != nil {
			return 0, err
		}
		cluster = info.Cluster
	}
	if cluster == nil || cluster.Leader == "" {
		return 0, fmt.Errorf("%s %s has no leader", stream, consumer)
	}
	return strconv.Atoi(strings.TrimPrefix(cluster.Leader, "n"))
}

// cut drops every packet into and out of node 2's namespace (its peers, and
// clients connected to it, see nothing: no reset, no close) until heal.
func (c *natsCluster) cut(t *testing.T) {
	t.Helper()
	for _, rule := range [][]string{{"INPUT", "!", "-i", "lo"}, {"OUTPUT", "!", "-o", "lo"}} {
		args := append([]string{"netns", "exec", c.netns, "iptables", "-A"}, rule...)
		if out, err := exec.Command("ip", append(args, "-j", "DROP")...).CombinedOutput(); err != nil {
			t.Fatalf("iptables: %v\n%s", err, out)
		}
	}
}

// heal ends cut.
func (c *natsCluster) heal(t *testing.T) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "exec", c.netns, "iptables", "-F").CombinedOutput(); err != nil {
		t.Fatalf("iptables -F: %v\n%s", err, out)
	}
}

// TestClusterFaults runs three pipeline workers sharing eight partitions, with a
// match rule evaluated by their one alert runner, the sink and notify (a signed
// webhook), on a 3-node JetStream cluster with every stream and bucket in three copies
// (SLUICE_STREAM_REPLICAS=3), while 300,000 publishes (repeats and invalid input
// among them) flow. Meanwhile: the node leading EVENTS is SIGKILLed and restarted;
// workers are SIGKILLed and restarted five times in all; a fourth worker joins, and
// later stops cleanly (its partitions must move within 15 s); node 2 — the only
// server worker 2 knows — is cut off from everything by dropped packets for 30 s, and
// every partition must move off worker 2 while it lasts; then the node leading the
// keying step's consumer is SIGKILLed and restarted. Every unique event lands in
// ClickHouse once (worker 2, back on the network, wrote nothing after losing its
// partitions), every invalid one in dead_letters, every alert once in the alerts
// table and once (by webhook-id) at the webhook, and each partition ends owned by a
// worker.
func TestClusterFaults(t *testing.T) {
	const partitions = 8
	bin := build(t)
	dir := t.TempDir()
	cl := runCluster(t)
	srv := chtest.Start(t)
	chs, conn := chtest.Database(t, srv)
	// The test and every process but worker 2 use nodes 0 and 1, so cutting node 2
	// off cuts off worker 2 alone (the nodes do not advertise each other to
	// clients: a client reconnects only to the servers it was given).
	majority := cl.nodes[0].url() + "," + cl.nodes[1].url()
	_, js := cl.connect(t, majority)
	ctx := context.Background()
	topo := shortAckWaits(t, js)
	// One event in a thousand fires a match rule, evaluated across the partitions
	// by the workers' one alert runner, and reaches a signed webhook through notify.
	hook := newSignedHook(t)
	cfgPath := filepath.Join(dir, "sluice.yaml")
	cfg := fmt.Sprintf("dedup:\n  window: 1h\nrules:\n  - name: every-thousandth\n    filter: 'int(data.n) %% 1000 == 0'\n    severity: info\n"+
		"receivers:\n  - {name: hook, url: %q, secret_env: [HOOK_SECRET], allow_private: true}\n", hook.URL)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	start := func(name, url string, env ...string) *process {
		return startProcess(t, bin, dir, name, append([]string{"NATS_URL=" + url, "METRICS_ADDR=", "LOG_LEVEL=info", "SLUICE_STREAM_REPLICAS=3",
			"SLUICE_APPLY_TOPOLOGY=false", "CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_CONFIG=" + cfgPath}, env...))
	}
	worker := func(i int) *process {
		t.Helper()
		url := majority
		if i == 2 {
			url = cl.nodes[2].url()
		}
		return start("pipeline", url, fmt.Sprintf("PIPELINE_REPLICA=w%d", i), fmt.Sprintf("SLUICE_PARTITIONS=%d", partitions),
			"PIPELINE_LEASE_TTL=3s", "PIPELINE_SNAPSHOT_INTERVAL=500ms")
	}
	start("sink", majority, "SINK_TABLES=dead_letters,alerts")
	start("notify", majority, "HOOK_SECRET="+hookSecret)
	workers := map[int]*process{0: worker(0), 1: worker(1), 2: worker(2)}
	alive := func(i int) {
		t.Helper()
		select {
		case <-workers[i].done:
			t.Fatalf("worker %d exited by itself (%v):\n%s", i, workers[i].cmd.ProcessState, workers[i].tail())
		default:
		}
	}
	kills := 0
	kill := func(i int) {
		t.Helper()
		alive(i)
		_ = workers[i].cmd.Process.Signal(syscall.SIGKILL)
		<-workers[i].done
		workers[i] = worker(i)
		kills++
		t.Logf("SIGKILLed worker %d and started it again (kill %d)", i, kills)
	}
	var kv jetstream.KeyValue
	if err := oracle.WaitFor(ctx, time.Minute, func() (err error) {
		kv, err = js.KeyValue(ctx, pipeline.Bucket)
		return err
	}); err != nil {
		t.Fatalf("bucket %s: %v", pipeline.Bucket, err)
	}
	// Every stream and the workers' bucket are kept in three copies.
	for _, name := range append(streamNames(topo), "KV_"+pipeline.Bucket, "OBJ_"+pipeline.Bucket) {
		s, err := streams.Ensure(ctx, func(ctx context.Context) (jetstream.Stream, error) { return js.Stream(ctx, name) })
		if err != nil {
			t.Fatal(err)
		}
		if r := s.CachedInfo().Config.Replicas; r != 3 {
			t.Fatalf("stream %s has %d replicas, want 3", name, r)
		}
	}

	// Publishing starts once every partition has restored (a restore writes the
	// first state): a partition that first starts with input already in its stream
	// marks the alerts of that input replays, which receivers are not sent.
	// The same holds for the alert runner's input.
	if err := oracle.WaitFor(ctx, time.Minute, func() error {
		rules, err := js.KeyValue(ctx, pipeline.RulesBucket)
		if err != nil {
			return err
		}
		if err := restored(ctx, rules, 1)(); err != nil {
			return fmt.Errorf("alert runner: %w", err)
		}
		return restored(ctx, kv, partitions)()
	}); err != nil {
		t.Fatal(err)
	}
	m := oracle.NewManifest(oracle.Spec{Total: 300_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 29})
	pubCtx, stopPub := context.WithTimeout(ctx, 15*time.Minute)
	defer stopPub()
	published := make(chan error, 1)
	go func() {
		// At most about 2,500 publishes a second, so the run outlasts the faults
		// (the pause paces the producer; it waits on no condition).
		published <- m.PublishAcked(pubCtx, js, 500, func() { time.Sleep(200 * time.Millisecond) })
	}()
	// Each fault waits for a share of the events to land, so it falls mid-run.
	landed := func(percent uint64) {
		t.Helper()
		want := uint64(len(m.Events)) * percent / 100
		if err := oracle.WaitFor(ctx, 5*time.Minute, func() error {
			c, err := oracle.ReadCounts(ctx, conn)
			if err != nil {
				return err
			}
			if c.Events < want {
				return fmt.Errorf("%d of %d events in ClickHouse", c.Events, want)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	leader := func(kind string, get func() (int, error)) int {
		t.Helper()
		var l int
		if err := oracle.WaitFor(ctx, time.Minute, func() (err error) { l, err = get(); return err }); err != nil {
			t.Fatalf("%s: %v", kind, err)
		}
		return l
	}

	landed(5)
	l := leader("EVENTS leader", func() (int, error) { return leaderOf(ctx, js, streams.Events, "") })
	cl.restart(t, l)
	t.Logf("SIGKILLed node %d (leading EVENTS) and started it again", l)

	landed(10)
	kill(0)
	landed(15)
	workers[3] = worker(3)
	t.Log("worker 3 joined")
	landed(20)
	kill(1)
	landed(25)
	kill(3)

	landed(30)
	alive(2)
	cutAt := time.Now()
	cl.cut(t)
	// The hand-over waits for the claims' TTL and, when node 2 led the bucket,
	// for the election of a new leader (4 to 9 s in nats-server): it must happen
	// while the cut lasts.
	if err := oracle.WaitFor(ctx, 25*time.Second, ownedBy(ctx, kv, partitions, "w0", "w1", "w3")); err != nil {
		t.Fatalf("node 2 and worker 2 cut off: the partitions did not move within 25 s: %v", err)
	}
	t.Logf("node 2 and worker 2 cut off: every partition moved off worker 2 in %s", time.Since(cutAt).Round(100*time.Millisecond))
	// The cut's length: the fault's duration, not a wait for a condition.
	time.Sleep(30*time.Second - time.Since(cutAt))
	cl.heal(t)
	cl.waitHealthy(t, 2)
	t.Log("healed the cut after 30 s")

	l = leader("partitioner leader", func() (int, error) { return leaderOf(ctx, js, streams.Events, "partitioner") })
	cl.restart(t, l)
	t.Logf("SIGKILLed node %d (leading the partitioner consumer) and started it again", l)

	landed(70)
	kill(0)
	landed(80)
	w := workers[3]
	alive(3)
	_ = w.cmd.Process.Signal(syscall.SIGTERM)
	<-w.done
	if !w.cmd.ProcessState.Success() {
		t.Fatalf("worker 3 did not stop cleanly (%v):\n%s", w.cmd.ProcessState, w.tail())
	}
	delete(workers, 3)
	stopped := time.Now()
	if err := oracle.WaitFor(ctx, 15*time.Second, ownedBy(ctx, kv, partitions, "w0", "w1", "w2")); err != nil {
		t.Fatalf("worker 3 stopped cleanly: its partitions did not move within 15 s: %v", err)
	}
	t.Logf("worker 3 stopped cleanly; its partitions moved in %s", time.Since(stopped).Round(100*time.Millisecond))
	landed(90)
	kill(2)

	if err := <-published; err != nil {
		t.Fatal(err)
	}
	waitDrained(t, ctx, conn, js, readBy(topo, []string{"pipeline", "sink", "notify"}), m, hook, (len(m.Events)+999)/1000)
	if err := natstest.Idle(ctx, js, streams.Events, "partitioner"); err != nil {
		t.Fatal(err)
	}
	for i := range workers {
		alive(i)
	}
	if err := oracle.WaitFor(ctx, time.Minute, ownedBy(ctx, kv, partitions, "w0", "w1", "w2")); err != nil {
		t.Fatal(err)
	}
}

func streamNames(topo *streams.Topology) []string {
	var names []string
	for _, s := range topo.Streams {
		names = append(names, s.Config.Name)
	}
	return names
}

// connectedTo is the index of the node a client connection named name is
// connected to, from the nodes' /connz.
func (c *natsCluster) connectedTo(t *testing.T, name string) int {
	t.Helper()
	client := &http.Client{Timeout: 2 * time.Second}
	var at int
	poll.Until(t, time.Minute, func() error {
		for i, m := range c.monitors {
			resp, err := client.Get(m + "/connz?limit=1024")
			if err != nil {
				continue // a node down answers nothing; the others may
			}
			var connz struct {
				Connections []struct {
					Name string `json:"name"`
				} `json:"connections"`
			}
			err = json.NewDecoder(resp.Body).Decode(&connz)
			resp.Body.Close()
			if err != nil {
				return fmt.Errorf("node %d: /connz: %w", i, err)
			}
			for _, conn := range connz.Connections {
				if conn.Name == name {
					at = i
					return nil
				}
			}
		}
		return fmt.Errorf("no node has a connection named %s", name)
	})
	return at
}
