package notify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// lease makes one notify replica the router: the holder writes its name and an
// expiry to a KV key and renews it, compare-and-set on the key's revision, every
// third of the TTL. Another replica takes the key over only once the expiry has
// passed. A holder that cannot renew within the TTL stops routing before another
// may start.
type lease struct {
	kv     jetstream.KeyValue
	key    string
	holder string
	ttl    time.Duration
	log    *slog.Logger
}

type leaseValue struct {
	Holder  string    `json:"holder"`
	Expires time.Time `json:"expires"`
}

// run calls lead with a context that ends when the lease is lost or ctx ends, each
// time this replica acquires the lease, until ctx ends.
func (l *lease) run(ctx context.Context, lead func(context.Context)) {
	t := time.NewTicker(l.ttl / 3)
	defer t.Stop()
	var (
		rev     uint64
		renewed time.Time
		current *leader
	)
	defer func() { current.stop() }()
	for {
		now := time.Now()
		r, err := l.acquire(ctx, rev, current != nil, now)
		switch {
		case err == nil:
			rev, renewed = r, now
			if current == nil {
				l.log.Info("this replica routes alerts now", "holder", l.holder)
				current = startLeader(ctx, lead)
			}
		case current != nil && (errors.Is(err, errLeaseTaken) || time.Since(renewed) > l.ttl*2/3):
			// Stop before the lease can have expired for the others.
			l.log.Warn("lost the routing lease; stopping the router", "err", err)
			current.stop()
			current, rev = nil, 0
		case current != nil:
			l.log.Warn("renewing the routing lease", "err", err)
		}
		select {
		case <-ctx.Done():
			if current != nil {
				// Hand over at once: the next replica need not wait for the expiry.
				current.stop()
				current = nil
				dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), l.ttl/3)
				_ = l.kv.Delete(dctx, l.key, jetstream.LastRevision(rev))
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

var errLeaseTaken = errors.New("lease held by another replica")

// acquire creates, renews (held: at rev) or takes over (expired) the lease and
// returns the new revision.
func (l *lease) acquire(ctx context.Context, rev uint64, held bool, now time.Time) (uint64, error) {
	ctx, cancel := context.WithTimeout(ctx, l.ttl/3)
	defer cancel()
	next, _ := json.Marshal(leaseValue{Holder: l.holder, Expires: now.Add(l.ttl)})
	if held {
		r, err := l.kv.Update(ctx, l.key, next, rev)
		if isConflict(err) {
			return 0, errLeaseTaken
		}
		return r, err
	}
	e, err := l.kv.Get(ctx, l.key)
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		r, err := l.kv.Create(ctx, l.key, next)
		if isConflict(err) {
			return 0, errLeaseTaken
		}
		return r, err
	case err != nil:
		return 0, err
	}
	var cur leaseValue
	if err := json.Unmarshal(e.Value(), &cur); err != nil {
		return 0, fmt.Errorf("lease %s: %w", l.key, err)
	}
	if cur.Holder != l.holder && now.Before(cur.Expires) {
		return 0, errLeaseTaken
	}
	r, err := l.kv.Update(ctx, l.key, next, e.Revision())
	if isConflict(err) {
		return 0, errLeaseTaken
	}
	return r, err
}

// isConflict reports a compare-and-set that lost: the key exists (Create) or
// changed (Update).
func isConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch)
}
