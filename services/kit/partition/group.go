package partition

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/kvfollow"
)

// ErrLost is returned by a Claim that another worker took over, or that this worker
// could not renew in time: its holder must stop writing at once.
var ErrLost = errors.New("partition: the claim is lost")

// KV keys of a Group.
const (
	workerPrefix    = "workers."
	partitionPrefix = "partition."
	countKey        = "partitions"
)

// Group makes this worker the owner of its share of the partitions, in a NATS KV
// bucket shared by every worker:
//
//   - workers.<name> is each worker's heartbeat, written every TTL/4;
//   - partition.<p> is the claim of partition p: its owner and its state pointer.
//     The owner renews it every TTL/4 by compare-and-set on its revision; every
//     write of it (renewal, state pointer, hand-over) is such a compare-and-set, so
//     a worker that lost the claim fails its next one;
//   - partitions holds the partition count; a worker with another count refuses to
//     start.
//
// No clocks are compared across hosts. A key is stale to an observer when it has
// seen no write of it for TTL on its own clock; only then does it take a claim over.
// An owner stops writing (Claim.Valid) once TTL*2/3 has passed on its own clock since
// its last successful write, before any observer can find the claim stale.
//
// The partitions go to the live workers by Assign; a worker hands over, saving its
// state first, the partitions Assign gives to another live worker.
type Group struct {
	KV         jetstream.KeyValue
	Partitions int
	// Worker names this process; unique among the workers.
	Worker string
	TTL    time.Duration
	Log    *slog.Logger
}

// workerName is what a worker's name may hold: it is a token of a KV key.
var workerName = regexp.MustCompile(`^[-_=a-zA-Z0-9]+$`)

// claimValue is the value of partition.<p>.
type claimValue struct {
	// Worker owns the partition; empty when it was handed over.
	Worker string `json:"worker"`
	// State names the partition's saved state (its owner's to interpret).
	State string `json:"state,omitempty"`
}

// Claim is this worker's ownership of one partition.
type Claim struct {
	Partition int
	// Gen is the KV revision that acquired the claim: unique per acquisition.
	Gen uint64
	g   *Group

	mu      sync.Mutex
	rev     uint64
	value   claimValue
	written time.Time // last successful compare-and-set, on this host's clock
	lost    bool
	// runs counts the generations NextGeneration gave.
	runs int
	// unsure is the last write that failed without an answer (a timeout): the
	// server may have applied it, and then the claim's revision is its.
	unsure *unsureWrite
}

// unsureWrite is a write of value begun at start whose outcome is unknown.
type unsureWrite struct {
	value []byte
	start time.Time
}

// State is the state pointer as of the last write.
func (c *Claim) State() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.value.State
}

// Valid is nil while the claim is held: written within TTL*2/3 and not lost.
func (c *Claim) Valid() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.validLocked()
}

func (c *Claim) validLocked() error {
	if c.lost {
		return fmt.Errorf("partition %d: %w", c.Partition, ErrLost)
	}
	if age := time.Since(c.written); age > c.g.TTL*2/3 {
		return fmt.Errorf("partition %d: not renewed for %s: %w", c.Partition, age.Round(time.Millisecond), ErrLost)
	}
	return nil
}

// NextGeneration is the generation of a run of the claim's partition that starts
// now: higher than every earlier run's, of this claim and of every earlier owner.
// The first run's is Gen; each later one's is the revision of the claim written
// again (compare-and-set, its value unchanged): a run started again while the
// claim is kept (a stall restart) fences out an insert of the run before it that
// reaches ClickHouse late, as a new owner fences out the earlier owner's. ErrLost
// when another worker took the partition over.
func (c *Claim) NextGeneration(ctx context.Context) (uint64, error) {
	c.mu.Lock()
	c.runs++
	first := c.runs == 1
	c.mu.Unlock()
	if first {
		return c.Gen, nil
	}
	if err := c.write(ctx, func(cur claimValue) claimValue { return cur }); err != nil {
		return 0, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.rev, nil
}

// SetState points the claim at a newly saved state, compare-and-set: ErrLost when
// another worker took the partition over.
func (c *Claim) SetState(ctx context.Context, state string) error {
	return c.write(ctx, func(claimValue) claimValue { return claimValue{Worker: c.g.Worker, State: state} })
}

// write sets the claim's value to next of its current one, compare-and-set on its
// revision.
func (c *Claim) write(ctx context.Context, next func(cur claimValue) claimValue) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.validLocked(); err != nil {
		return err
	}
	v := next(c.value)
	b, _ := json.Marshal(v)
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, c.g.TTL/3)
	defer cancel()
	rev, err := c.g.KV.Update(ctx, claimKey(c.Partition), b, c.rev)
	if isConflict(err) && c.adoptUnsure(ctx) {
		// Made again from the adopted value (a renewal keeps its state pointer).
		v = next(c.value)
		b, _ = json.Marshal(v)
		rev, err = c.g.KV.Update(ctx, claimKey(c.Partition), b, c.rev)
	}
	if isConflict(err) {
		c.lost = true
		return fmt.Errorf("partition %d: %w", c.Partition, ErrLost)
	}
	if err != nil {
		c.unsure = &unsureWrite{value: b, start: start}
		return fmt.Errorf("partition %d: write claim: %w", c.Partition, err)
	}
	// Valid counts from before the write: an observer saw it no sooner than that.
	c.rev, c.value, c.written, c.unsure = rev, v, start, nil
	return nil
}

