package procs

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/streams"
)

// TestAlertWindowsDiskKill9: a pipeline worker (one partition) evaluates a
// per-user count threshold with its groups on disk (alert.store: disk, three of
// twenty groups in memory) and saves its state every 300 ms as incremental
// checkpoints, while 20,000 events flow; it is SIGKILLed five times at random
// moments (during evaluations, evictions to disk, captures and checkpoint
// uploads) and started again on the same data directory. ALERTS's duplicate
// window is cut to 100 ms, so only the worker's state and its check of what it
// published keep a change from coming twice: the alert changes in ALERTS must be,
// by id, those of one engine fed the input in order.
func TestAlertWindowsDiskKill9(t *testing.T) {
	r := newWorkerRig(t)
	ctx, js := context.Background(), r.js
	s, err := js.Stream(ctx, streams.Alerts)
	if err != nil {
		t.Fatal(err)
	}
	scfg := s.CachedInfo().Config
	scfg.Duplicates = 100 * time.Millisecond
	if _, err := js.UpdateStream(ctx, scfg); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(t.TempDir(), "sluice.yaml")
	const rules = `dedup:
  window: 1h
alert:
  store: disk
  hot_groups: 3
rules:
  - name: failed-logins
    kind: threshold
    filter: type == "login.failed"
    group_by: [data.user]
    window: 1s
    step: 100ms
    allowed_lateness: 15s
    op: ">"
    threshold: 3
`
	if err := os.WriteFile(cfgPath, []byte(rules), 0o644); err != nil {
		t.Fatal(err)
	}
	const total = 20_000
	// Event i: 10 ms of event time apart, 12 of every 40 a burst of failed logins
	// of one of twenty users in turn; the last 50 hours later, closing every
	// window.
	at := time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC)
	input := func(i int) []byte {
		typ, when := "test.created", at.Add(time.Duration(i)*10*time.Millisecond)
		switch {
		case i >= total-50:
			when = at.Add(3 * time.Hour)
		case i%40 < 12:
			typ = "login.failed"
		}
		return fmt.Appendf(nil, `{"id":"w-%d","source":"shop","type":%q,"time":%q,"data":{"user":"u%d"}}`,
			i, typ, when.Format(time.RFC3339Nano), i/40%20)
	}
	want := alertOracle(t, cfgPath, total, input)
	dataDir := t.TempDir()
	worker := func() *process {
		return r.start("pipeline", "PIPELINE_REPLICA=w0", "SLUICE_PARTITIONS=1", "PIPELINE_LEASE_TTL=3s",
			"PIPELINE_SNAPSHOT_INTERVAL=300ms", "SLUICE_CONFIG="+cfgPath, "SLUICE_DATA_DIR="+dataDir)
	}
	w := worker()
	// The worker makes its buckets.
	var kv jetstream.KeyValue
	var objects jetstream.ObjectStore
	poll.Until(t, time.Minute, func() error {
		var err error
		if kv, err = js.KeyValue(ctx, pipeline.Bucket); err == nil {
			objects, err = js.ObjectStore(ctx, pipeline.Bucket)
		}
		return err
	})
	// state reads the partition's saved state: its position and alert checkpoint.
	type stateHead struct {
		Seq        uint64          `json:"seq"`
		Checkpoint []alert.Segment `json:"alert_checkpoint"`
	}
	state := func() (stateHead, error) {
		var head stateHead
		o, err := partition.Owner(ctx, kv, 0)
		if err != nil {
			return head, err
		}
		if o.State == "" {
			return head, errors.New("no state saved yet")
		}
		b, err := objects.GetBytes(ctx, o.State)
		if err != nil {
			return head, err
		}
		n := binary.BigEndian.Uint32(b)
		return head, json.Unmarshal(b[4:4+n], &head)
	}
	// saved returns a condition: the worker saved a state past seq (or of the
	// whole input).
	saved := func(seq uint64) func() error {
		return func() error {
			head, err := state()
			if err == nil && head.Seq <= seq && head.Seq < total {
				err = fmt.Errorf("the state is at %d, not past %d yet", head.Seq, seq)
			}
			return err
		}
	}
	poll.Until(t, time.Minute, func() error {
		_, err := state()
		return err
	})
	published := make(chan error, 1)
	go func() {
		for i := range total {
			if _, err := js.Publish(ctx, "events.shop.login", input(i)); err != nil {
				published <- err
				return
			}
			if i%500 == 499 {
				// About 5,000 publishes a second, so the run outlasts the faults (the
				// pause paces the producer; it waits on no condition).
				time.Sleep(100 * time.Millisecond)
			}
		}
		published <- nil
	}()
	rng := rand.New(rand.NewPCG(31, 32))
	var last uint64
	for round := range 5 {
		// Once the worker (started again) saved a state past the last, at a random
		// moment after that (the fault's timing, not a wait for a condition).
		poll.Until(t, time.Minute, saved(last))
		head, _ := state()
		last = head.Seq
		time.Sleep(time.Duration(rng.IntN(700)) * time.Millisecond)
		select {
		case <-w.done:
			t.Fatalf("the worker exited by itself (%v):\n%s", w.cmd.ProcessState, w.tail())
		default:
		}
		_ = w.cmd.Process.Signal(syscall.SIGKILL)
		<-w.done
		w = worker()
		t.Logf("round %d: SIGKILLed the worker", round+1)
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	var got []string
	poll.Until(t, 3*time.Minute, func() error {
		// The state covers the whole input: everything it caused is stored.
		head, err := state()
		if err != nil {
			return err
		}
		if head.Checkpoint == nil {
			return errors.New("the state holds no alert checkpoint")
		}
		if head.Seq < total {
			return fmt.Errorf("the state covers %d of %d events", head.Seq, total)
		}
		if got, err = natstest.MsgIDs(ctx, js, streams.Alerts); err != nil {
			return err
		}
		if len(got) < len(want) {
			return fmt.Errorf("%d of %d alert changes", len(got), len(want))
		}
		return nil
	})
	slices.Sort(got)
	if len(want) < 100 || !slices.Equal(got, want) {
		t.Fatalf("%d alert changes, the oracle %d:\n got %q\nwant %q", len(got), len(want), got, want)
	}
	if dirs, _ := filepath.Glob(filepath.Join(dataDir, "pipeline", "alert", "groups-*")); len(dirs) == 0 {
		t.Fatal("the worker kept no alert groups on disk")
	}
	t.Logf("%d alert changes, each once", len(got))
}

// alertOracle is the sorted ids of the alert changes one engine gives, under the
// rules of the config file at path, for the first n events of input.
func alertOracle(t *testing.T, path string, n int, input func(i int) []byte) []string {
	t.Helper()
	f, err := configfile.Load(path)
	if err != nil {
		t.Fatal(err)
	}
	rules, err := alert.LoadRules(f)
	if err != nil {
		t.Fatal(err)
	}
	e := alert.NewEngine(rules, nil)
	var want []string
	for i := range n {
		ev, err := events.Unmarshal(input(i))
		if err != nil {
			t.Fatal(err)
		}
		out, _ := e.Observe(alert.Env(ev))
		for _, a := range out {
			want = append(want, alerts.MsgID(a))
		}
	}
	slices.Sort(want)
	return want
}
