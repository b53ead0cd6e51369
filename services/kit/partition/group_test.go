package partition_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/testlog"
)

// owners records which worker runs which partition, and fails the test if two run
// one partition at once.
type owners struct {
	t  *testing.T
	mu sync.Mutex
	by map[int]string
}

func (o *owners) run(worker string) func(context.Context, *partition.Claim) {
	return func(ctx context.Context, c *partition.Claim) {
		o.mu.Lock()
		if other, ok := o.by[c.Partition]; ok {
			o.t.Errorf("partition %d run by %s and %s at once", c.Partition, other, worker)
		}
		o.by[c.Partition] = worker
		o.mu.Unlock()
		<-ctx.Done()
		o.mu.Lock()
		delete(o.by, c.Partition)
		o.mu.Unlock()
	}
}

func (o *owners) counts() map[string]int {
	o.mu.Lock()
	defer o.mu.Unlock()
	out := map[string]int{}
	for _, w := range o.by {
		out[w]++
	}
	return out
}

func bucket(t *testing.T) jetstream.KeyValue {
	t.Helper()
	_, js := natstest.Run(t).Connect(t)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "test_group"})
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// Workers joining share the partitions; a worker stopping hands its partitions
// over at once; one that stops renewing (as if killed) loses them after the TTL.
func TestGroupSharesAndHandsOver(t *testing.T) {
	kv := bucket(t)
	const n, ttl = 8, 2 * time.Second
	o := &owners{t: t, by: map[int]string{}}
	log := slog.New(slog.DiscardHandler)
	type member struct {
		cancel context.CancelFunc
		done   chan error
	}
	start := func(name string) member {
		ctx, cancel := context.WithCancel(context.Background())
		m := member{cancel: cancel, done: make(chan error, 1)}
		g := &partition.Group{KV: kv, Partitions: n, Worker: name, TTL: ttl, Log: log}
		go func() { m.done <- g.Run(ctx, o.run(name)) }()
		t.Cleanup(func() { cancel(); <-m.done })
		return m
	}
	want := func(w map[string]int) func() error {
		return func() error {
			got := o.counts()
			if fmt.Sprint(got) != fmt.Sprint(w) {
				return fmt.Errorf("owners %v, want %v", got, w)
			}
			return nil
		}
	}
	a := start("a")
	poll.Until(t, 10*time.Second, want(map[string]int{"a": n}))
	start("b")
	poll.Until(t, 10*time.Second, want(map[string]int{"a": 4, "b": 4}))
	// A clean stop hands over within a tick, long before the TTL.
	stopped := time.Now()
	a.cancel()
	if err := <-a.done; err != nil {
		t.Fatal(err)
	}
	a.done <- nil
	poll.Until(t, 10*time.Second, want(map[string]int{"b": n}))
	if d := time.Since(stopped); d > 2*ttl {
		t.Fatalf("hand-over took %s", d)
	}
	// A worker of another partition count is refused.
	g := &partition.Group{KV: kv, Partitions: n + 1, Worker: "c", TTL: ttl, Log: log}
	if err := g.Run(context.Background(), o.run("c")); err == nil {
		t.Fatal("a worker with another partition count joined")
	}
}