// adoptUnsure takes the claim's stored revision as this claim's when the stored
// value is the one of its last unsure write: that write was applied (its answer
// lost), and no write since, as only this worker writes a claim naming it. It
// reports whether it did; a claim adopted counts as written when that write began.
func (c *Claim) adoptUnsure(ctx context.Context) bool {
	u := c.unsure
	if u == nil {
		return false
	}
	c.unsure = nil
	e, err := c.g.KV.Get(ctx, claimKey(c.Partition))
	if err != nil || e.Revision() <= c.rev || !bytes.Equal(e.Value(), u.value) {
		return false
	}
	var v claimValue
	if json.Unmarshal(e.Value(), &v) != nil {
		return false
	}
	c.rev, c.value, c.written = e.Revision(), v, u.start
	if err := c.validLocked(); err != nil {
		return false
	}
	c.g.Log.Info("a claim write that timed out had been applied: carrying on from it", "partition", c.Partition, "revision", e.Revision())
	return true
}

func claimKey(p int) string { return partitionPrefix + strconv.Itoa(p) }

func isConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch)
}

// seen is the last write of a key this worker saw, and when (its own clock).
type seen struct {
	rev     uint64
	value   []byte
	deleted bool
	at      time.Time
}

// owned is a partition this worker runs.
type owned struct {
	claim  *Claim
	cancel context.CancelFunc
	done   chan struct{}
}

// Run takes part in the group until ctx ends. For each partition this worker comes
// to own it calls own in a goroutine of its own, with a context that ends when the
// partition is lost or handed over; own returns only once it stopped writing (having
// saved its state, when it could). At the end Run hands every partition over and
// removes this worker's heartbeat.
func (g *Group) Run(ctx context.Context, own func(context.Context, *Claim)) error {
	if g.Partitions < 1 || g.TTL <= 0 || !workerName.MatchString(g.Worker) {
		return fmt.Errorf("partition: a group needs partitions >= 1, a positive TTL and a worker name of letters, digits, '-', '_' and '=' (got %d, %s, %q)", g.Partitions, g.TTL, g.Worker)
	}
	// Stopped before it joined: nothing to hand over, and no error.
	if err := g.checkCount(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	// Every write of the bucket, from its current values on; watched again when
	// nats.go ends the watch or the bucket was made again.
	v := &view{keys: map[string]*seen{}}
	stopFollow, err := kvfollow.Follow(ctx, kvfollow.Config{KV: g.KV, Log: g.Log}, v.apply)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("partition: watch %s: %w", g.KV.Bucket(), err)
	}
	defer stopFollow()
	mine := map[int]*owned{}
	defer g.handOverAll(context.WithoutCancel(ctx), mine)
	tick := time.NewTicker(g.TTL / 4)
	defer tick.Stop()
	g.heartbeat(ctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		keys := v.copy()
		if keys[countKey] == nil || keys[countKey].deleted {
			// The bucket was made again (its keys gone): the count is recorded again,
			// so that a worker of another count cannot join.
			var other *otherCountError
			if err := g.checkCount(ctx); errors.As(err, &other) {
				return err
			} else if err != nil && ctx.Err() == nil {
				g.Log.Warn("record the partition count again", "bucket", g.KV.Bucket(), "err", err)
			}
		}
		g.heartbeat(ctx)
		g.balance(ctx, keys, mine, own)
	}
}

// view is the bucket's keys as this worker saw them written.
type view struct {
	mu   sync.Mutex
	keys map[string]*seen
}

// apply records e. A write seen again (the bucket watched again) keeps when it was
// first seen: it is no newer than that.
func (v *view) apply(e jetstream.KeyValueEntry) {
	deleted := e.Operation() != jetstream.KeyValuePut
	v.mu.Lock()
	defer v.mu.Unlock()
	if s := v.keys[e.Key()]; s != nil && s.rev == e.Revision() && s.deleted == deleted {
		return
	}
	v.keys[e.Key()] = &seen{rev: e.Revision(), value: e.Value(), deleted: deleted, at: time.Now()}
}

