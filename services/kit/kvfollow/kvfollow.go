// Package kvfollow keeps a view in step with a NATS KV bucket: each key's current
// value first, then every change, for as long as the view is wanted.
//
// A nats.go watch alone does not: when it cannot make its consumer again (the bucket
// was deleted, the JetStream API did not answer) it ends, and when the bucket was
// deleted and made again before its consumer noticed, it goes on from the old
// bucket's next revision and misses the new bucket's first values. A follower watches
// again in both cases, from the bucket's current values, and removes from the view
// the keys the bucket no longer has.
package kvfollow

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/streams"
)

// Config says what to follow.
type Config struct {
	KV jetstream.KeyValue
	// Keys are the keys to follow (wildcards allowed); none means every key.
	Keys []string
	// Check is how often the bucket is asked whether it is still the one watched;
	// 5 s when zero.
	Check time.Duration
	// Retry is the first wait before watching again after a failed watch (doubling
	// up to 30 s); 1 s when zero.
	Retry time.Duration
	Log   *slog.Logger
}

// Follow calls apply with each followed key's current value (deletions included, as
// the watch delivers them), returns once they are all in, then calls apply with each
// change until ctx ends or stop is called; stop returns once apply is no longer
// called. apply is called from one goroutine at a time. When the bucket is watched
// again, keys it no longer holds are applied as deletions (jetstream.KeyValueDelete,
// with the new watch's last revision).
func Follow(ctx context.Context, c Config, apply func(jetstream.KeyValueEntry)) (stop func(), err error) {
	if c.Check <= 0 {
		c.Check = 5 * time.Second
	}
	if c.Retry <= 0 {
		c.Retry = time.Second
	}
	f := &follower{c: c, apply: apply, keys: map[string]bool{}}
	// Asked again while JetStream does not answer in time (a server just restarted).
	var w jetstream.KeyWatcher
	if err := streams.Again(ctx, func(ctx context.Context) (err error) {
		w, err = f.watch(ctx)
		return err
	}); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		f.follow(ctx, w)
	}()
	return func() { cancel(); <-done }, nil
}

type follower struct {
	c     Config
	apply func(jetstream.KeyValueEntry)
	// keys are the keys the view holds a value of (a failed watch's puts included,
	// so that the next watch removes them when the bucket no longer has them).
	keys map[string]bool
	// created is when the watched bucket's stream was made.
	created time.Time
}

// watch reads the bucket's creation time, watches it, and applies its current values
// (and, after the first watch, deletions of the keys it no longer has).
func (f *follower) watch(ctx context.Context) (jetstream.KeyWatcher, error) {
	bucket := f.c.KV.Bucket()
	created, err := f.streamCreated(ctx)
	if err != nil {
		return nil, fmt.Errorf("KV bucket %s: %w", bucket, err)
	}
	w, err := f.c.KV.WatchFiltered(ctx, f.c.Keys)
	if err != nil {
		return nil, fmt.Errorf("watch KV bucket %s: %w", bucket, err)
	}
	now := map[string]bool{}
	var last uint64
	for e := range w.Updates() {
		if e == nil { // the current values are all in
			for k := range f.keys {
				if !now[k] {
					delete(f.keys, k)
					f.apply(removed{bucket: bucket, key: k, revision: last})
				}
			}
			f.created = created
			return w, nil
		}
		last = max(last, e.Revision())
		if f.track(e) {
			now[e.Key()] = true
		}
		f.apply(e)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return nil, fmt.Errorf("watch KV bucket %s: the watch ended before the current values were in", bucket)
}

// track records whether the view holds a value of e's key after e, and returns it.
func (f *follower) track(e jetstream.KeyValueEntry) bool {
	if e.Operation() == jetstream.KeyValuePut {
		f.keys[e.Key()] = true
		return true
	}
	delete(f.keys, e.Key())
	return false
}

func (f *follower) streamCreated(ctx context.Context) (time.Time, error) {
	st, err := f.c.KV.Status(ctx)
	if err != nil {
		return time.Time{}, err
	}
	bs, ok := st.(*jetstream.KeyValueBucketStatus)
	if !ok {
		return time.Time{}, fmt.Errorf("unexpected status type %T", st)
	}
	return bs.StreamInfo().Created, nil
}

func (f *follower) follow(ctx context.Context, w jetstream.KeyWatcher) {
	defer func() {
		if w != nil { // nil when ctx ended while watching again
			stopWatch(w)
		}
	}()
	tick := time.NewTicker(f.c.Check)
	defer tick.Stop()
	bucket := f.c.KV.Bucket()
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				if ctx.Err() != nil {
					return
				}
				f.c.Log.Warn("the watch of a KV bucket ended; watching it again", "bucket", bucket)
				w = f.rewatch(ctx, nil)
				if w == nil {
					return
				}
				continue
			}
			if e == nil {
				continue
			}
			f.track(e)
			f.apply(e)
		case <-tick.C:
			created, err := f.streamCreated(ctx)
			switch {
			case ctx.Err() != nil:
				return
			case errors.Is(err, jetstream.ErrStreamNotFound):
				f.c.Log.Warn("KV bucket is gone; keeping its last values and watching for it", "bucket", bucket)
			case err != nil:
				f.c.Log.Warn("KV bucket's status not read", "bucket", bucket, "err", err)
				continue
			case created.Equal(f.created):
				continue
			default:
				f.c.Log.Warn("KV bucket was made again; loading its values", "bucket", bucket)
			}
			w = f.rewatch(ctx, w)
			if w == nil {
				return
			}
		}
	}
}

// rewatch stops old (when not nil) and watches again until a watch loads or ctx
// ends (nil then).
func (f *follower) rewatch(ctx context.Context, old jetstream.KeyWatcher) jetstream.KeyWatcher {
	if old != nil {
		stopWatch(old)
	}
	wait := f.c.Retry
	for {
		w, err := f.watch(ctx)
		if err == nil {
			f.c.Log.Info("KV bucket watched again", "bucket", f.c.KV.Bucket(), "keys", len(f.keys))
			return w
		}
		if ctx.Err() != nil {
			return nil
		}
		f.c.Log.Warn("KV bucket not watched; keeping its last values", "bucket", f.c.KV.Bucket(), "retry_in", wait, "err", err)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		wait = min(2*wait, 30*time.Second)
	}
}

// stopWatch stops w and reads what it still delivers until it closes: nats.go's
// delivery blocks on a full channel, and would never end otherwise.
func stopWatch(w jetstream.KeyWatcher) {
	_ = w.Stop()
	for range w.Updates() {
	}
}

// removed is a key's deletion, for a key the bucket no longer has when watched again.
type removed struct {
	bucket, key string
	revision    uint64
}

func (r removed) Bucket() string                  { return r.bucket }
func (r removed) Key() string                     { return r.key }
func (r removed) Value() []byte                   { return nil }
func (r removed) Revision() uint64                { return r.revision }
func (r removed) Created() time.Time              { return time.Time{} }
func (r removed) Delta() uint64                   { return 0 }
func (r removed) Operation() jetstream.KeyValueOp { return jetstream.KeyValueDelete }
