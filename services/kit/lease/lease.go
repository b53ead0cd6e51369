// Package lease makes one replica of a service the holder of a named lease in a
// NATS KV bucket, so that one at a time does what must not run twice at once.
package lease

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Lease makes one replica the leader: the holder writes its name and an expiry to a
// KV key and renews it, compare-and-set on the key's revision, every third of the
// TTL. Another replica takes the key over only once the expiry has passed. A holder
// that cannot renew within two thirds of the TTL stops leading before another may
// start.
type Lease struct {
	KV     jetstream.KeyValue
	Key    string
	Holder string
	TTL    time.Duration
	// What names what the holder does, in logs ("routes alerts").
	What string
	Log  *slog.Logger
}

type leaseValue struct {
	Holder  string    `json:"holder"`
	Expires time.Time `json:"expires"`
}

// Run calls lead with a context that ends when the lease is lost or ctx ends, each
// time this replica acquires the lease, until ctx ends.
func (l *Lease) Run(ctx context.Context, lead func(context.Context)) {
	t := time.NewTicker(l.TTL / 3)
	defer t.Stop()
	var (
		rev     uint64
		renewed time.Time
		current *leader
	)
	defer func() { current.stop() }()
	for {
		now := time.Now()
		r, err := l.Acquire(ctx, rev, current != nil, now)
		switch {
		case err == nil:
			rev, renewed = r, now
			if current == nil {
				l.Log.Info("this replica holds the lease now: it "+l.What, "lease", l.Key, "holder", l.Holder)
				current = startLeader(ctx, lead)
			}
		case current != nil && (errors.Is(err, ErrTaken) || time.Since(renewed) > l.TTL*2/3):
			// Stop before the lease can have expired for the others.
			l.Log.Warn("lost the lease; stopping", "lease", l.Key, "err", err)
			current.stop()
			current, rev = nil, 0
		case current != nil:
			l.Log.Warn("renewing the lease", "lease", l.Key, "err", err)
		}
		select {
		case <-ctx.Done():
			if current != nil {
				// Hand over at once: the next replica need not wait for the expiry.
				current.stop()
				current = nil
				dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.TTL/3)
				_ = l.KV.Delete(dctx, l.Key, jetstream.LastRevision(rev))
				cancel()
			}
			return
		case <-t.C:
		}
	}
}

// leader is a running lead function.
type leader struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func startLeader(ctx context.Context, lead func(context.Context)) *leader {
	lctx, cancel := context.WithCancel(ctx)
	l := &leader{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(l.done)
		lead(lctx)
	}()
	return l
}

// stop ends the lead function and waits for it (nil: nothing to stop).
func (l *leader) stop() {
	if l == nil {
		return
	}
	l.cancel()
	<-l.done
}

// ErrTaken is Acquire's answer when another replica holds the lease.
var ErrTaken = errors.New("lease held by another replica")

// Acquire creates, renews (held: at rev) or takes over (expired) the lease and
// returns the new revision.
func (l *Lease) Acquire(ctx context.Context, rev uint64, held bool, now time.Time) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, l.TTL/3)
	defer cancel()
	next, _ := json.Marshal(leaseValue{Holder: l.Holder, Expires: now.Add(l.TTL)})
	if held {
		r, err := l.KV.Update(ctx, l.Key, next, rev)
		if isConflict(err) {
			return 0, ErrTaken
		}
		return r, err
	}
	e, err := l.KV.Get(ctx, l.Key)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		r, err := l.KV.Create(ctx, l.Key, next)
		if isConflict(err) {
			return 0, ErrTaken
		}
		return r, err
	case err != nil:
		return 0, err
	}
	var cur leaseValue
	if err := json.Unmarshal(e.Value(), &cur); err != nil {
		return 0, fmt.Errorf("lease %s: %w", l.Key, err)
	}
	if cur.Holder != l.Holder && now.Before(cur.Expires) {
		return 0, ErrTaken
	}
	r, err := l.KV.Update(ctx, l.Key, next, e.Revision())
	if isConflict(err) {
		return 0, ErrTaken
	}
	return r, err
}

// isConflict reports a compare-and-set that lost: the key exists (Create) or
// changed (Update).
func isConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch)
}
