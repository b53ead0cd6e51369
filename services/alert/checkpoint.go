package alert

import (
	"bufio"
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"iter"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/sluicehq/sluice/services/kit/partition"
)

// SegmentFiles keeps the files of the checkpoints in an object store, each
// uploaded once (partition.Files).
type SegmentFiles interface {
	Upload(ctx context.Context, dir string, names []string) ([]partition.File, error)
	Restore(ctx context.Context, files []partition.File, dir string) error
	Keep(ctx context.Context, files []partition.File)
	// Continues tells whether a checkpoint after a Restore may name the restored
	// files (false: they stay their writer's, the next capture writes every group).
	Continues() bool
}

// Segment is one file of a checkpoint (see segMagic); Base: it holds every group,
// not the changes since the segment before it.
type Segment struct {
	File partition.File `json:"file"`
	Base bool           `json:"base,omitempty"`
}

// Checkpoints saves an engine's state incrementally: each capture writes the
// groups that changed or went since the last as a segment (the first, every
// group), uploaded once and named by every later checkpoint until a compaction
// merges it away. So what a save writes is proportional to what changed, not to
// the state's size. Compactions read this machine's copies of the segments, not
// the engine: once the deltas hold more than half the base's bytes, base and
// deltas are merged into a new base (the groups that went left out); before that,
// more than maxDeltas deltas are merged into one.
//
// The state a checkpoint holds is the engine's as of its capture, and a restore
// (Open) gives the engine that state. A capture whose save failed stays in the
// list: the next capture's checkpoint names it too.
type Checkpoints struct {
	files SegmentFiles
	// dir holds this machine's copies of the segments the list names.
	dir   string
	nonce string
	log   *slog.Logger

	mu     sync.Mutex
	writes int
	// list is the checkpoint as of the last capture (its files uploaded or not);
	// prev the rules of its newest segment, by name (their versions); whole: the
	// next capture writes every group (none is saved yet, or a capture failed).
	list  []Segment
	prev  map[string]string
	whole bool
	// pending is the capture begun and not ended (Begin); unwritten the segments
	// of those ended whose files the next Upload writes, by name.
	pending   *Pending
	unwritten map[string]*Pending
}

// maxDeltas bounds the deltas a checkpoint names (see Checkpoints).
const maxDeltas = 8

// NewCheckpoints keeps checkpoints in files, working in dir (made anew by Open).
func NewCheckpoints(files SegmentFiles, dir string, log *slog.Logger) *Checkpoints {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return &Checkpoints{files: files, dir: dir, nonce: hex.EncodeToString(b[:]), log: log, whole: true}
}

