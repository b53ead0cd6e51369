package alert

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/services/kit/pebblelog"
)

// Spill keeps the groups of windowed rules (threshold, rate) beyond a bound on
// local disk, in an embedded LSM (Pebble), so that a rule per user over millions
// of users runs in bounded memory. The groups touched recently stay in memory
// (the rule's map, as without a Spill); when they are more than the bound, those
// not touched since the last eviction are written to Pebble and dropped from
// memory, and a group's next event reads it back (and removes it from disk: a
// group is in memory or on disk, never both).
//
// A window's evaluation visits what it can change, not every group on disk: for
// a count threshold (">" or ">="), a group on disk whose ring holds no more events
// than the threshold cannot fire until its next event brings it back, so only the
// groups on disk that are firing or over that bound are kept by key in memory and
// read at each step; the groups whose last event left the windows are found by an
// index by that time (a range of it, never a scan of the state) and deleted.
// Other windowed rules read every group they have on disk at each step.
//
// Layout in Pebble, per rule: g<rule><key> → the group (appendGroup, the snapshot's
// encoding); x<rule><latest><key> → empty, the index by the start of the group's
// latest bucket with events. <rule> is the rule's name, length first.
//
// The files are a working space, not a copy of anything: the engine's state, and
// so its snapshot (State.MarshalBinary reads the groups on disk too), holds every
// group, and each OpenSpill makes a directory of its own.
//
// Memory: the groups in memory (about 230 bytes of heap each), the block cache and
// up to two memtables (SpillOptions).
type Spill struct {
	db  *pebble.DB
	dir string
	// hot bounds the groups of windowed rules held in memory; epoch counts the
	// evictions, a group's touched is the epoch of its last event.
	hot   int
	epoch uint32
	// err is the first error of the disk: the engine's state is not whole after
	// it (Engine.Err).
	err error
	// restoring is how many more groups a restore keeps in memory (decodeStateTo);
	// batch holds those it writes to disk until they are committed.
	restoring int
	batch     *pebble.Batch
	// corrupt is the first corruption Pebble found (from any of its goroutines).
	corrupt atomic.Pointer[pebble.DataCorruptionInfo]
}

// SpillOptions sizes a Spill.
type SpillOptions struct {
	// Dir holds Pebble's files, in a directory groups-* of its own made at open and
	// removed at Close (those left by a run that was killed are removed at the next
	// open: none is opened again).
	Dir string
	// HotGroups bounds the groups in memory (default DefaultHotGroups).
	HotGroups int
	// CacheBytes is Pebble's block cache (default DefaultSpillCache).
	CacheBytes int64
	// MemTableBytes is the size of Pebble's memtable (default 32 MiB).
	MemTableBytes int64
	Logger        *slog.Logger
}

// DefaultHotGroups is how many groups of windowed rules a Spill keeps in memory
// by default: about 115 MB of heap at ~230 bytes a group.
const DefaultHotGroups = 500_000

// DefaultSpillCache is the block cache of a Spill by default: the index and filter
// blocks of ten million groups and some of their records.
const DefaultSpillCache = 128 << 20

// OpenSpill opens a Spill in o.Dir, emptied first.
func OpenSpill(o SpillOptions) (*Spill, error) {
	if o.Dir == "" {
		return nil, errors.New("alert: a spill needs a directory")
	}
	if o.HotGroups <= 0 {
		o.HotGroups = DefaultHotGroups
	}
	if o.CacheBytes <= 0 {
		o.CacheBytes = DefaultSpillCache
	}
	if err := os.MkdirAll(o.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("alert: the groups' directory: %w", err)
	}
	removeAbandoned(o.Dir, o.Logger)
	dir, err := os.MkdirTemp(o.Dir, "groups-")
	if err != nil {
		return nil, fmt.Errorf("alert: the groups' directory: %w", err)
	}
	opts := &pebble.Options{
		CacheSize:    o.CacheBytes,
		MemTableSize: uint64(cmp.Or(o.MemTableBytes, 32<<20)),
		// The files hold nothing the engine's state does not: a write-ahead log
		// would protect nothing.
		DisableWAL: true,
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "pebble")
	opts.Logger = pebblelog.Logger{Log: log}
	// A flush that fails (a full disk) is retried by Pebble until it succeeds;
	// meanwhile writes stop once the memtables are full, and so does the engine.
	// A corrupt file (Pebble's default: Fatalf, a panic that ends the process)
	// fails the engine (Err): its run ends and the next restores from the saved
	// state into a directory of its own.
	sp := &Spill{dir: dir, hot: o.HotGroups}
	opts.EventListener = &pebble.EventListener{
		BackgroundError: pebblelog.BackgroundErrors(log, "the alert groups on disk cannot be written (Pebble retries; the rules wait for it)"),
		DataCorruption: func(info pebble.DataCorruptionInfo) {
			if sp.corrupt.CompareAndSwap(nil, &info) {
				log.Error("a file of the alert groups on disk is corrupt; the run ends and restores from its saved state", "path", info.Path, "err", info.Details)
			}
		},
	}
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
		// Most reads are of a group's one block, once: decompressing it cost more
		// than reading it (BenchmarkEngineGroupsOnDisk).
		opts.Levels[i].Compression = func() *sstable.CompressionProfile { return sstable.NoCompression }
	}
	opts.EnsureDefaults()
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("alert: open the groups on disk in %s: %w", dir, err), os.RemoveAll(dir))
	}
	sp.db = db
	return sp, nil
}

