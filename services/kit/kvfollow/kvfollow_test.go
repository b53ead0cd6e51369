package kvfollow

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/testlog"
	"github.com/sluicehq/sluice/services/kit/testnet"
)

// view is what apply made of the entries: key to value.
type view struct {
	mu   sync.Mutex
	m    map[string]string
	revs []uint64
}

func (v *view) apply(e jetstream.KeyValueEntry) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.revs = append(v.revs, e.Revision())
	if e.Operation() == jetstream.KeyValuePut {
		v.m[e.Key()] = string(e.Value())
		return
	}
	delete(v.m, e.Key())
}

func (v *view) is(want map[string]string) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !maps.Equal(v.m, want) {
		return fmt.Errorf("view %v, want %v", v.m, want)
	}
	return nil
}

func put(t *testing.T, kv jetstream.KeyValue, kvs ...string) {
	t.Helper()
	for i := 0; i < len(kvs); i += 2 {
		if _, err := kv.Put(context.Background(), kvs[i], []byte(kvs[i+1])); err != nil {
			t.Fatal(err)
		}
	}
}

// bucket makes bucket "b" on a server of its own, holding kvs (key, value, ...).
func bucket(t *testing.T, kvs ...string) (jetstream.JetStream, jetstream.KeyValue) {
	t.Helper()
	_, js := natstest.Run(t).Connect(t)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "b"})
	if err != nil {
		t.Fatal(err)
	}
	put(t, kv, kvs...)
	return js, kv
}

// The current values are in when Follow returns (a deleted key not among them);
// changes follow; only the keys asked for; nothing after stop.
func TestFollow(t *testing.T) {
	ctx := context.Background()
	_, kv := bucket(t, "a.1", "x", "a.2", "y", "b.1", "z", "a.3", "w")
	if err := kv.Delete(ctx, "a.3"); err != nil {
		t.Fatal(err)
	}
	v := &view{m: map[string]string{}}
	stop, err := Follow(ctx, Config{KV: kv, Keys: []string{"a.*"}, Log: slog.New(slog.DiscardHandler)}, v.apply)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.is(map[string]string{"a.1": "x", "a.2": "y"}); err != nil {
		t.Fatal(err)
	}
	put(t, kv, "a.1", "x2", "b.2", "q", "a.4", "n")
	if err := kv.Delete(ctx, "a.2"); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, func() error { return v.is(map[string]string{"a.1": "x2", "a.4": "n"}) })
	stop()
	put(t, kv, "a.5", "late")
	if _, err := kv.Get(ctx, "a.5"); err != nil {
		t.Fatal(err)
	}
	if err := v.is(map[string]string{"a.1": "x2", "a.4": "n"}); err != nil {
		t.Fatalf("after stop: %v", err)
	}
}

// A bucket deleted and made again with other keys: the view becomes the new
// bucket's (its keys, not the old ones), whether the follower notices through its
// check (made again before nats.go's watch noticed: the watch would go on from the
// old revision) or because nats.go ended the watch (the bucket gone when its
// consumer was made again).
func TestBucketMadeAgain(t *testing.T) {
	for _, tc := range []struct {
		name  string
		check time.Duration
		// gone waits, once the bucket is deleted, for the follower to notice.
		notice string
	}{
		{"check", 200 * time.Millisecond, "KV bucket is gone"},
		{"watch ended", time.Hour, "the watch of a KV bucket ended"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			js, kv := bucket(t, "k1", "old", "k2", "old", "k3", "old")
			v := &view{m: map[string]string{}}
			var logs testlog.Buffer
			stop, err := Follow(ctx, Config{KV: kv, Check: tc.check, Retry: 50 * time.Millisecond, Log: slog.New(slog.NewTextHandler(&logs, nil))}, v.apply)
			if err != nil {
				t.Fatal(err)
			}
			defer stop()
			if err := js.DeleteKeyValue(ctx, "b"); err != nil {
				t.Fatal(err)
			}
			poll.Until(t, 30*time.Second, func() error {
				if !strings.Contains(logs.String(), tc.notice) {
					return fmt.Errorf("no %q in the log: %s", tc.notice, logs.String())
				}
				return nil
			})
			// Gone: the last values are kept.
			if err := v.is(map[string]string{"k1": "old", "k2": "old", "k3": "old"}); err != nil {
				t.Fatalf("while the bucket is gone: %v", err)
			}
			kv2, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "b"})
			if err != nil {
				t.Fatal(err)
			}
			put(t, kv2, "k1", "new", "k4", "new")
			poll.Until(t, 30*time.Second, func() error { return v.is(map[string]string{"k1": "new", "k4": "new"}) })
			put(t, kv2, "k5", "new")
			poll.Until(t, 10*time.Second, func() error {
				return v.is(map[string]string{"k1": "new", "k4": "new", "k5": "new"})
			})
		})
	}
}