// A claim taken over fails its next write with ErrLost and stops being valid; its
// holder's state pointer survives the takeover.
func TestClaimFencing(t *testing.T) {
	kv := bucket(t)
	const ttl = 1500 * time.Millisecond
	log := slog.New(slog.DiscardHandler)
	claims := make(chan *partition.Claim, 2)
	grab := func(ctx context.Context, c *partition.Claim) {
		claims <- c
		<-ctx.Done()
	}
	// Worker a claims the only partition.
	actx, acancel := context.WithCancel(context.Background())
	a := &partition.Group{KV: kv, Partitions: 1, Worker: "a", TTL: ttl, Log: log}
	adone := make(chan error, 1)
	go func() { adone <- a.Run(actx, grab) }()
	var ca *partition.Claim
	select {
	case ca = <-claims:
	case <-time.After(10 * time.Second):
		t.Fatal("a never claimed the partition")
	}
	if err := ca.SetState(context.Background(), "state-of-a"); err != nil {
		t.Fatal(err)
	}
	// Each run of the claim has a generation of its own, higher than the run's
	// before; the first's is the claim's, and writing a later one keeps the state.
	ga1, err := ca.NextGeneration(context.Background())
	if err != nil || ga1 != ca.Gen {
		t.Fatalf("a's first run: generation %d (%v), want the claim's %d", ga1, err, ca.Gen)
	}
	ga2, err := ca.NextGeneration(context.Background())
	if err != nil || ga2 <= ga1 {
		t.Fatalf("a's second run: generation %d (%v), want above %d", ga2, err, ga1)
	}
	if ca.State() != "state-of-a" {
		t.Fatalf("a's claim points at %q after a new generation, want state-of-a", ca.State())
	}
	freeze(t, kv, actx, acancel, adone)
	bctx, bcancel := context.WithCancel(context.Background())
	defer bcancel()
	b := &partition.Group{KV: kv, Partitions: 1, Worker: "b", TTL: ttl, Log: log}
	bdone := make(chan error, 1)
	go func() { bdone <- b.Run(bctx, grab) }()
	defer func() { bcancel(); <-bdone }()
	var cb *partition.Claim
	select {
	case cb = <-claims:
	case <-time.After(20 * time.Second):
		t.Fatal("b never took the partition over")
	}
	if cb.State() != "state-of-a" {
		t.Fatalf("b's claim points at state %q, want a's", cb.State())
	}
	if err := ca.Valid(); !errors.Is(err, partition.ErrLost) {
		t.Fatalf("a's claim still valid after b took over: %v", err)
	}
	if err := ca.SetState(context.Background(), "late-state-of-a"); !errors.Is(err, partition.ErrLost) {
		t.Fatalf("a's late write: %v, want ErrLost", err)
	}
	if _, err := ca.NextGeneration(context.Background()); !errors.Is(err, partition.ErrLost) {
		t.Fatalf("a's run after b took over: %v, want ErrLost", err)
	}
	if gb, err := cb.NextGeneration(context.Background()); err != nil || gb != cb.Gen || gb <= ga2 {
		t.Fatalf("b's first run: generation %d (%v), want the claim's %d, above a's %d", gb, err, cb.Gen, ga2)
	}
	if err := cb.SetState(context.Background(), "state-of-b"); err != nil {
		t.Fatal(err)
	}
}

// freeze ends worker a as a SIGKILL would, leaving its claim to go stale: the
// claim's key is first written again, unchanged, behind a's back, so that a's
// hand-over on stop fails its compare-and-set (a dead process makes none); then its
// heartbeat is removed.
func freeze(t *testing.T, kv jetstream.KeyValue, _ context.Context, cancel context.CancelFunc, done chan error) {
	t.Helper()
	// Bump the claim's revision behind a's back with the same value: a's hand-over
	// then fails (as a dead process's would not happen at all) and the value stays.
	e, err := kv.Get(context.Background(), "partition.0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Update(context.Background(), "partition.0", e.Value(), e.Revision()); err != nil {
		t.Fatal(err)
	}
	cancel()
	<-done
	if err := kv.Delete(context.Background(), "workers.a"); err != nil {
		t.Fatal(err)
	}
}

// lossyKV applies a claim's update and loses the answer when told to (a reply
// lost on the network: the caller times out).
type lossyKV struct {
	jetstream.KeyValue
	lose atomic.Bool
}

func (k *lossyKV) Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	r, err := k.KeyValue.Update(ctx, key, value, rev)
	if err == nil && strings.HasPrefix(key, "partition.") && k.lose.CompareAndSwap(true, false) {
		return 0, context.DeadlineExceeded
	}
	return r, err
}