// removeAbandoned removes the groups-* directories in dir that no Pebble has open
// (their lock is free) and that are older than a minute (one just made has no lock
// yet): those of runs that were killed.
func removeAbandoned(dir string, log *slog.Logger) {
	old, _ := filepath.Glob(filepath.Join(dir, "groups-*"))
	for _, d := range old {
		fi, err := os.Stat(d)
		if err != nil || time.Since(fi.ModTime()) < time.Minute {
			continue
		}
		lock, err := vfs.Default.Lock(filepath.Join(d, "LOCK"))
		if err != nil {
			continue // open, by this process or another
		}
		_ = lock.Close()
		if err := os.RemoveAll(d); err != nil && log != nil {
			log.Warn("remove the groups on disk of an earlier run", "dir", d, "err", err)
		}
	}
}

// Close closes Pebble and removes its files.
func (s *Spill) Close() error {
	err := s.db.Close()
	return errors.Join(err, os.RemoveAll(s.dir))
}

func (s *Spill) fail(err error) {
	if s.err == nil && err != nil {
		s.err = fmt.Errorf("alert: groups on disk: %w", err)
	}
}

// coldGroups are one rule's groups on disk.
type coldGroups struct {
	s *Spill
	// rec and idx are the prefixes of the rule's records and index entries.
	rec, idx []byte
	n        int
	// bounded: the rule is a count threshold (cannotHold can pass a group over);
	// cand then holds the keys of the groups on disk a step can change (firing, or
	// over the bound).
	bounded bool
	cand    map[string]struct{}
}

func (s *Spill) rule(r *Rule) *coldGroups {
	name := binary.AppendUvarint(nil, uint64(len(r.Name)))
	name = append(name, r.Name...)
	return &coldGroups{s: s, rec: append([]byte{'g'}, name...), idx: append([]byte{'x'}, name...),
		bounded: r.Kind == KindThreshold && r.Aggregate == AggCount && (r.Op == ">" || r.Op == ">="),
		cand:    map[string]struct{}{}}
}

func (c *coldGroups) recKey(key string) []byte {
	return append(append(make([]byte, 0, len(c.rec)+len(key)), c.rec...), key...)
}

func (c *coldGroups) idxKey(latest int64, key string) []byte {
	k := make([]byte, 0, len(c.idx)+8+len(key))
	k = binary.BigEndian.AppendUint64(append(k, c.idx...), uint64(latest)^1<<63)
	return append(k, key...)
}

// put writes g (of key) to disk in b.
func (c *coldGroups) put(b *pebble.Batch, r *Rule, key string, g *GroupState) {
	_ = b.Set(c.recKey(key), appendGroup(nil, g), nil)
	_ = b.Set(c.idxKey(g.Latest, key), nil, nil)
	c.n++
	c.mark(r, key, g)
}

// restore writes g (of key) to disk for a restore, committing every 4 MiB.
func (c *coldGroups) restore(r *Rule, key string, g *GroupState) {
	if c.s.batch == nil {
		c.s.batch = c.s.db.NewBatch()
	}
	c.put(c.s.batch, r, key, g)
	if c.s.batch.Len() >= 4<<20 {
		c.s.fail(c.restored())
	}
}

// restored commits what restore wrote.
func (c *coldGroups) restored() error {
	if c.s.batch == nil {
		return c.s.err
	}
	b := c.s.batch
	c.s.batch = nil
	c.s.fail(b.Commit(pebble.NoSync))
	return c.s.err
}

// mark keeps key among the candidates while a step can change its group.
func (c *coldGroups) mark(r *Rule, key string, g *GroupState) {
	if !c.bounded {
		return
	}
	if g.FiringSince != 0 || !r.cannotHold(g) {
		c.cand[key] = struct{}{}
	} else {
		delete(c.cand, key)
	}
}

// remove deletes g (of key) from disk in b.
func (c *coldGroups) remove(b *pebble.Batch, key string, g *GroupState) {
	_ = b.Delete(c.recKey(key), nil)
	_ = b.Delete(c.idxKey(g.Latest, key), nil)
	delete(c.cand, key)
	c.n--
}