// copy is the keys now (each seen is never changed once recorded).
func (v *view) copy() map[string]*seen {
	v.mu.Lock()
	defer v.mu.Unlock()
	return maps.Clone(v.keys)
}

// otherCountError is a group recorded with another partition count.
type otherCountError struct{ want, got, bucket string }

func (e *otherCountError) Error() string {
	return fmt.Sprintf("partition: this worker is configured for %s partitions, but the group in KV bucket %s has %s (see docs/scaling.md to change it)", e.want, e.bucket, e.got)
}

// checkCount records the partition count, or refuses a count other than the one
// recorded.
func (g *Group) checkCount(ctx context.Context) error {
	want := strconv.Itoa(g.Partitions)
	if _, err := g.KV.Create(ctx, countKey, []byte(want)); err == nil || !isConflict(err) {
		if err != nil {
			return fmt.Errorf("partition: record the partition count: %w", err)
		}
		return nil
	}
	e, err := g.KV.Get(ctx, countKey)
	if err != nil {
		return fmt.Errorf("partition: read the partition count: %w", err)
	}
	if got := string(e.Value()); got != want {
		return &otherCountError{want: want, got: got, bucket: g.KV.Bucket()}
	}
	return nil
}

func (g *Group) heartbeat(ctx context.Context) {
	hctx, cancel := context.WithTimeout(ctx, g.TTL/3)
	defer cancel()
	if _, err := g.KV.PutString(hctx, workerPrefix+g.Worker, time.Now().UTC().Format(time.RFC3339)); err != nil && ctx.Err() == nil {
		g.Log.Warn("worker heartbeat", "worker", g.Worker, "err", err)
	}
}

// live is the workers whose heartbeat this worker saw within TTL, itself included.
func (g *Group) live(keys map[string]*seen, now time.Time) []string {
	out := []string{g.Worker}
	for k, s := range keys {
		if name, ok := strings.CutPrefix(k, workerPrefix); ok && name != g.Worker && !s.deleted && now.Sub(s.at) < g.TTL {
			out = append(out, name)
		}
	}
	return out
}

// balance renews what this worker owns, hands over what belongs to another live
// worker, and claims what belongs to this one once it is free or stale.
func (g *Group) balance(ctx context.Context, keys map[string]*seen, mine map[int]*owned, own func(context.Context, *Claim)) {
	now := time.Now()
	live := g.live(keys, now)
	want := Assign(g.Partitions, live)
	// Hand-overs run together: each waits for its run to save its state, and the
	// claims kept must be renewed in time. Renewals run together too: on a worker
	// short of CPU each round trip can take long, and one after another the last
	// claims would be renewed too late and lost.
	var handing, renewing sync.WaitGroup
	type renewal struct {
		p   int
		o   *owned
		err error
	}
	var renewals []*renewal
	for p := range g.Partitions {
		o := mine[p]
		if o == nil {
			continue
		}
		select {
		case <-o.done: // its run ended on its own
			delete(mine, p)
			handing.Go(func() { g.release(ctx, p, o) })
			continue
		default:
		}
		if want[p] != g.Worker {
			g.Log.Info("handing the partition over", "partition", p, "to", want[p])
			delete(mine, p)
			handing.Go(func() { g.release(ctx, p, o) })
			continue
		}
		r := &renewal{p: p, o: o}
		renewals = append(renewals, r)
		renewing.Go(func() {
			r.err = o.claim.write(ctx, func(cur claimValue) claimValue { return claimValue{Worker: g.Worker, State: cur.State} })
		})
	}
	renewing.Wait()
	for _, r := range renewals {
		if errors.Is(r.err, ErrLost) {
			g.Log.Warn("lost the partition; stopping its run", "partition", r.p, "err", r.err)
			r.o.stop()
			delete(mine, r.p)
		} else if r.err != nil {
			g.Log.Warn("renew the partition's claim", "partition", r.p, "err", r.err)
		}
	}
	handing.Wait()
	// Claims are taken together, for the same reason.
	type acquisition struct {
		p   int
		c   *Claim
		err error
	}
	var acquiring sync.WaitGroup
	var acquisitions []*acquisition
	for p := range g.Partitions {
		if mine[p] != nil || want[p] != g.Worker || ctx.Err() != nil {
			continue
		}
		a, s := &acquisition{p: p}, keys[claimKey(p)]
		acquisitions = append(acquisitions, a)
		acquiring.Go(func() { a.c, a.err = g.acquire(ctx, p, s, now) })
	}
	acquiring.Wait()
	for _, a := range acquisitions {
		p, c := a.p, a.c
		if a.err != nil {
			g.Log.Warn("claim the partition", "partition", p, "err", a.err)
			continue
		}
		if c == nil {
			continue
		}
		g.Log.Info("this worker owns the partition now", "partition", p, "worker", g.Worker, "gen", c.Gen)
		rctx, cancel := context.WithCancel(ctx)
		o := &owned{claim: c, cancel: cancel, done: make(chan struct{})}
		mine[p] = o
		go func() {
			defer close(o.done)
			own(rctx, c)
		}()
	}
}

