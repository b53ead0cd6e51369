package procs

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/test/oracle"
)

// Addresses of the network namespace TestWorkerCutOffFromNATS runs a worker in.
const (
	workerHostIP = "10.214.0.1"
	workerNSIP   = "10.214.0.2"
	workerNetns  = "sluice-worker"
	workerVeth   = "sluicewk0"
)

// vethNamespace makes network namespace netns joined to the host by a veth pair
// (the host's end veth at hostIP, the namespace's at nsIP, a /24), removed when t
// ends; what a killed earlier run left behind goes first. It needs root, iproute2
// and iptables.
func vethNamespace(t *testing.T, netns, veth, hostIP, nsIP string) {
	t.Helper()
	for _, tool := range []string{"ip", "iptables"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("this test needs %s (as root): apt-get install -y iproute2 iptables: %v", tool, err)
		}
	}
	_ = exec.Command("ip", "netns", "del", netns).Run()
	_ = exec.Command("ip", "link", "del", veth).Run()
	for _, args := range [][]string{
		{"netns", "add", netns},
		{"link", "add", veth, "type", "veth", "peer", "name", veth + "p"},
		{"link", "set", veth + "p", "netns", netns},
		{"addr", "add", hostIP + "/24", "dev", veth},
		{"link", "set", veth, "up"},
		{"netns", "exec", netns, "ip", "addr", "add", nsIP + "/24", "dev", veth + "p"},
		{"netns", "exec", netns, "ip", "link", "set", veth + "p", "up"},
		{"netns", "exec", netns, "ip", "link", "set", "lo", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s (this test needs root)", strings.Join(args, " "), err, out)
		}
	}
	t.Cleanup(func() {
		_ = exec.Command("ip", "netns", "del", netns).Run()
		_ = exec.Command("ip", "link", "del", veth).Run()
	})
}

// iptablesIn runs iptables with args in the worker's namespace.
func iptablesIn(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", append([]string{"netns", "exec", workerNetns, "iptables"}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("iptables %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// TestWorkerCutOffFromNATS: three pipeline workers share six partitions (two each) while
// 40,000 publishes flow. Worker 2 runs in a network namespace of its own and loses
// its link to NATS alone (every packet dropped, by iptables in its namespace) for
// 20 s, while it still reaches ClickHouse and NATS serves everyone else. Its
// partitions move to the other two within 15 s; when the link is back it finds its
// claims gone and writes nothing more for them (what it had on its way is dropped
// by the fence), then takes its share again. Every unique event lands once.
func TestWorkerCutOffFromNATS(t *testing.T) {
	const partitions = 6
	vethNamespace(t, workerNetns, workerVeth, workerHostIP, workerNSIP)
	r := newWorkerRig(t)
	ctx, conn, js := context.Background(), r.conn, r.js
	// Worker 2 reaches NATS and ClickHouse through links on the host's end of the
	// veth pair.
	natsLink := newLink(t, net.JoinHostPort(workerHostIP, "0"), strings.TrimPrefix(r.ns.url(), "nats://"), 0)
	chLink := newLink(t, net.JoinHostPort(workerHostIP, "0"), r.chs.Addr, 0)
	_, natsPort, _ := net.SplitHostPort(natsLink.addr)
	workerEnv := func(i int) []string {
		return []string{fmt.Sprintf("PIPELINE_REPLICA=w%d", i), fmt.Sprintf("SLUICE_PARTITIONS=%d", partitions),
			"PIPELINE_LEASE_TTL=3s", "PIPELINE_SNAPSHOT_INTERVAL=500ms"}
	}
	r.start("sink", "SINK_TABLES=dead_letters,alerts")
	workers := []*process{r.start("pipeline", workerEnv(0)...), r.start("pipeline", workerEnv(1)...),
		r.startIn(workerNetns, "pipeline", append(workerEnv(2), "NATS_URL=nats://"+natsLink.addr, "CLICKHOUSE_ADDR="+chLink.addr)...)}

	m := oracle.NewManifest(oracle.Spec{Total: 40_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 37})
	pubCtx, stopPub := context.WithTimeout(ctx, 10*time.Minute)
	defer stopPub()
	published := make(chan error, 1)
	go func() {
		// About 2,500 publishes a second, so the run outlasts the cut (the pause
		// paces the producer; it waits on no condition).
		published <- m.PublishAcked(pubCtx, js, 250, func() { time.Sleep(100 * time.Millisecond) })
	}()
	kv, err := js.KeyValue(ctx, pipeline.Bucket)
	if err != nil {
		t.Fatal(err)
	}
	owns := func(worker string) func() error {
		return func() error {
			for p := range partitions {
				if o, err := partition.Owner(ctx, kv, p); err == nil && o.Worker == worker {
					return nil
				}
			}
			return fmt.Errorf("%s owns no partition", worker)
		}
	}
	if err := oracle.WaitFor(ctx, time.Minute, owns("w2")); err != nil {
		t.Fatal(err)
	}
	// Worker 2 is writing: its generation's inserts are in events.
	if err := oracle.WaitFor(ctx, time.Minute, func() error {
		var n uint64
		if err := conn.QueryRow(ctx, "SELECT count() FROM partition_fences WHERE worker = 'w2'").Scan(&n); err != nil {
			return err
		}
		c, err := oracle.ReadCounts(ctx, conn)
		if err != nil {
			return err
		}
		if n == 0 || c.Events < uint64(len(m.Events))/5 {
			return fmt.Errorf("%d fences of w2, %d events", n, c.Events)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}

	cutAt := time.Now()
	iptablesIn(t, "-A", "OUTPUT", "-p", "tcp", "--dport", natsPort, "-j", "DROP")
	iptablesIn(t, "-A", "INPUT", "-p", "tcp", "--sport", natsPort, "-j", "DROP")
	if err := oracle.WaitFor(ctx, 15*time.Second, ownedBy(ctx, kv, partitions, "w0", "w1")); err != nil {
		t.Fatalf("worker 2 cut off from NATS: its partitions did not move within 15 s: %v", err)
	}
	t.Logf("worker 2 cut off from NATS: every partition moved off it in %s", time.Since(cutAt).Round(100*time.Millisecond))
	// The cut's length: the fault's duration, not a wait for a condition.
	time.Sleep(20*time.Second - time.Since(cutAt))
	iptablesIn(t, "-F")
	t.Log("worker 2's link to NATS is back after 20 s")

	if err := <-published; err != nil {
		t.Fatal(err)
	}
	waitDrained(t, ctx, conn, js, readBy(r.topo, []string{"pipeline", "sink"}), m, nil, 0)
	// Back, it takes its share again, and it noticed the loss.
	if err := oracle.WaitFor(ctx, time.Minute, owns("w2")); err != nil {
		t.Fatal(err)
	}
	for i, w := range workers {
		select {
		case <-w.done:
			t.Fatalf("worker %d exited (%v):\n%s", i, w.cmd.ProcessState, w.tail())
		default:
		}
	}
	out, err := os.ReadFile(workers[2].log)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "lost the partition") {
		t.Fatalf("worker 2's log does not say it lost its partitions:\n%s", workers[2].tail())
	}
}