// get reads the group of key from disk (nil: not there).
func (c *coldGroups) get(r *Rule, key string) *GroupState {
	v := c.raw(key)
	if v == nil {
		return nil
	}
	return c.decode(r, key, v)
}

// raw reads the record of the group of key from disk (nil: not there).
func (c *coldGroups) raw(key string) []byte {
	if c.n == 0 || c.s.err != nil {
		return nil
	}
	v, closer, err := c.s.db.Get(c.recKey(key))
	if errors.Is(err, pebble.ErrNotFound) {
		return nil
	}
	if err != nil {
		c.s.fail(err)
		return nil
	}
	defer closer.Close()
	return bytes.Clone(v)
}

func (c *coldGroups) decode(r *Rule, key string, rec []byte) *GroupState {
	d := &decoder{b: rec}
	g := d.group()
	if d.err == nil && len(d.b) > 0 {
		d.fail("%d bytes after a group", len(d.b))
	}
	if d.err != nil {
		c.s.fail(fmt.Errorf("group %q of rule %s: %w", key, r.Name, d.err))
		return nil
	}
	if g.Labels != nil && r.keyHoldsLabels(key) {
		g.Labels = nil
	}
	return g
}

// take reads the group of key from disk and removes it there (nil: not there).
func (c *coldGroups) take(r *Rule, key string) *GroupState {
	g := c.get(r, key)
	if g == nil {
		return nil
	}
	b := c.s.db.NewBatch()
	c.remove(b, key, g)
	c.s.fail(b.Commit(pebble.NoSync))
	return g
}

// each calls f with every group on disk and its record, in key order.
func (c *coldGroups) each(f func(key string, rec []byte) error) error {
	if c.s.err != nil {
		return c.s.err
	}
	if c.n == 0 {
		return nil
	}
	it, err := c.s.db.NewIter(&pebble.IterOptions{LowerBound: c.rec, UpperBound: prefixEnd(c.rec)})
	if err != nil {
		return err
	}
	for it.First(); it.Valid(); it.Next() {
		if err := f(string(it.Key()[len(c.rec):]), it.Value()); err != nil {
			return errors.Join(err, it.Close())
		}
	}
	return it.Close()
}

// groups calls f with each group on disk whose windows can change an alert: every
// group, or for a bounded rule the candidates.
func (c *coldGroups) groups(r *Rule, f func(g *GroupState)) {
	if c.n == 0 || c.s.err != nil {
		return
	}
	if c.bounded {
		for key := range c.cand {
			if g := c.get(r, key); g != nil {
				f(g)
			}
		}
		return
	}
	c.s.fail(c.each(func(key string, rec []byte) error {
		if g := c.decode(r, key, rec); g != nil {
			f(g)
		}
		return c.s.err
	}))
}

// drop deletes every group of the rule from disk.
func (c *coldGroups) drop() {
	b := c.s.db.NewBatch()
	_ = b.DeleteRange(c.rec, prefixEnd(c.rec), nil)
	_ = b.DeleteRange(c.idx, prefixEnd(c.idx), nil)
	c.s.fail(b.Commit(pebble.NoSync))
	c.n = 0
	clear(c.cand)
}

// prefixEnd is the least key after every key with prefix p.
func prefixEnd(p []byte) []byte {
	end := bytes.Clone(p)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}

// advance evaluates the window ending at b for the rule's groups on disk, as
// advanceWindows does for those in memory.
func (c *coldGroups) advance(r *Rule, b int64, out []*alerts.Alert, changed func(key string, g *GroupState)) []*alerts.Alert {
	if c.n == 0 || c.s.err != nil {
		return out
	}
	batch := c.s.db.NewBatch()
	visit := func(key string, g *GroupState) {
		firing := g.FiringSince
		var drop bool
		out, drop = r.evaluate(key, g, b, out)
		switch {
		case drop:
			c.remove(batch, key, g)
			changed(key, nil)
		case g.FiringSince != firing:
			_ = batch.Set(c.recKey(key), appendGroup(nil, g), nil)
			c.mark(r, key, g)
			changed(key, nil)
		}
	}
	if !c.bounded {
		c.s.fail(c.each(func(key string, rec []byte) error {
			if g := c.decode(r, key, rec); g != nil {
				visit(key, g)
			}
			return c.s.err
		}))
		c.s.fail(batch.Commit(pebble.NoSync))
		return out
	}
	for key := range c.cand {
		if g := c.get(r, key); g != nil {
			visit(key, g)
		}
	}
	c.s.fail(batch.Commit(pebble.NoSync))
	if c.s.err != nil {
		return out
	}
	// The others cannot fire: those whose last event left the windows go.
	step := int64(r.Step)
	batch = c.s.db.NewBatch()
	it, err := c.s.db.NewIter(&pebble.IterOptions{LowerBound: c.idx, UpperBound: c.idxKey(b+step-r.span(), "")})
	if err != nil {
		c.s.fail(err)
		return out
	}
	for it.First(); it.Valid(); it.Next() {
		key := string(it.Key()[len(c.idx)+8:])
		if _, firing := c.cand[key]; firing {
			continue
		}
		_ = batch.Delete(c.recKey(key), nil)
		_ = batch.Delete(it.Key(), nil)
		c.n--
		changed(key, nil)
	}
	c.s.fail(it.Close())
	c.s.fail(batch.Commit(pebble.NoSync))
	return out
}

