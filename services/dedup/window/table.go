// Package window holds the dedup stage's state: every event key seen inside its
// dedup window, with the time the key leaves the window, in a compact hash table.
//
// A key is 128 bits (the stage hashes whatever identifies an event), an expiry is a
// uint32 of Unix seconds: 20 bytes a slot. The table is a Robin Hood hash table with
// linear probing, kept up to 90% full by growing 1.4 times (to 64%), and compacted
// to 80% when removing expired keys leaves it below 32%, so the state costs 22 to
// 32 bytes per key as keys come and go steadily (up to 62 after a mass expiry), and,
// from 80% full until it has moved to a new size, that set too (up to 60 bytes per
// key then).
package window

import (
	"math/bits"
	"slices"
)

// Key is a 128-bit event key.
type Key struct{ Hi, Lo uint64 }

// Table maps keys to expiries. The zero value is an empty table. It is not safe for
// concurrent use; Store wraps it with a lock.
//
// The table grows a few slots at a time: a new set of slots takes the keys added,
// and each Put moves the next moveStep slots of the set before it, which lookups
// read until it is emptied. Rehashing every key at once held the stage for as long
// as a million keys take (hundreds of milliseconds in the decide loop, the tail of
// the publish-to-row latency).
type Table struct {
	cur slots
	// n is how many keys the table holds, in both sets.
	n int
	// old is the set the table is moving from (nil: none); its slots before moved
	// are moved.
	old   *slots
	moved int
	// gone marks the slots of old whose key RemoveIf removed during the move (a
	// bit a slot; nil until one is): the slot stays, so that lookups of the keys
	// after it probe past it, and holds no key.
	gone []uint64
	// ready is the set the table grows into next, made once cur is prepLoad full
	// and written a page at a time by every touchEvery-th Put (touched: the bytes
	// written, keys then expiries). The first write to a page of new memory is a
	// page fault (about 10 µs on this project's test VM: 130 ms for a 50 MB set);
	// made at the grow, those faults fell on the Puts right after it.
	ready   *slots
	touched int
	puts    int
	// max is the keys the table's owner holds at most (0: no bound): a table
	// whose size holds them without growing makes no next set ready.
	max int
	// sweepAt is the next slot of cur that a sweep in steps (ExpireStep) looks
	// at; sweepSize is cur's size when it began (a set of another size begins
	// it again).
	sweepAt, sweepSize int
}

// slots is one Robin Hood hash table with linear probing.
type slots struct {
	keys []Key
	exp  []uint32 // 0: empty slot
	used int
}

const (
	maxLoad = 0.9
	growth  = 1.4
	// compactLoad: below this after a sweep, the table is rebuilt. Half a just-grown
	// table's load: a table is not rebuilt by the sweeps right after it grew (a
	// rebuild is every key at once), only once most of its keys are gone.
	compactLoad = maxLoad / growth / 2
	rebuildLoad = 0.8
	minSlots    = 16
	slotBytes   = 16 + 4
	// moveStep is how many slots of the set before each Put moves: enough that the
	// move ends before the new set fills (0.9 S keys of S slots move to 1.4 S
	// slots, full at 1.26 S keys: the S/4 puts of a move add fewer than the 0.36 S
	// of room), and few, so that a Put during a move costs a few more probes.
	moveStep = 4
	// prepLoad: from this full, the next set is made ready (Table.ready).
	prepLoad = 0.8
	// touchEvery: one Put in touchEvery writes a page of the next set. The 1.4 S
	// slots' 28 S bytes are 0.0068 S pages, written in 0.055 S puts: before the
	// 0.1 S puts from prepLoad to maxLoad add as many keys.
	touchEvery = 8
	pageBytes  = 4096
)

// clone returns a copy of t.
func (t *Table) clone() Table {
	sh := t.shape()
	return t.cloneInto(touchedSlots(sh.cur), touchedSlots(sh.old))
}

// shape is the sizes of a table's sets (cur, and old during a move: 0 when
// none): the sets a copy of it is made in.
type shape struct{ cur, old int }

