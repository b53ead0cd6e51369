package procs

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestNotifyClusterNodeKills runs the notify stage as a process on a 3-node
// JetStream cluster (every stream and bucket in three copies) and SIGKILLs each
// node in turn, one of them the node notify is connected to: after every kill,
// the alerts published meanwhile still reach the receiver, each under one
// webhook-id.
func TestNotifyClusterNodeKills(t *testing.T) {
	bin := build(t)
	dir := t.TempDir()
	cl := runCluster(t)
	_, js := cl.connect(t, cl.urls())
	ctx := context.Background()
	hook := newSignedHook(t)
	cfgPath := filepath.Join(dir, "sluice.yaml")
	cfg := fmt.Sprintf("receivers:\n  - {name: hook, url: %q, secret_env: [HOOK_SECRET], allow_private: true}\n", hook.URL)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	p := startService(t, bin, "notify", []string{"NATS_URL=" + cl.urls(), "SLUICE_STREAM_REPLICAS=3", "SLUICE_APPLY_TOPOLOGY=false",
		"SLUICE_CONFIG=" + cfgPath, "HOOK_SECRET=" + hookSecret})
	p.waitReady(t)

	var sent atomic.Int64
	// publishOne publishes alert number sent, retrying while the cluster elects.
	publishOne := func() error {
		n := sent.Load()
		a := &alerts.Alert{Rule: "kills", Status: alerts.Firing, Severity: "warning",
			Labels: map[string]string{"n": fmt.Sprint(n)}, StartsAt: time.Now().UTC()}
		a.Fingerprint = alerts.Fingerprint(a.Rule, a.Labels)
		msg := nats.NewMsg(a.Subject())
		msg.Header.Set(nats.MsgIdHdr, alerts.MsgID(a))
		msg.Data, _ = json.Marshal(a)
		if err := oracle.WaitFor(ctx, time.Minute, func() error {
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			_, err := js.PublishMsg(pctx, msg)
			return err
		}); err != nil {
			return fmt.Errorf("publish alert %d: %w", n, err)
		}
		sent.Add(1)
		return nil
	}
	delivered := func(after string) {
		t.Helper()
		if err := oracle.WaitFor(ctx, 2*time.Minute, func() error {
			select {
			case <-p.done:
				return fmt.Errorf("notify exited:\n%s", p.output())
			default:
			}
			if ids, _ := hook.deliveries(); int64(len(ids)) < sent.Load() {
				return fmt.Errorf("%d of %d alerts delivered", len(ids), sent.Load())
			}
			return nil
		}); err != nil {
			// What the router's consumer holds, and where notify's goroutines are
			// (SIGQUIT prints them), say where it stopped.
			if c, cerr := js.Consumer(ctx, streams.Alerts, "notify"); cerr == nil {
				info, ierr := c.Info(ctx)
				b, _ := json.MarshalIndent(info, "", " ")
				t.Logf("consumer notify on ALERTS (%v): %s", ierr, b)
			}
			_ = p.cmd.Process.Signal(syscall.SIGQUIT)
			<-p.done
			t.Fatalf("%s: %v\nnotify's output:\n%s", after, err, p.output())
		}
	}
	for range 10 {
		if err := publishOne(); err != nil {
			t.Fatal(err)
		}
	}
	delivered("before any kill")
	// Alerts keep coming while nodes die: the kills fall while notify routes.
	pubCtx, stopPub := context.WithCancel(ctx)
	pubDone := make(chan struct{})
	go func() {
		defer close(pubDone)
		for pubCtx.Err() == nil {
			if err := publishOne(); err != nil {
				t.Error(err)
				return
			}
			select {
			case <-pubCtx.Done():
			case <-time.After(50 * time.Millisecond): // paces the producer; waits on no condition
			}
		}
	}()
	for round := range 4 {
		i := cl.connectedTo(t, "sluice-notify")
		cl.restart(t, i)
		t.Logf("round %d: SIGKILLed and restarted node %d, the one notify was connected to", round, i)
	}
	stopPub()
	<-pubDone
	delivered("after the kills")
	ids, bad := hook.deliveries()
	// A delivery whose ack a dying node lost is sent again, under the same
	// webhook-id (at least once; receivers drop repeats by the id).
	repeats := 0
	for _, n := range ids {
		repeats += n - 1
	}
	t.Logf("%d alerts delivered under %d webhook-ids, %d repeated deliveries", sent.Load(), len(ids), repeats)
	if int64(len(ids)) != sent.Load() || bad != 0 {
		t.Fatalf("%d webhook-ids (want %d), %d badly signed", len(ids), sent.Load(), bad)
	}
}