// evict moves groups of windowed rules from memory to disk once they are more
// than the bound: first those without an event since the last eviction, then any,
// down to three quarters of the bound (so that evictions are not one a group).
func (e *Engine) evict() {
	s := e.spill
	hot := 0
	for _, rs := range e.states {
		if rs != nil && rs.cold != nil {
			hot += len(rs.Groups)
		}
	}
	if hot <= s.hot || s.err != nil {
		return
	}
	target := s.hot * 3 / 4
	b := s.db.NewBatch()
	for pass := 0; pass < 2 && hot > target; pass++ {
		for i, rs := range e.states {
			if rs == nil || rs.cold == nil {
				continue
			}
			for key, g := range rs.Groups {
				if hot <= target {
					break
				}
				if pass == 0 && g.touched == s.epoch {
					continue
				}
				rs.cold.put(b, e.rules[i], key, g)
				delete(rs.Groups, key)
				if rs.last == g {
					rs.last = nil
				}
				hot--
			}
		}
	}
	s.epoch++
	s.fail(b.Commit(pebble.NoSync))
}

// SpillTo keeps the groups of the engine's windowed rules beyond s's bound on
// disk (see Spill), from now on; s is the engine's alone.
func (e *Engine) SpillTo(s *Spill) {
	e.spill = s
	e.attachSpill()
	e.evict()
}

// attachSpill gives the windowed rules without groups on disk theirs.
func (e *Engine) attachSpill() {
	if e.spill == nil {
		return
	}
	for i, r := range e.rules {
		if rs := e.states[i]; rs != nil && rs.cold == nil && (r.Kind == KindThreshold || r.Kind == KindRate) {
			rs.cold = e.spill.rule(r)
		}
	}
}

// Close releases the engine's groups on disk (nothing without a Spill).
func (e *Engine) Close() error {
	if e.spill == nil {
		return nil
	}
	return e.spill.Close()
}

// OpenEngine is NewEngine for the state a snapshot carries (DecodeState's bin and
// legacy; both nil: a fresh start), with the groups of windowed rules beyond
// s.HotGroups on disk under dir when s.Store is StoreDisk: a restore then holds no
// more of them in memory than that. Close it when done. A state that does not
// decode is an error wrapping ErrCorruptState.
func OpenEngine(s Settings, rules []*Rule, bin []byte, legacy *State, dir string, log *slog.Logger) (*Engine, error) {
	return openEngine(s, rules, dir, log, func(sp *Spill) (*State, error) {
		if sp == nil {
			return DecodeState(bin, legacy)
		}
		return decodeStateTo(bin, legacy, rules, sp)
	})
}

// openEngine is OpenEngine for the state decode reads, given the Spill the groups
// beyond its bound go to (nil: the memory store).
func openEngine(s Settings, rules []*Rule, dir string, log *slog.Logger, decode func(sp *Spill) (*State, error)) (*Engine, error) {
	if s.Store != StoreDisk {
		st, err := decode(nil)
		if err != nil {
			return nil, err
		}
		return NewEngine(rules, st), nil
	}
	if dir == "" {
		return nil, errors.New("alert: alert.store disk needs a data directory (SLUICE_DATA_DIR)")
	}
	sp, err := OpenSpill(SpillOptions{Dir: dir, HotGroups: s.HotGroups, Logger: log})
	if err != nil {
		return nil, err
	}
	st, err := decode(sp)
	if err != nil {
		return nil, errors.Join(err, sp.Close())
	}
	e := NewEngine(rules, st)
	e.SpillTo(sp)
	return e, nil
}

// Err is the first error of the groups on disk (nil without a Spill): the
// engine's state is not whole after it, and the run must start again from its
// last saved state.
func (e *Engine) Err() error {
	if e.spill == nil {
		return nil
	}
	if info := e.spill.corrupt.Load(); info != nil {
		e.spill.fail(fmt.Errorf("%s is corrupt: %w", info.Path, info.Details))
	}
	return e.spill.err
}