func (t *Table) shape() shape {
	sh := shape{cur: len(t.cur.keys)}
	if t.old != nil {
		sh.old = len(t.old.keys)
	}
	return sh
}

// cloneInto returns a copy of t in cur and old, sets of t's shape.
func (t *Table) cloneInto(cur, old slots) Table {
	t.cur.copyTo(&cur)
	c := Table{cur: cur, n: t.n, moved: t.moved, gone: slices.Clone(t.gone), max: t.max}
	if t.old != nil {
		t.old.copyTo(&old)
		c.old = &old
	}
	return c
}

// copyTo copies s into d, a set of s's size.
func (s *slots) copyTo(d *slots) {
	copy(d.keys, s.keys)
	copy(d.exp, s.exp)
	d.used = s.used
}

// touchedSlots returns an empty set of size slots, each page of its memory
// written once already: the first write to a page of new memory is a page fault
// (about 10 µs here), which a copy into it later then does not meet.
func touchedSlots(size int) slots {
	s := slots{keys: make([]Key, size), exp: make([]uint32, size)}
	for i := 0; i < len(s.keys); i += pageBytes / 16 {
		s.keys[i] = Key{}
	}
	for i := 0; i < len(s.exp); i += pageBytes / 4 {
		s.exp[i] = 0
	}
	return s
}

// Len is the number of keys held.
func (t *Table) Len() int { return t.n }

// Bytes is the memory the slots take.
func (t *Table) Bytes() int {
	b := len(t.cur.keys) * slotBytes
	if t.old != nil {
		b += len(t.old.keys)*slotBytes + len(t.gone)*8
	}
	if t.ready != nil {
		b += len(t.ready.keys) * slotBytes
	}
	return b
}

func (s *slots) home(k Key) int {
	hi, _ := bits.Mul64(k.Lo, uint64(len(s.keys)))
	return int(hi)
}

func (s *slots) dist(pos int, k Key) int {
	d := pos - s.home(k)
	if d < 0 {
		d += len(s.keys)
	}
	return d
}

// Get returns k's expiry, or 0 when the table does not hold k.
func (t *Table) Get(k Key) uint32 {
	if e := t.cur.get(k); e != 0 || t.old == nil {
		return e
	}
	// Not moved yet (a key moved, or put again, is in cur).
	return t.oldGet(k)
}

// oldGet is k's expiry in the set the table moves from, 0 when it holds none.
func (t *Table) oldGet(k Key) uint32 {
	if pos := t.old.find(k); pos >= 0 && !t.isGone(pos) {
		return t.old.exp[pos]
	}
	return 0
}

func (t *Table) isGone(pos int) bool {
	return t.gone != nil && t.gone[pos/64]&(1<<(pos%64)) != 0
}

func (t *Table) markGone(pos int) {
	if t.gone == nil {
		t.gone = make([]uint64, (len(t.old.keys)+63)/64)
	}
	t.gone[pos/64] |= 1 << (pos % 64)
}

func (s *slots) get(k Key) uint32 {
	if pos := s.find(k); pos >= 0 {
		return s.exp[pos]
	}
	return 0
}

// find returns k's slot, or -1.
func (s *slots) find(k Key) int {
	if s.used == 0 {
		return -1
	}
	pos, d := s.home(k), 0
	for {
		e := s.exp[pos]
		if e == 0 {
			return -1
		}
		if s.keys[pos] == k {
			return pos
		}
		if s.dist(pos, s.keys[pos]) < d {
			return -1
		}
		pos++
		if pos == len(s.keys) {
			pos = 0
		}
		d++
	}
}

// Put sets k's expiry, adding k if it is not held. exp must not be 0.
func (t *Table) Put(k Key, exp uint32) {
	t.move(moveStep)
	t.prepare()
	if float64(t.cur.used+1) > maxLoad*float64(len(t.cur.keys)) {
		t.grow(t.nextSize())
	}
	if t.cur.put(k, exp) && (t.old == nil || t.oldGet(k) == 0) {
		t.n++
	}
}