// Made again before the follower or nats.go noticed it was gone: the check sees a
// new bucket and loads it, though the new bucket's revisions are below the old one's.
func TestBucketMadeAgainUnnoticed(t *testing.T) {
	ctx := context.Background()
	js, kv := bucket(t, "k1", "old", "k2", "old", "k3", "old", "k4", "old")
	v := &view{m: map[string]string{}}
	stop, err := Follow(ctx, Config{KV: kv, Check: 300 * time.Millisecond, Log: slog.New(slog.DiscardHandler)}, v.apply)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if err := js.DeleteKeyValue(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	kv2, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "b"})
	if err != nil {
		t.Fatal(err)
	}
	put(t, kv2, "k1", "new")
	poll.Until(t, 10*time.Second, func() error { return v.is(map[string]string{"k1": "new"}) })
	v.mu.Lock()
	last := v.revs[len(v.revs)-1]
	v.mu.Unlock()
	if last != 1 {
		t.Fatalf("the last entry's revision %d, want the new bucket's 1", last)
	}
}

// Stopped while the bucket is gone (watching again, in the retry's wait or in a
// watch that fails): stop returns, and the follower ends without a watch to stop.
func TestStopWhileBucketGone(t *testing.T) {
	for _, tc := range []struct {
		name  string
		check time.Duration
	}{
		{"check", 100 * time.Millisecond},
		{"watch ended", time.Hour},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			js, kv := bucket(t, "k1", "old")
			var logs testlog.Buffer
			stop, err := Follow(ctx, Config{KV: kv, Check: tc.check, Retry: 20 * time.Millisecond, Log: slog.New(slog.NewTextHandler(&logs, nil))}, (&view{m: map[string]string{}}).apply)
			if err != nil {
				t.Fatal(err)
			}
			if err := js.DeleteKeyValue(ctx, "b"); err != nil {
				t.Fatal(err)
			}
			poll.Until(t, 30*time.Second, func() error {
				if !strings.Contains(logs.String(), "KV bucket not watched") {
					return fmt.Errorf("no failed watch in the log: %s", logs.String())
				}
				return nil
			})
			stopped := make(chan struct{})
			go func() { stop(); close(stopped) }()
			select {
			case <-stopped:
			case <-time.After(30 * time.Second):
				t.Fatal("stop did not return")
			}
		})
	}
}

// A follow begun while JetStream does not answer in time (the watch's requests
// unanswered for longer than their timeout, as from a server just restarted) asks
// again rather than failing, and follows once the server answers.
func TestFollowWhileJetStreamSilent(t *testing.T) {
	ctx := context.Background()
	ns := natstest.Run(t)
	_, js := ns.Connect(t)
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "b"})
	if err != nil {
		t.Fatal(err)
	}
	put(t, kv, "a", "x")
	f := testnet.NewFreezer(t, strings.TrimPrefix(ns.URL, "nats://"))
	nc, err := nats.Connect("nats://" + f.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	pjs, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	pkv, err := pjs.KeyValue(ctx, "b")
	if err != nil {
		t.Fatal(err)
	}
	// The bucket's status is answered; what the client sends after it is held.
	f.HoldAfterAnswer()
	v := &view{m: map[string]string{}}
	var stop func()
	done := make(chan error, 1)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		var err error
		stop, err = Follow(ctx, Config{KV: pkv, Log: slog.New(slog.DiscardHandler)}, v.apply)
		done <- err
	})
	// Longer than a request's timeout (5 s): the watch's first ask goes unanswered.
	select {
	case err := <-done:
		t.Fatalf("Follow returned while JetStream was silent: %v", err)
	case <-time.After(6 * time.Second):
	}
	if f.Held() == 0 {
		t.Fatal("nothing the client sent was held: the fault did not happen")
	}
	f.Release()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Follow: %v", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Follow did not return within a minute of JetStream answering again")
	}
	defer stop()
	if err := v.is(map[string]string{"a": "x"}); err != nil {
		t.Fatal(err)
	}
	put(t, kv, "a", "y")
	poll.Until(t, time.Minute, func() error { return v.is(map[string]string{"a": "y"}) })
}