// acquire claims partition p when its claim is absent, handed over, or stale; nil
// when another worker holds it.
func (g *Group) acquire(ctx context.Context, p int, s *seen, now time.Time) (*Claim, error) {
	c := &Claim{Partition: p, g: g}
	start := time.Now()
	actx, cancel := context.WithTimeout(ctx, g.TTL/3)
	defer cancel()
	var (
		rev uint64
		err error
	)
	if s == nil || s.deleted {
		// Create takes a key that has no value, or whose last write is a deletion
		// (a compare-and-set on it): absent from a bucket made again, too.
		c.value = claimValue{Worker: g.Worker}
		b, _ := json.Marshal(c.value)
		rev, err = g.KV.Create(actx, claimKey(p), b)
	} else {
		var cur claimValue
		if err := json.Unmarshal(s.value, &cur); err != nil {
			return nil, fmt.Errorf("partition %d: claim %q: %w", p, s.value, err)
		}
		if cur.Worker != "" && now.Sub(s.at) < g.TTL {
			return nil, nil
		}
		c.value = claimValue{Worker: g.Worker, State: cur.State}
		b, _ := json.Marshal(c.value)
		rev, err = g.KV.Update(actx, claimKey(p), b, s.rev)
	}
	if isConflict(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	c.Gen, c.rev, c.written = rev, rev, start
	return c, nil
}

// stop ends the partition's run and waits for it.
func (o *owned) stop() {
	o.cancel()
	<-o.done
}

// release stops the partition's run (which saves its state), then marks the claim
// handed over, so that its next owner need not wait for it to go stale.
func (g *Group) release(ctx context.Context, p int, o *owned) {
	o.stop()
	if err := o.claim.write(ctx, func(cur claimValue) claimValue { return claimValue{State: cur.State} }); err != nil {
		g.Log.Warn("hand the partition over", "partition", p, "err", err)
	}
}

// handOverAll releases every partition and removes the heartbeat, within TTL/3.
func (g *Group) handOverAll(ctx context.Context, mine map[int]*owned) {
	var wg sync.WaitGroup
	for p, o := range mine {
		wg.Go(func() { g.release(ctx, p, o) })
	}
	wg.Wait()
	ctx, cancel := context.WithTimeout(ctx, g.TTL/3)
	defer cancel()
	if err := g.KV.Delete(ctx, workerPrefix+g.Worker); err != nil {
		g.Log.Warn("remove the worker heartbeat", "worker", g.Worker, "err", err)
	}
}

// Ownership is what a partition's claim records.
type Ownership struct {
	// Worker owns the partition; empty when none does.
	Worker string
	// State names the partition's last saved state; empty before its first save.
	State string
}

// Count is the partition count the group in kv records; ErrKeyNotFound (wrapped)
// when no worker has joined yet.
func Count(ctx context.Context, kv jetstream.KeyValue) (int, error) {
	e, err := kv.Get(ctx, countKey)
	if err != nil {
		return 0, fmt.Errorf("partition: the partition count: %w", err)
	}
	n, err := strconv.Atoi(string(e.Value()))
	if err != nil {
		return 0, fmt.Errorf("partition: the partition count %q: %w", e.Value(), err)
	}
	return n, nil
}

// Owner reads partition p's claim from kv; jetstream.ErrKeyNotFound when no worker
// ever claimed it.
func Owner(ctx context.Context, kv jetstream.KeyValue, p int) (Ownership, error) {
	e, err := kv.Get(ctx, claimKey(p))
	if err != nil {
		return Ownership{}, fmt.Errorf("partition %d: %w", p, err)
	}
	var v claimValue
	if err := json.Unmarshal(e.Value(), &v); err != nil {
		return Ownership{}, fmt.Errorf("partition %d: claim %q: %w", p, e.Value(), err)
	}
	return Ownership{Worker: v.Worker, State: v.State}, nil
}