// put sets k's expiry in s and reports whether k was added. s has room.
func (s *slots) put(k Key, exp uint32) bool {
	pos, d := s.home(k), 0
	for {
		e := s.exp[pos]
		if e == 0 {
			s.keys[pos], s.exp[pos] = k, exp
			s.used++
			return true
		}
		if s.keys[pos] == k {
			s.exp[pos] = exp
			return false
		}
		if ed := s.dist(pos, s.keys[pos]); ed < d {
			// Robin Hood: the richer entry moves on.
			s.keys[pos], k = k, s.keys[pos]
			s.exp[pos], exp = exp, s.exp[pos]
			d = ed
		}
		pos++
		if pos == len(s.keys) {
			pos = 0
		}
		d++
	}
}

// nextSize is the size cur grows to.
func (t *Table) nextSize() int {
	return max(minSlots, int(float64(len(t.cur.keys))*growth)+1)
}

// prepare makes the next set ready once cur is prepLoad full (not during a
// move), and writes a page of it every touchEvery Puts until it is all written.
func (t *Table) prepare() {
	if t.ready == nil {
		if t.old != nil || float64(t.cur.used) < prepLoad*float64(len(t.cur.keys)) ||
			t.max > 0 && float64(t.max) <= maxLoad*float64(len(t.cur.keys)) {
			return
		}
		size := t.nextSize()
		t.ready, t.touched = &slots{keys: make([]Key, size), exp: make([]uint32, size)}, 0
	}
	if t.puts++; t.puts%touchEvery != 0 {
		return
	}
	r := t.ready
	switch kb := len(r.keys) * 16; {
	case t.touched < kb:
		r.keys[t.touched/16] = Key{}
	case t.touched-kb < len(r.exp)*4:
		r.exp[(t.touched-kb)/4] = 0
	default:
		return
	}
	t.touched += pageBytes
}

// grow makes a set of size slots (the ready one, if it is of that size) the one
// keys go to; the keys held move to it moveStep slots a Put. (A move still under
// way, which moveStep leaves no room for, is ended at once into the new set.)
func (t *Table) grow(size int) {
	var next slots
	if r := t.ready; r != nil && len(r.keys) == size {
		next = *r
	} else {
		next = slots{keys: make([]Key, size), exp: make([]uint32, size)}
	}
	t.ready = nil
	if t.old != nil {
		t.Range(func(k Key, e uint32) bool { next.put(k, e); return true })
		t.cur, t.old, t.moved, t.gone = next, nil, 0, nil
		return
	}
	if t.cur.used == 0 {
		t.cur = next
		return
	}
	old := t.cur
	t.cur, t.old, t.moved = next, &old, 0
}

// move moves up to n slots of the set before (n < 0: all of them) to cur. A key
// in cur already was put again since: its expiry there is the newer.
func (t *Table) move(n int) {
	if t.old == nil {
		return
	}
	o := t.old
	for ; t.moved < len(o.keys) && n != 0; t.moved++ {
		if e := o.exp[t.moved]; e != 0 && !t.isGone(t.moved) && t.cur.get(o.keys[t.moved]) == 0 {
			t.cur.put(o.keys[t.moved], e)
		}
		n--
	}
	if t.moved == len(o.keys) {
		t.old, t.moved, t.gone = nil, 0, nil
	}
}

// removeAt empties pos and shifts the following entries back.
func (s *slots) removeAt(pos int) {
	for {
		next := pos + 1
		if next == len(s.keys) {
			next = 0
		}
		if s.exp[next] == 0 || s.dist(next, s.keys[next]) == 0 {
			s.keys[pos], s.exp[pos] = Key{}, 0
			break
		}
		s.keys[pos], s.exp[pos] = s.keys[next], s.exp[next]
		pos = next
	}
	s.used--
}