// Open makes the engine for rules from the checkpoint list (nil: from the state a
// snapshot of an earlier release carries, bin and legacy, as OpenEngine; all nil:
// a fresh start), with its groups on disk under groupsDir by s, and keeps its
// checkpoints from now on. A checkpoint that does not decode is an error
// wrapping ErrCorruptState.
func (c *Checkpoints) Open(ctx context.Context, s Settings, rules []*Rule, list []Segment, bin []byte, legacy *State, groupsDir string) (*Engine, error) {
	files := make([]partition.File, len(list))
	for i, sg := range list {
		files[i] = sg.File
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// An Open that failed (a file lost: the caller may try an older state) leaves
	// nothing of its list.
	c.discardPending() // of an engine given up
	c.list, c.prev, c.whole = nil, nil, true
	if err := c.files.Restore(ctx, files, c.dir); err != nil {
		return nil, fmt.Errorf("alert: restore the checkpoint: %w", err)
	}
	var e *Engine
	var err error
	if len(list) == 0 {
		e, err = OpenEngine(s, rules, bin, legacy, groupsDir, c.log)
	} else {
		var prev map[string]string
		e, err = openEngine(s, rules, groupsDir, c.log, func(sp *Spill) (*State, error) {
			st, err := c.restore(list, rules, sp)
			if err == nil {
				prev = map[string]string{}
				for name, rs := range st.Rules {
					prev[name] = rs.Version
				}
			}
			return st, err
		})
		if err == nil {
			c.list, c.prev, c.whole = list, prev, !c.files.Continues()
		}
	}
	if err != nil {
		return nil, err
	}
	e.tracking = true
	e.attachDirty()
	return e, nil
}

// restore reads the state the segments of list hold (in c.dir), the groups of
// windowed rules beyond sp's bound (nil: none) placed on disk.
func (c *Checkpoints) restore(list []Segment, rules []*Rule, sp *Spill) (*State, error) {
	readers := make([]*segReader, len(list))
	for i, sg := range list {
		f, err := os.Open(filepath.Join(c.dir, sg.File.Name))
		if err != nil {
			return nil, fmt.Errorf("alert: the checkpoint's segment: %w", err)
		}
		defer f.Close()
		if readers[i], err = openSegReader(f); err != nil {
			return nil, fmt.Errorf("alert: the checkpoint's segment %s: %w", sg.File.Name, err)
		}
	}
	h := readers[len(readers)-1].h
	st := &State{MaxTime: h.maxTime, Partitions: h.partitions, Rules: make(map[string]*RuleState, len(h.rules))}
	byName := map[string]*Rule{}
	for _, r := range rules {
		byName[r.Name] = r
	}
	states := make([]*RuleState, len(h.rules))
	colds := make([]*coldGroups, len(h.rules))
	kept := make([]*Rule, len(h.rules))
	for i, hr := range h.rules {
		rs := &RuleState{Version: hr.version, Evaluated: hr.evaluated, First: hr.first, HasFirst: hr.hasFirst, Groups: map[string]*GroupState{}}
		st.Rules[hr.name] = rs
		states[i] = rs
		// The groups of a rule that changed or went are left out (NewEngine drops
		// its state).
		if r := byName[hr.name]; r != nil && r.version == hr.version && r.Kind != KindMatch {
			kept[i] = r
			if sp != nil && (r.Kind == KindThreshold || r.Kind == KindRate) {
				colds[i] = sp.rule(r)
			}
		}
	}
	if sp != nil {
		sp.restoring = sp.hot
	}
	err := mergeSegments(readers, func(i int, key string, rec []byte) error {
		r := kept[i]
		if rec == nil || r == nil {
			return nil
		}
		d := &decoder{b: rec}
		g := d.group()
		if d.err == nil && len(d.b) > 0 {
			d.fail("%d bytes after a group", len(d.b))
		}
		if d.err != nil {
			return fmt.Errorf("group %q of rule %s: %w", key, r.Name, d.err)
		}
		if cold := colds[i]; cold != nil && sp.restoring <= 0 {
			if g.Labels != nil && r.keyHoldsLabels(key) {
				g.Labels = nil
			}
			cold.restore(r, key, g)
			return sp.err
		}
		states[i].Groups[key] = g
		if sp != nil {
			sp.restoring--
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("alert: the checkpoint: %w", err)
	}
	for i, cold := range colds {
		if cold != nil {
			if err := cold.restored(); err != nil {
				return nil, err
			}
			states[i].cold = cold
		}
	}
	return st, nil
}

// attachDirty gives each rule's state its set of changed groups, when the engine
// keeps checkpoints.
func (e *Engine) attachDirty() {
	if !e.tracking {
		return
	}
	for _, rs := range e.states {
		if rs != nil && rs.dirty == nil {
			rs.dirty, rs.maxDirty = map[string]struct{}{}, cmp.Or(e.maxDirty, maxDirty)
		}
	}
}

// Capture writes the engine's state as of now as a segment: the groups that
// changed or went since the last capture (every group at the first, and those of
// the rules that are new since), and returns the checkpoint it completes, to
// upload and save. Call it where the engine runs (it holds it for the whole
// capture: Begin does not); a capture begun and not ended is ended first. The next
// capture must wait until this one is saved or given up (Capture.Saved, or an
// error).
func (c *Checkpoints) Capture(e *Engine) (*Capture, error) {
	// Written at once: through the spool (Begin, End) it costs more in all.
	p, err := c.begin(e, true)
	if err != nil {
		return nil, err
	}
	return p.done, p.err
}

// Begin is Capture in steps, for an engine that must not stop for it: it takes the
// state's header and the sets of groups changed since the last capture, and the
// engine runs on. Each changed group is encoded as it was at Begin when something
// is about to change it (copy on write, RuleState.keep), or when Step gets to it;
// End encodes what is left, and the segment's file is written by the checkpoint's
// Upload (or a later one's). Call Begin, Step and End where the engine runs. A
// capture that writes a rule whole (the first, a rule new since, one whose changes
// overflowed) is written at Begin. A Begin before the last one's End ends that one
// first (its segment is written by the next upload).
func (c *Checkpoints) Begin(e *Engine) (*Pending, error) { return c.begin(e, false) }

// begin is Begin, or with atOnce Capture: the capture written at once (done).
func (c *Checkpoints) begin(e *Engine, atOnce bool) (*Pending, error) {
	if err := e.Err(); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pending != nil {
		_, _ = c.pending.endLocked() // an error makes the next capture whole
	}
	names := slices.Sorted(maps.Keys(e.st.Rules))
	// A capture that writes a rule whole is written at once.
	atOnce = atOnce || c.whole
	for _, name := range names {
		if rs := e.st.Rules[name]; rs.reset || c.prev[name] != rs.Version || rs.dirty == nil {
			atOnce = true
		}
	}
	var sp *spool
	if !atOnce {
		var err error
		// No spool: written at once, as without steps.
		sp, err = newSpool(c.dir)
		atOnce = err != nil
	}
	if atOnce {
		cp, err := c.captureLocked(e)
		return &Pending{c: c, done: cp, err: err}, nil
	}
	p := &Pending{c: c, e: e, rules: make(map[string]string, len(names)), spool: sp,
		h: &segHeader{maxTime: e.st.MaxTime, partitions: slices.Clone(e.st.Partitions)}}
	for _, name := range names {
		rs := e.st.Rules[name]
		p.h.rules = append(p.h.rules, segRule{name: name, version: rs.Version, evaluated: rs.Evaluated, first: rs.First, hasFirst: rs.HasFirst})
		p.rules[name] = rs.Version
		p.states = append(p.states, rs)
		rs.cow = &cowSet{pending: rs.dirty, spool: sp, recs: make([]cowRec, 0, len(rs.dirty))}
		rs.dirty = map[string]struct{}{}
		p.sets = append(p.sets, rs.cow)
	}
	c.pending = p
	return p, nil
}

// How a loop that runs an engine ends a capture begun (Begin) in steps between
// its other work: CaptureStep groups a step (Pending.Step), again and again until
// StepTime has passed (1,000 groups a step took 10–40 ms each at half load on the
// benchmark's machine: docs/benchmarks.md).
const (
	CaptureStep = 100
	StepTime    = 2 * time.Millisecond
)

// Pending is a capture begun (Checkpoints.Begin) and not ended.
type Pending struct {
	c      *Checkpoints
	e      *Engine
	h      *segHeader
	rules  map[string]string // by name, their versions
	states []*RuleState      // in the header's order
	sets   []*cowSet         // their groups kept, as states[i].cow was
	spool  *spool            // the groups kept, encoded
	// done: the capture was written at Begin (its error err).
	done *Capture
	err  error
}

// Step encodes up to n of the groups the capture still holds as they were, and
// tells whether any are left for End.
func (p *Pending) Step(n int) bool {
	left := 0
	for _, rs := range p.states {
		cow := rs.cow
		if cow == nil {
			continue
		}
		if cow.next == nil {
			// One walk of the set across the steps (a range per step would pass
			// over the slots of the keys kept before it again).
			cow.next, cow.stop = iter.Pull(maps.Keys(cow.pending))
		}
		for ; n > 0 && len(cow.pending) > 0; n-- {
			key, ok := cow.next()
			if !ok {
				break
			}
			// Still pending: a walk does not give the keys deleted before it gets to
			// them.
			rs.kept(key)
		}
		left += len(cow.pending)
	}
	return left > 0
}

// End encodes what the capture holds still and returns the checkpoint it
// completes, as Capture does; the segment's file is written by Upload.
func (p *Pending) End() (*Capture, error) {
	p.c.mu.Lock()
	defer p.c.mu.Unlock()
	return p.endLocked()
}

func (p *Pending) endLocked() (*Capture, error) {
	c := p.c
	if p.done != nil || p.err != nil {
		return p.done, p.err
	}
	if c.pending != p {
		return nil, errors.New("alert: checkpoint: a capture ended twice, or after a later one began")
	}
	c.pending = nil
	for _, rs := range p.states {
		rs.keepAll()
		rs.cow = nil
	}
	p.stopWalks()
	for _, cow := range p.sets {
		cow.pending = nil // all kept: its memory can go
	}
	if err := errors.Join(p.e.Err(), p.spool.flush()); err != nil {
		// The changes taken at Begin are in no segment: the next writes them all.
		c.whole = true
		p.spool.close()
		p.err = fmt.Errorf("alert: checkpoint: %w", err)
		return nil, p.err
	}
	c.writes++
	name := fmt.Sprintf("seg-%s-%d.alert", c.nonce, c.writes)
	if c.unwritten == nil {
		c.unwritten = map[string]*Pending{}
	}
	c.unwritten[name] = p
	c.list = append(slices.Clip(c.list), Segment{File: partition.File{Name: name}})
	c.prev = p.rules
	p.done = &Capture{c: c, list: c.list}
	return p.done, nil
}

// writeUnwritten writes the files of list's segments ended and not written yet
// (Pending.End), before they are compacted or uploaded. One that fails is in no
// file: the next capture writes every group.
func (c *Checkpoints) writeUnwritten(list []Segment) error {
	for _, sg := range list {
		p := c.unwritten[sg.File.Name]
		if p == nil {
			continue
		}
		delete(c.unwritten, sg.File.Name)
		path := filepath.Join(c.dir, sg.File.Name)
		err := os.MkdirAll(c.dir, 0o755)
		if err == nil {
			err = p.write(path)
		}
		p.spool.close()
		if err != nil {
			c.whole = true
			_ = os.Remove(path)
			return fmt.Errorf("alert: checkpoint: %w", err)
		}
	}
	return nil
}

// write writes the segment of the groups kept, in key order.
func (p *Pending) write(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sw, err := newSegWriter(f, p.h)
	if err != nil {
		return err
	}
	data, unmap, err := mapFile(p.spool.f, p.spool.off)
	if err != nil {
		return fmt.Errorf("read the spooled groups: %w", err)
	}
	defer unmap()
	for i, cow := range p.sets {
		slices.SortFunc(cow.recs, func(a, b cowRec) int { return strings.Compare(a.key, b.key) })
		for _, r := range cow.recs {
			var rec []byte // nil: a tombstone
			if r.n >= 0 {
				rec = data[r.off : r.off+int64(r.n) : r.off+int64(r.n)]
			}
			if err := sw.record(i, r.key, rec); err != nil {
				return err
			}
		}
		cow.recs = nil
	}
	if err := sw.end(); err != nil {
		return err
	}
	return f.Close()
}

// stopWalks ends the steps' walks of the sets.
func (p *Pending) stopWalks() {
	for _, cow := range p.sets {
		if cow.stop != nil {
			cow.stop()
			cow.next, cow.stop = nil, nil
		}
	}
}

// discardPending gives up the capture begun and those ended and not written:
// their segments are in no list any more (c.mu held).
func (c *Checkpoints) discardPending() {
	if c.pending != nil {
		c.pending.stopWalks()
		c.pending.spool.close()
	}
	for _, p := range c.unwritten {
		p.spool.close()
	}
	c.pending, c.unwritten = nil, nil
}

// cowSet is a rule's part of a capture in flight: the groups changed before it
// not encoded yet (pending), and those encoded, as they were then (recs, their
// encodings in spool); next walks pending for Step (stop ends the walk).
type cowSet struct {
	pending map[string]struct{}
	recs    []cowRec
	spool   *spool
	next    func() (string, bool)
	stop    func()
}

// cowRec is where a group's record is in the spool; n < 0: it had gone.
type cowRec struct {
	key string
	off int64
	n   int
}

// spool holds the groups a capture in flight encoded, in the order they were
// kept, until its upload writes them sorted as the segment's file: in a file, not
// in memory, since a save's changed groups are many under a backlog (the
// production benchmark's peak RSS went past 400 MiB with them in memory). The
// file is unlinked at once: nothing is left of it if the process dies.
type spool struct {
	f   *os.File
	w   *bufio.Writer
	off int64
	buf []byte // a group's encoding, before it is spooled
	err error
}

func newSpool(dir string) (*spool, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.CreateTemp(dir, "spool-*")
	if err != nil {
		return nil, err
	}
	if err := os.Remove(f.Name()); err != nil {
		_ = f.Close()
		return nil, err
	}
	return &spool{f: f, w: bufio.NewWriterSize(f, 1<<16)}, nil
}

// add spools rec and returns where it is (a write's error is kept for flush).
func (s *spool) add(rec []byte) cowRec {
	r := cowRec{off: s.off, n: len(rec)}
	if s.err == nil {
		_, s.err = s.w.Write(rec)
	}
	s.off += int64(len(rec))
	return r
}

// flush writes what the spool buffers, and tells whether any write failed.
func (s *spool) flush() error {
	if s.err == nil {
		s.err = s.w.Flush()
	}
	if s.err != nil {
		return fmt.Errorf("spool the changed groups: %w", s.err)
	}
	return nil
}

// close closes the spool's file (nil: none), freeing its space.
func (s *spool) close() {
	if s != nil && s.f != nil {
		_ = s.f.Close()
		s.f = nil
	}
}

// keep encodes the group of key into the capture in flight as it is now, if the
// capture holds it and has not encoded it yet: call it before anything changes
// the group (or its place: made, gone, taken from disk).
func (rs *RuleState) keep(key string) {
	if _, ok := rs.cow.pending[key]; ok {
		rs.kept(key)
	}
}

// kept is keep for a key the capture holds and has not encoded yet.
func (rs *RuleState) kept(key string) {
	delete(rs.cow.pending, key)
	sp := rs.cow.spool
	var r cowRec
	if g := rs.Groups[key]; g != nil {
		// Its next change is noted for the next capture.
		g.dirty = false
		sp.buf = appendGroup(sp.buf[:0], g)
		r = sp.add(sp.buf)
	} else if rec := rs.cold.rawOf(key); rec != nil {
		r = sp.add(rec)
	} else {
		r.n = -1
	}
	r.key = key
	rs.cow.recs = append(rs.cow.recs, r)
}

// keepAll keeps every group the capture in flight holds still (none: no capture).
func (rs *RuleState) keepAll() {
	if rs == nil || rs.cow == nil {
		return
	}
	for key := range rs.cow.pending {
		rs.kept(key) // still pending, as in Step
	}
}

// keepAll is RuleState.keepAll for every rule, before a change to the rules.
func (e *Engine) keepAll() {
	for _, rs := range e.st.Rules {
		rs.keepAll()
	}
}

// captureLocked is Capture written at once, with c.mu held.
func (c *Checkpoints) captureLocked(e *Engine) (*Capture, error) {
	c.writes++
	name := fmt.Sprintf("seg-%s-%d.alert", c.nonce, c.writes)
	whole := c.whole
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		c.whole = true
		return nil, fmt.Errorf("alert: checkpoint: %w", err)
	}
	rules, err := e.writeSegment(filepath.Join(c.dir, name), c.prev, whole)
	if err != nil {
		// Some changes may be written to this segment only: the next writes them all.
		c.whole = true
		_ = os.Remove(filepath.Join(c.dir, name))
		return nil, fmt.Errorf("alert: checkpoint: %w", err)
	}
	sg := Segment{File: partition.File{Name: name}, Base: whole}
	if whole {
		c.drop(c.list, nil)
		c.list = []Segment{sg}
	} else {
		c.list = append(slices.Clip(c.list), sg)
	}
	c.prev, c.whole = rules, false
	return &Capture{c: c, list: c.list}, nil
}

// writeSegment writes the engine's state to path as a segment: every group
// (whole), or those of the rules with a version other than in prev and those that
// changed or went; it returns the rules it holds.
func (e *Engine) writeSegment(path string, prev map[string]string, whole bool) (map[string]string, error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names := slices.Sorted(maps.Keys(e.st.Rules))
	h := &segHeader{maxTime: e.st.MaxTime, partitions: e.st.Partitions}
	rules := make(map[string]string, len(names))
	for _, name := range names {
		rs := e.st.Rules[name]
		h.rules = append(h.rules, segRule{name: name, version: rs.Version, evaluated: rs.Evaluated, first: rs.First, hasFirst: rs.HasFirst,
			whole: whole || rs.reset || prev[name] != rs.Version})
		rules[name] = rs.Version
	}
	sw, err := newSegWriter(f, h)
	if err != nil {
		return nil, err
	}
	var buf []byte
	hot := func(i int, key string, g *GroupState) error {
		g.dirty = false
		buf = appendGroup(buf[:0], g)
		return sw.record(i, key, buf)
	}
	for i, name := range names {
		rs := e.st.Rules[name]
		if h.rules[i].whole {
			keys := slices.Sorted(maps.Keys(rs.Groups))
			if rs.cold != nil {
				// The groups in memory and those on disk, in key order (a group is in
				// one place).
				if err := rs.cold.each(func(key string, rec []byte) error {
					for ; len(keys) > 0 && keys[0] < key; keys = keys[1:] {
						if err := hot(i, keys[0], rs.Groups[keys[0]]); err != nil {
							return err
						}
					}
					return sw.record(i, key, rec)
				}); err != nil {
					return nil, fmt.Errorf("rule %s: %w", name, err)
				}
			}
			for _, key := range keys {
				if err := hot(i, key, rs.Groups[key]); err != nil {
					return nil, err
				}
			}
		} else {
			for _, key := range slices.Sorted(maps.Keys(rs.dirty)) {
				var err error
				if g := rs.Groups[key]; g != nil {
					err = hot(i, key, g)
				} else if rec := rs.cold.rawOf(key); rec != nil {
					err = sw.record(i, key, rec)
				} else {
					err = sw.record(i, key, nil)
				}
				if err != nil {
					return nil, err
				}
			}
		}
		if len(rs.dirty) > 4096 {
			rs.dirty = map[string]struct{}{} // clear keeps a big map's memory
		} else {
			clear(rs.dirty)
		}
		rs.reset = false
	}
	if err := sw.end(); err != nil {
		return nil, err
	}
	if err := e.Err(); err != nil {
		return nil, err
	}
	return rules, f.Close()
}

// rawOf is raw for a rule that may have no groups on disk (nil).
func (c *coldGroups) rawOf(key string) []byte {
	if c == nil {
		return nil
	}
	return c.raw(key)
}

// drop removes this machine's copies of the segments of list that keep does not
// name.
func (c *Checkpoints) drop(list, keep []Segment) {
	for _, sg := range list {
		if !slices.ContainsFunc(keep, func(k Segment) bool { return k.File.Name == sg.File.Name }) {
			if p := c.unwritten[sg.File.Name]; p != nil {
				p.spool.close()
				delete(c.unwritten, sg.File.Name)
			}
			_ = os.Remove(filepath.Join(c.dir, sg.File.Name))
		}
	}
}

// Close removes this machine's copies of the segments.
func (c *Checkpoints) Close() error {
	c.mu.Lock()
	c.discardPending()
	c.mu.Unlock()
	return os.RemoveAll(c.dir)
}

// Capture is a checkpoint captured, to upload and save.
type Capture struct {
	c    *Checkpoints
	list []Segment
}

// Upload compacts the checkpoint when due, uploads its files not uploaded yet and
// returns it, for the state the caller saves.
func (cp *Capture) Upload(ctx context.Context) ([]Segment, error) {
	c := cp.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.writeUnwritten(cp.list); err != nil {
		return nil, err
	}
	list, err := c.compact(cp.list)
	if err != nil {
		return nil, fmt.Errorf("alert: compact the checkpoint: %w", err)
	}
	if len(list) != len(cp.list) {
		c.drop(cp.list, list)
		c.list, cp.list = list, list
	}
	names := make([]string, len(list))
	for i, sg := range list {
		names[i] = sg.File.Name
	}
	files, err := c.files.Upload(ctx, c.dir, names)
	if err != nil {
		return nil, fmt.Errorf("alert: upload the checkpoint: %w", err)
	}
	out := make([]Segment, len(list))
	for i, sg := range list {
		out[i] = Segment{File: files[i], Base: sg.Base}
	}
	cp.list = out
	return out, nil
}

// Saved is told that the state naming the checkpoint Upload returned was saved.
func (cp *Capture) Saved(ctx context.Context) {
	files := make([]partition.File, len(cp.list))
	for i, sg := range cp.list {
		files[i] = sg.File
	}
	cp.c.files.Keep(ctx, files)
}

// compact merges the segments of list when due (see Checkpoints).
func (c *Checkpoints) compact(list []Segment) ([]Segment, error) {
	if len(list) < 2 || !list[0].Base {
		return list, nil
	}
	size := func(sg Segment) int64 {
		fi, err := os.Stat(filepath.Join(c.dir, sg.File.Name))
		if err != nil {
			return 0
		}
		return fi.Size()
	}
	var deltas int64
	for _, sg := range list[1:] {
		deltas += size(sg)
	}
	switch {
	case deltas > size(list[0])/2:
		sg, err := c.merge(list, true)
		return []Segment{sg}, err
	case len(list)-1 > maxDeltas:
		sg, err := c.merge(list[1:], false)
		return []Segment{list[0], sg}, err
	}
	return list, nil
}

// merge writes the segments of list as one: a base (the groups that went left
// out) or a delta.
func (c *Checkpoints) merge(list []Segment, base bool) (Segment, error) {
	readers := make([]*segReader, len(list))
	for i, sg := range list {
		f, err := os.Open(filepath.Join(c.dir, sg.File.Name))
		if err != nil {
			return Segment{}, err
		}
		defer f.Close()
		if readers[i], err = openSegReader(f); err != nil {
			return Segment{}, fmt.Errorf("segment %s: %w", sg.File.Name, err)
		}
	}
	c.writes++
	name := fmt.Sprintf("seg-%s-%d.alert", c.nonce, c.writes)
	path := filepath.Join(c.dir, name)
	f, err := os.Create(path)
	if err != nil {
		return Segment{}, err
	}
	defer f.Close()
	_, h := chain(readers)
	if base {
		for i := range h.rules {
			h.rules[i].whole = true
		}
	}
	sw, err := newSegWriter(f, h)
	if err == nil {
		err = mergeSegments(readers, func(i int, key string, rec []byte) error {
			if rec == nil && base {
				return nil
			}
			return sw.record(i, key, rec)
		})
	}
	if err == nil {
		err = sw.end()
	}
	if err == nil {
		err = f.Close()
	}
	if err != nil {
		_ = os.Remove(path)
		return Segment{}, err
	}
	c.log.Debug("alert checkpoint compacted", "segments", len(list), "base", base, "records", sw.records)
	return Segment{File: partition.File{Name: name}, Base: base}, nil
}
