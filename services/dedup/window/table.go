// Package window holds the dedup stage's state: every event key seen inside its
// dedup window, with the time the key leaves the window, in a compact hash table.
//
// A key is 128 bits (the stage hashes whatever identifies an event), an expiry is a
// uint32 of Unix seconds: 20 bytes a slot. The table is a Robin Hood hash table with
// linear probing, kept between 64% and 90% full by growing 1.4 times and by compacting
// after expired keys are removed, so the state costs 22 to 32 bytes per key.
package window

import (
	"math/bits"
	"slices"
)

// Key is a 128-bit event key.
type Key struct{ Hi, Lo uint64 }

// Table maps keys to expiries. The zero value is an empty table. It is not safe for
// concurrent use; Store wraps it with a lock.
type Table struct {
	keys []Key
	exp  []uint32 // 0: empty slot
	n    int
}

const (
	maxLoad     = 0.9
	growth      = 1.4
	compactLoad = maxLoad / growth // below this after a sweep, the table is rebuilt
	rebuildLoad = 0.8
	minSlots    = 16
	slotBytes   = 16 + 4
)

// clone returns a copy of t.
func (t *Table) clone() Table {
	return Table{keys: slices.Clone(t.keys), exp: slices.Clone(t.exp), n: t.n}
}

// Len is the number of keys held.
func (t *Table) Len() int { return t.n }

// Bytes is the memory the slots take.
func (t *Table) Bytes() int { return len(t.keys) * slotBytes }

func (t *Table) home(k Key) int {
	hi, _ := bits.Mul64(k.Lo, uint64(len(t.keys)))
	return int(hi)
}

func (t *Table) dist(pos int, k Key) int {
	d := pos - t.home(k)
	if d < 0 {
		d += len(t.keys)
	}
	return d
}

// Get returns k's expiry, or 0 when the table does not hold k.
func (t *Table) Get(k Key) uint32 {
	if t.n == 0 {
		return 0
	}
	pos, d := t.home(k), 0
	for {
		e := t.exp[pos]
		if e == 0 {
			return 0
		}
		if t.keys[pos] == k {
			return e
		}
		if t.dist(pos, t.keys[pos]) < d {
			return 0
		}
		pos++
		if pos == len(t.keys) {
			pos = 0
		}
		d++
	}
}

// Put sets k's expiry, adding k if it is not held. exp must not be 0.
func (t *Table) Put(k Key, exp uint32) {
	if float64(t.n+1) > maxLoad*float64(len(t.keys)) {
		t.resize(max(minSlots, int(float64(len(t.keys))*growth)+1))
	}
	pos, d := t.home(k), 0
	for {
		e := t.exp[pos]
		if e == 0 {
			t.keys[pos], t.exp[pos] = k, exp
			t.n++
			return
		}
		if t.keys[pos] == k {
			t.exp[pos] = exp
			return
		}
		if ed := t.dist(pos, t.keys[pos]); ed < d {
			// Robin Hood: the richer entry moves on.
			t.keys[pos], k = k, t.keys[pos]
			t.exp[pos], exp = exp, t.exp[pos]
			d = ed
		}
		pos++
		if pos == len(t.keys) {
			pos = 0
		}
		d++
	}
}

// removeAt empties pos and shifts the following entries back.
func (t *Table) removeAt(pos int) {
	for {
		next := pos + 1
		if next == len(t.keys) {
			next = 0
		}
		if t.exp[next] == 0 || t.dist(next, t.keys[next]) == 0 {
			t.keys[pos], t.exp[pos] = Key{}, 0
			break
		}
		t.keys[pos], t.exp[pos] = t.keys[next], t.exp[next]
		pos = next
	}
	t.n--
}

// RemoveIf removes every key whose expiry matches drop, compacts the table when it
// has become sparse, and returns how many keys it removed.
func (t *Table) RemoveIf(drop func(exp uint32) bool) int {
	removed := 0
	for i := 0; i < len(t.keys); {
		if e := t.exp[i]; e != 0 && drop(e) {
			t.removeAt(i)
			removed++
			continue // an entry shifted into i
		}
		i++
	}
	if len(t.keys) > minSlots && float64(t.n) < compactLoad*float64(len(t.keys)) {
		t.resize(max(minSlots, int(float64(t.n)/rebuildLoad)+1))
	}
	return removed
}

// Expire removes the keys whose expiry is at or before now.
func (t *Table) Expire(now uint32) int {
	return t.RemoveIf(func(exp uint32) bool { return exp <= now })
}

// Range calls f for every key held, until f returns false.
func (t *Table) Range(f func(k Key, exp uint32) bool) {
	for i, e := range t.exp {
		if e != 0 && !f(t.keys[i], e) {
			return
		}
	}
}

// ExpiryRange returns the earliest and latest expiry held (0, 0 when empty).
func (t *Table) ExpiryRange() (lo, hi uint32) {
	for _, e := range t.exp {
		if e == 0 {
			continue
		}
		if lo == 0 || e < lo {
			lo = e
		}
		hi = max(hi, e)
	}
	return lo, hi
}

func (t *Table) resize(slots int) {
	oldKeys, oldExp := t.keys, t.exp
	t.keys, t.exp, t.n = make([]Key, slots), make([]uint32, slots), 0
	for i, e := range oldExp {
		if e != 0 {
			t.Put(oldKeys[i], e)
		}
	}
}
