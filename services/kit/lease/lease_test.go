package lease

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
)

func testKV(t *testing.T) jetstream.KeyValue {
	t.Helper()
	_, js := natstest.Run(t).Connect(t)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "leases"})
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

func testLease(kv jetstream.KeyValue, holder string, ttl time.Duration) *Lease {
	return &Lease{KV: kv, Key: "lease", Holder: holder, TTL: ttl, What: "tests", Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
}

// Acquire creates the lease, renews it for its holder, refuses another replica until
// it expires, then lets that replica take it over; the old holder's renewal then
// fails as taken.
func TestAcquire(t *testing.T) {
	kv := testKV(t)
	ctx := context.Background()
	a, b := testLease(kv, "a", time.Second), testLease(kv, "b", time.Second)
	now := time.Now()
	revA, err := a.Acquire(ctx, 0, false, now)
	if err != nil {
		t.Fatal(err)
	}
	if revA, err = a.Acquire(ctx, revA, true, now.Add(300*time.Millisecond)); err != nil {
		t.Fatalf("renewal: %v", err)
	}
	if _, err := b.Acquire(ctx, 0, false, now.Add(time.Second)); !errors.Is(err, ErrTaken) {
		t.Fatalf("b before the renewed lease expired: %v, want ErrTaken", err)
	}
	if _, err := b.Acquire(ctx, 0, false, now.Add(1400*time.Millisecond)); err != nil {
		t.Fatalf("b after the lease expired: %v", err)
	}
	if _, err := a.Acquire(ctx, revA, true, now.Add(1500*time.Millisecond)); !errors.Is(err, ErrTaken) {
		t.Fatalf("a renewing a lease b took over: %v, want ErrTaken", err)
	}
}

// Run leads one replica at a time: the second leads only once the first stops, and
// at once (the first hands over) rather than after the TTL.
func TestRunHandsOver(t *testing.T) {
	kv := testKV(t)
	const ttl = 3 * time.Second
	var leading atomic.Int32
	var led [2]atomic.Bool
	run := func(ctx context.Context, i int) {
		testLease(kv, []string{"a", "b"}[i], ttl).Run(ctx, func(ctx context.Context) {
			if leading.Add(1) > 1 {
				t.Error("two replicas lead at once")
			}
			led[i].Store(true)
			<-ctx.Done()
			leading.Add(-1)
		})
	}
	ctxA, stopA := context.WithCancel(context.Background())
	doneA := make(chan struct{})
	go func() { defer close(doneA); run(ctxA, 0) }()
	poll.Until(t, 5*time.Second, func() error {
		if !led[0].Load() {
			return errors.New("a does not lead")
		}
		return nil
	})
	ctxB, stopB := context.WithCancel(context.Background())
	doneB := make(chan struct{})
	go func() { defer close(doneB); run(ctxB, 1) }()
	defer func() { stopB(); <-doneB }()
	time.Sleep(ttl / 2) // b must not lead while a holds the lease
	if led[1].Load() {
		t.Fatal("b leads while a holds the lease")
	}
	stopped := time.Now()
	stopA()
	<-doneA
	poll.Until(t, 5*time.Second, func() error {
		if !led[1].Load() {
			return errors.New("b does not lead")
		}
		return nil
	})
	// b retries every TTL/3; the handover spares it waiting out the TTL.
	if took := time.Since(stopped); took > ttl*2/3 {
		t.Errorf("b took over %s after a stopped, want within a third of the TTL (%s) plus a little", took, ttl/3)
	}
}