// A claim write whose answer was lost but which the server applied does not cost
// the claim: the next write finds the stored value is the one it sent, carries on
// from its revision, and keeps the state pointer that write set (a renewal too).
// A value another worker wrote meanwhile is not taken for it: the claim is lost.
func TestClaimWriteAnswerLost(t *testing.T) {
	kv := &lossyKV{KeyValue: bucket(t)}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	claims := make(chan *partition.Claim, 1)
	ended := make(chan struct{})
	a := &partition.Group{KV: kv, Partitions: 1, Worker: "a", TTL: 3 * time.Second, Log: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() {
		done <- a.Run(ctx, func(ctx context.Context, c *partition.Claim) {
			claims <- c
			<-ctx.Done()
			close(ended)
		})
	}()
	defer func() { cancel(); <-done }()
	var c *partition.Claim
	select {
	case c = <-claims:
	case <-time.After(10 * time.Second):
		t.Fatal("a never claimed the partition")
	}
	stored := func() (string, uint64) {
		t.Helper()
		e, err := kv.Get(ctx, "partition.0")
		if err != nil {
			t.Fatal(err)
		}
		return string(e.Value()), e.Revision()
	}
	kv.lose.Store(true)
	if err := c.SetState(ctx, "s1"); err == nil || errors.Is(err, partition.ErrLost) {
		t.Fatalf("a write whose answer is lost: %v; want a timeout", err)
	}
	if v, _ := stored(); !strings.Contains(v, `"s1"`) {
		t.Fatalf("stored %s; the lost write was applied", v)
	}
	if err := c.SetState(ctx, "s2"); err != nil {
		t.Fatalf("the write after it: %v", err)
	}
	if v, _ := stored(); c.State() != "s2" || !strings.Contains(v, `"s2"`) {
		t.Fatalf("state %q, stored %s; want s2", c.State(), v)
	}
	// A renewal whose answer is lost, then the renewals after it.
	_, rev := stored()
	kv.lose.Store(true)
	poll.Until(t, 10*time.Second, func() error {
		if kv.lose.Load() {
			return errors.New("no renewal yet")
		}
		if _, r := stored(); r < rev+2 {
			return fmt.Errorf("revision %d: no renewal after the lost one yet", r)
		}
		return nil
	})
	if err := c.Valid(); err != nil {
		t.Fatalf("after a renewal's answer was lost: %v", err)
	}
	if v, _ := stored(); !strings.Contains(v, `"worker":"a"`) || !strings.Contains(v, `"s2"`) {
		t.Fatalf("stored %s; want a's claim with state s2", v)
	}
	select {
	case <-ended:
		t.Fatal("the partition was given up")
	default:
	}
	// Lost again, and another worker's value written behind a's back.
	kv.lose.Store(true)
	if err := c.SetState(ctx, "s3"); err == nil {
		t.Fatal("a write whose answer is lost succeeded")
	}
	_, rev = stored()
	if _, err := kv.KeyValue.Update(ctx, "partition.0", []byte(`{"worker":"b","state":"s3"}`), rev); err != nil {
		t.Fatal(err)
	}
	if err := c.SetState(ctx, "s4"); !errors.Is(err, partition.ErrLost) {
		t.Fatalf("a write after another worker's: %v; want ErrLost", err)
	}
}

// slowKV takes delay for each claim write once slow is set: a worker short of
// CPU, whose every round trip to the server waits to be scheduled.
type slowKV struct {
	jetstream.KeyValue
	delay time.Duration
	slow  atomic.Bool
}

func (k *slowKV) Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	if k.slow.Load() && strings.HasPrefix(key, "partition.") {
		select {
		case <-time.After(k.delay):
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
	return k.KeyValue.Update(ctx, key, value, rev)
}

// A worker whose claim writes each take a twelfth of the TTL keeps all 16 of its
// partitions: its renewals run together (one after another, the last would be
// written after two thirds of the TTL and lost). A write has a third of the TTL:
// the delay leaves a slow machine most of it.
func TestSlowRenewalsKeepTheClaims(t *testing.T) {
	const n = 16
	ttl := 4800 * time.Millisecond
	kv := &slowKV{KeyValue: bucket(t), delay: ttl / 12}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var started, ended atomic.Int32
	g := &partition.Group{KV: kv, Partitions: n, Worker: "a", TTL: ttl, Log: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() {
		done <- g.Run(ctx, func(ctx context.Context, c *partition.Claim) {
			started.Add(1)
			<-ctx.Done()
			ended.Add(1)
		})
	}()
	defer func() { cancel(); <-done }()
	poll.Until(t, 20*time.Second, func() error {
		if s := started.Load(); s < n {
			return fmt.Errorf("%d of %d partitions claimed", s, n)
		}
		return nil
	})
	kv.slow.Store(true)
	// Five rounds of renewals, each taking the delay at least.
	began := time.Now()
	poll.Until(t, 20*time.Second, func() error {
		if e := ended.Load(); e > 0 {
			t.Fatalf("%d partitions lost with slow claim writes", e)
		}
		if since := time.Since(began); since < 5*ttl/4 {
			return fmt.Errorf("%s of slow writes", since)
		}
		return nil
	})
	if s, e := started.Load(), ended.Load(); s != n || e != 0 {
		t.Fatalf("%d runs started and %d ended; want %d and none", s, e, n)
	}
}

// A worker stopped while it waits for a hand-over returns no error: the KV watch
// ends with the worker's context, and Run must not take that for a failure.
func TestStopDuringHandOver(t *testing.T) {
	_, js := natstest.Run(t).Connect(t)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "test_group"})
	if err != nil {
		t.Fatal(err)
	}
	stream, err := js.Stream(context.Background(), "KV_test_group")
	if err != nil {
		t.Fatal(err)
	}
	const n, ttl = 2, 400 * time.Millisecond
	log := slog.New(slog.DiscardHandler)
	for i := range 20 {
		handing, release := make(chan struct{}, n), make(chan struct{})
		var owned atomic.Int32
		slow := func(ctx context.Context, c *partition.Claim) {
			owned.Add(1)
			<-ctx.Done()
			handing <- struct{}{}
			<-release
		}
		actx, stopA := context.WithCancel(context.Background())
		a := &partition.Group{KV: kv, Partitions: n, Worker: fmt.Sprintf("a%d", i), TTL: ttl, Log: log}
		aDone := make(chan error, 1)
		go func() { aDone <- a.Run(actx, slow) }()
		poll.Until(t, 10*time.Second, func() error {
			if got := owned.Load(); got != n {
				return fmt.Errorf("a owns %d partitions, want %d", got, n)
			}
			return nil
		})
		bctx, stopB := context.WithCancel(context.Background())
		b := &partition.Group{KV: kv, Partitions: n, Worker: fmt.Sprintf("b%d", i), TTL: ttl, Log: log}
		bDone := make(chan error, 1)
		go func() { bDone <- b.Run(bctx, func(ctx context.Context, _ *partition.Claim) { <-ctx.Done() }) }()
		select {
		case <-handing: // a is in its hand-over, waiting for the run
		case <-time.After(10 * time.Second):
			t.Fatal("a did not hand a partition over to b")
		}
		stopA()
		// Let a's watch end (its consumer goes) before its hand-over does, as it
		// does when a run takes long to save its state.
		poll.Until(t, 10*time.Second, func() error {
			info, err := stream.Info(context.Background())
			if err != nil {
				return err
			}
			if info.State.Consumers != 1 {
				return fmt.Errorf("%d consumers on the bucket, want b's watch only", info.State.Consumers)
			}
			return nil
		})
		close(release)
		if err := <-aDone; err != nil {
			t.Fatalf("round %d: a stopped during a hand-over: %v", i, err)
		}
		stopB()
		if err := <-bDone; err != nil {
			t.Fatalf("round %d: b: %v", i, err)
		}
	}
}

// The group's bucket deleted (its watch ends: nats.go cannot make its consumer
// again) and made again: the worker goes on, loses its claims (the bucket's keys are
// gone), claims the partitions again in the new bucket and records the count there.
// It ended with "the watch of test_group ended" before.
func TestGroupBucketMadeAgain(t *testing.T) {
	_, js := natstest.Run(t).Connect(t)
	ctx := context.Background()
	cfg := jetstream.KeyValueConfig{Bucket: "test_group"}
	kv, err := js.CreateKeyValue(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	const n = 2
	var runs atomic.Int32
	o := &owners{t: t, by: map[int]string{}}
	run := o.run("a")
	var logs testlog.Buffer
	g := &partition.Group{KV: kv, Partitions: n, Worker: "a", TTL: 2 * time.Second, Log: slog.New(slog.NewTextHandler(&logs, nil))}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- g.Run(rctx, func(ctx context.Context, c *partition.Claim) { runs.Add(1); run(ctx, c) })
	}()
	defer func() { cancel(); <-done }()
	alive := func() {
		select {
		case err := <-done:
			done <- err
			t.Fatalf("the worker ended: %v", err)
		default:
		}
	}
	owned := func(want int32) func() error {
		return func() error {
			alive()
			if got := o.counts(); got["a"] != n || runs.Load() != want {
				return fmt.Errorf("owners %v after %d runs; want a owning %d after %d", got, runs.Load(), n, want)
			}
			return nil
		}
	}
	poll.Until(t, 10*time.Second, owned(n))
	if err := js.DeleteKeyValue(ctx, cfg.Bucket); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 60*time.Second, func() error {
		alive()
		if s := logs.String(); !strings.Contains(s, "KV bucket is gone") && !strings.Contains(s, "the watch of a KV bucket ended") {
			return errors.New("the worker has not noticed the bucket is gone")
		}
		return nil
	})
	kv2, err := js.CreateKeyValue(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 60*time.Second, owned(2*n))
	for p := range n {
		e, err := kv2.Get(ctx, fmt.Sprintf("partition.%d", p))
		if err != nil || !strings.Contains(string(e.Value()), `"worker":"a"`) {
			t.Fatalf("partition %d's claim in the new bucket: %v", p, err)
		}
	}
	if e, err := kv2.Get(ctx, "partitions"); err != nil || string(e.Value()) != fmt.Sprint(n) {
		t.Fatalf("the new bucket's partition count: %v", err)
	}
}