// RemoveIf removes every key whose expiry matches drop, compacts the table when it
// has become sparse, and returns how many keys it removed. A move under way goes
// on: a key removed from the set before is marked gone there (ending the move at
// once would rehash every key not moved yet, in the caller's time).
func (t *Table) RemoveIf(drop func(exp uint32) bool) int {
	s := &t.cur
	removed := 0
	for i := 0; i < len(s.keys); {
		if e := s.exp[i]; e != 0 && drop(e) {
			if t.old != nil {
				// An older expiry of the key in the set before goes with it.
				if pos := t.old.find(s.keys[i]); pos >= 0 {
					t.markGone(pos)
				}
			}
			s.removeAt(i)
			removed++
			continue // an entry shifted into i
		}
		i++
	}
	if o := t.old; o != nil {
		// The keys not moved yet (a key in cur has its expiry there).
		for i := t.moved; i < len(o.keys); i++ {
			if e := o.exp[i]; e != 0 && !t.isGone(i) && drop(e) && s.get(o.keys[i]) == 0 {
				t.markGone(i)
				removed++
			}
		}
	}
	t.n -= removed
	t.compact()
	return removed
}

// compact rebuilds the table at once when removals have left it sparse: the
// memory the removed keys took is let go now, and a table this sparse holds few
// keys for its size.
func (t *Table) compact() {
	if len(t.cur.keys) <= minSlots || float64(t.n) >= compactLoad*float64(len(t.cur.keys)) {
		return
	}
	next := slots{keys: make([]Key, max(minSlots, int(float64(t.n)/rebuildLoad)+1))}
	next.exp = make([]uint32, len(next.keys))
	t.Range(func(k Key, e uint32) bool { next.put(k, e); return true })
	t.cur, t.old, t.moved, t.gone, t.ready = next, nil, 0, nil, nil
}

// ExpireStep is Expire in steps, for a caller that must not be held for as long
// as a whole table takes (about 30 ms a million keys on a busy machine): each
// call looks at the next n slots of a sweep through the table and removes the
// keys expired at now among them, and it reports whether the sweep has slots
// left. A sweep that reaches the end compacts the table as Expire does and the
// next call begins another. While a move to a new set is under way, a step moves
// n slots instead (the sweep goes through one set). A key that Puts move across
// the sweep's position may be passed over until the next sweep: an expired key
// still held is not a key seen (Get's callers compare its expiry with their time).
func (t *Table) ExpireStep(now uint32, n int) bool {
	if t.old != nil {
		t.move(n)
		return true
	}
	s := &t.cur
	if len(s.keys) != t.sweepSize {
		t.sweepAt, t.sweepSize = 0, len(s.keys)
	}
	end := min(t.sweepAt+n, len(s.keys))
	for i := t.sweepAt; i < end; {
		if e := s.exp[i]; e != 0 && e <= now {
			s.removeAt(i)
			t.n--
			continue // an entry shifted into i
		}
		i++
	}
	if t.sweepAt = end; end < len(s.keys) {
		return true
	}
	t.sweepAt = 0
	t.compact()
	return false
}

// Expire removes the keys whose expiry is at or before now.
func (t *Table) Expire(now uint32) int {
	return t.RemoveIf(func(exp uint32) bool { return exp <= now })
}

// Range calls f for every key held, until f returns false.
func (t *Table) Range(f func(k Key, exp uint32) bool) {
	for i, e := range t.cur.exp {
		if e != 0 && !f(t.cur.keys[i], e) {
			return
		}
	}
	if o := t.old; o != nil {
		for i := t.moved; i < len(o.keys); i++ {
			if e := o.exp[i]; e != 0 && !t.isGone(i) && t.cur.get(o.keys[i]) == 0 && !f(o.keys[i], e) {
				return
			}
		}
	}
}

// ExpiryRange returns the earliest and latest expiry held (0, 0 when empty).
func (t *Table) ExpiryRange() (lo, hi uint32) {
	t.Range(func(_ Key, e uint32) bool {
		if lo == 0 || e < lo {
			lo = e
		}
		hi = max(hi, e)
		return true
	})
	return lo, hi
}
