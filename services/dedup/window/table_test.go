package window

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

func randKey(r *rand.Rand) Key { return Key{r.Uint64(), r.Uint64()} }

// The table agrees with a map through random puts, gets and expiries.
func TestTableMatchesMap(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var tb Table
	model := map[Key]uint32{}
	keys := make([]Key, 0, 5000)
	sweptMoving := 0 // sweeps that left a move under way
	for step := range 200_000 {
		switch op := r.IntN(10); {
		case op < 6:
			k := randKey(r)
			if len(keys) > 0 && r.IntN(3) == 0 {
				k = keys[r.IntN(len(keys))] // update an existing key
			} else {
				keys = append(keys, k)
			}
			exp := uint32(1 + r.IntN(1000))
			tb.Put(k, exp)
			model[k] = exp
		case op < 9:
			var k Key
			if len(keys) > 0 && r.IntN(2) == 0 {
				k = keys[r.IntN(len(keys))]
			} else {
				k = randKey(r)
			}
			if got, want := tb.Get(k), model[k]; got != want {
				t.Fatalf("step %d: Get = %d, want %d", step, got, want)
			}
		default:
			now := uint32(r.IntN(1000))
			moving := tb.old != nil
			removed := tb.Expire(now)
			if moving && tb.old != nil {
				sweptMoving++
			}
			want := 0
			for k, e := range model {
				if e <= now {
					delete(model, k)
					want++
				}
			}
			if removed != want {
				t.Fatalf("step %d: Expire removed %d, want %d", step, removed, want)
			}
		}
		if tb.Len() != len(model) {
			t.Fatalf("step %d: Len = %d, want %d", step, tb.Len(), len(model))
		}
		if step%5000 == 0 || tb.old != nil && step%97 == 0 {
			checkRange(t, &tb, model)
			c := tb.clone()
			checkRange(t, &c, model)
		}
	}
	for k, e := range model {
		if got := tb.Get(k); got != e {
			t.Fatalf("final Get = %d, want %d", got, e)
		}
	}
	if sweptMoving < 100 {
		t.Fatalf("%d sweeps during a move left it under way: the test does not cover them", sweptMoving)
	}
}

// A sweep in steps (ExpireStep), with puts, grows and moves between its steps and
// time going on, never loses or changes a key still inside its window, keeps Len
// true, and, once a sweep with no put between its steps ends, holds no key
// expired at the time it used.
func TestExpireStepMatchesMap(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var tb Table
	model := map[Key]uint32{} // every key put and not seen removed
	now := uint32(1)
	sweeps, quiet := 0, 0
	check := func(step int) {
		held := 0
		tb.Range(func(k Key, e uint32) bool {
			if model[k] != e {
				t.Fatalf("step %d: the table holds %v until %d, the model until %d", step, k, e, model[k])
			}
			held++
			return true
		})
		if tb.Len() != held {
			t.Fatalf("step %d: Len = %d, %d keys held", step, tb.Len(), held)
		}
		for k, e := range model {
			switch got := tb.Get(k); {
			case got == e:
			case got == 0 && e <= now:
				delete(model, k) // expired and removed
			default:
				t.Fatalf("step %d: Get = %d, want %d (now %d)", step, got, e, now)
			}
		}
	}
	for step := range 100_000 {
		switch op := r.IntN(20); {
		case op < 12:
			exp := now + uint32(1+r.IntN(300))
			k := randKey(r)
			tb.Put(k, exp)
			model[k] = exp
		case op < 19:
			n := 1 + r.IntN(200)
			if !tb.ExpireStep(now, n) {
				sweeps++
			}
		default:
			now += uint32(r.IntN(20))
			if r.IntN(10) == 0 {
				// A sweep with nothing put between its steps (after the end of
				// the one under way, begun before now moved on).
				for tb.ExpireStep(now, 1+r.IntN(500)) {
				}
				for tb.ExpireStep(now, 1+r.IntN(500)) {
				}
				check(step)
				for k, e := range model {
					if e <= now {
						t.Fatalf("step %d: a whole sweep at %d left %v, expired at %d", step, now, k, e)
					}
				}
				quiet++
			}
		}
		if step%1000 == 0 {
			check(step)
		}
	}
	check(-1)
	if sweeps < 100 || quiet < 100 {
		t.Fatalf("%d sweeps ended between puts, %d without: the test does not cover them", sweeps, quiet)
	}
}

// A sweep during a move removes the expired keys of both sets and leaves the
// move going (ending it would rehash the keys not moved yet at once), and a table
// just grown is not rebuilt by it.
func TestSweepDuringMove(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	var tb Table
	model := map[Key]uint32{}
	for tb.old == nil || len(tb.old.keys) < 10_000 || tb.moved < len(tb.old.keys)/2 {
		k, e := randKey(r), uint32(1+r.IntN(100))
		tb.Put(k, e)
		model[k] = e
	}
	moved, size := tb.moved, len(tb.cur.keys)
	removed := tb.Expire(10)
	var gone []Key
	for k, e := range model {
		if e <= 10 {
			delete(model, k)
			gone = append(gone, k)
		}
	}
	want := len(gone)
	if removed != want || tb.Len() != len(model) {
		t.Fatalf("Expire removed %d (Len %d), want %d (Len %d)", removed, tb.Len(), want, len(model))
	}
	if tb.old == nil || tb.moved != moved || len(tb.cur.keys) != size {
		t.Fatalf("the sweep ended the move or rebuilt the table (moved %d of %d before)", moved, size)
	}
	checkRange(t, &tb, model)
	for k, e := range model {
		if got := tb.Get(k); got != e {
			t.Fatalf("Get = %d, want %d", got, e)
		}
	}
	// Removed keys stay removed as the move goes on, and come back when put again.
	for i := 0; tb.old != nil; i++ {
		k, e := randKey(r), uint32(11+r.IntN(100))
		if i%2 == 0 && len(gone) > 0 {
			k, gone = gone[0], gone[1:]
		}
		tb.Put(k, e)
		model[k] = e
	}
	if tb.Len() != len(model) {
		t.Fatalf("Len %d, want %d", tb.Len(), len(model))
	}
	checkRange(t, &tb, model)
}

// checkRange fails t unless tb.Range gives each key of model once, with its expiry.
func checkRange(t *testing.T, tb *Table, model map[Key]uint32) {
	t.Helper()
	seen := map[Key]bool{}
	tb.Range(func(k Key, e uint32) bool {
		if seen[k] {
			t.Fatalf("Range gives %v twice", k)
		}
		seen[k] = true
		if model[k] != e {
			t.Fatalf("Range gives %v with %d, want %d", k, e, model[k])
		}
		return true
	})
	if len(seen) != len(model) {
		t.Fatalf("Range gives %d keys, want %d", len(seen), len(model))
	}
}

func TestTableBytesPerKey(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	var tb Table
	for n := 1; n <= 300_000; n++ {
		tb.Put(randKey(r), 100)
		if n >= 1000 {
			// From 80% full until it moved to a new size, the table holds the next
			// set too.
			per, most := float64(tb.Bytes())/float64(n), 32.0
			if tb.old != nil || tb.ready != nil {
				most = 60
			}
			if per > most {
				t.Fatalf("%d keys: %.1f bytes a key, want at most %.0f", n, per, most)
			}
		}
		if tb.ready != nil && n > 100_000 && float64(tb.cur.used+1) > maxLoad*float64(len(tb.cur.keys)) {
			// The next Put grows the table: the set it grows into is written whole.
			if want := len(tb.ready.keys) * slotBytes; tb.touched < want {
				t.Fatalf("%d keys: %d of the next set's %d bytes written when it is needed", n, tb.touched, want)
			}
			next := &tb.ready.keys[0]
			n++
			tb.Put(randKey(r), 100)
			if &tb.cur.keys[0] != next {
				t.Fatalf("%d keys: the table grew into another set than the one made ready", n)
			}
		}
		if tb.old != nil && tb.moved == 0 && n > 1 {
			// A move starts: it ends within the old set's slots / moveStep puts.
			left := (len(tb.old.keys) + moveStep - 1) / moveStep
			for range left {
				n++
				tb.Put(randKey(r), 100)
			}
			if tb.old != nil {
				t.Fatalf("%d keys: a move not ended after %d puts", n, left)
			}
		}
	}
	// Removing most keys compacts the table.
	i := 0
	tb.RemoveIf(func(uint32) bool { i++; return i%10 != 0 })
	if per := float64(tb.Bytes()) / float64(tb.Len()); per > 32 {
		t.Fatalf("after removing 90%%: %.1f bytes a key", per)
	}
}

func TestStoreWindowAndCap(t *testing.T) {
	s := NewStore(1000)
	k := Key{1, 2}
	tests := []struct {
		name string
		now  uint32
		want bool
	}{
		{"before add", 10, false},
	}
	for _, tt := range tests {
		if got := s.Seen(k, tt.now); got != tt.want {
			t.Fatalf("%s: Seen = %v", tt.name, got)
		}
	}
	s.Add(k, 100, 1, 10)
	for _, tt := range []struct {
		name string
		now  uint32
		want bool
	}{
		{"inside the window", 50, true},
		{"last second inside", 99, true},
		{"at expiry", 100, false},
		{"after", 150, false},
	} {
		if got := s.Seen(k, tt.now); got != tt.want {
			t.Errorf("%s: Seen = %v, want %v", tt.name, got, tt.want)
		}
	}
	s.Add(Key{9, 9}, 5, 2, 10) // already expired: not held
	if s.Stats().Keys != 1 || s.Stats().LastSeq != 2 {
		t.Fatalf("stats = %+v", s.Stats())
	}
	// Fill to the cap with expiries 1001..2000: the next key drops the earliest tenth.
	full := NewStore(1000)
	for i := range 1000 {
		full.Add(Key{uint64(i), 7}, uint32(1001+i), uint64(i+1), 1000)
	}
	full.Add(Key{5000, 7}, 3000, 1001, 1000)
	st := full.Stats()
	if st.Keys > 1000 || st.EvictedEarly == 0 || st.Horizon < 1001 {
		t.Fatalf("after the cap: %+v", st)
	}
	if full.Seen(Key{0, 7}, 1000) {
		t.Fatal("the earliest-expiring key should have been dropped")
	}
	if !full.Seen(Key{999, 7}, 1000) || !full.Seen(Key{5000, 7}, 1000) {
		t.Fatal("the latest keys should be held")
	}
}

func TestSnapshotRoundTrip(t *testing.T) {
	s := NewStore(0)
	r := rand.New(rand.NewPCG(5, 6))
	keys := make([]Key, 10_000)
	for i := range keys {
		keys[i] = randKey(r)
		s.Add(keys[i], uint32(100+i%50), uint64(i+1), 0)
	}
	var buf bytes.Buffer
	if err := s.WriteSnapshot(&buf); err != nil {
		t.Fatal(err)
	}
	raw := buf.Bytes()
	back := NewStore(0)
	seq, err := back.ReadSnapshot(bytes.NewReader(raw), 120)
	if err != nil {
		t.Fatal(err)
	}
	if seq != 10_000 {
		t.Fatalf("last seq = %d", seq)
	}
	for i, k := range keys {
		want := 100+i%50 > 120
		if got := back.Seen(k, 120); got != want {
			t.Fatalf("key %d: Seen = %v, want %v", i, got, want)
		}
	}
	// ReadKeys gives every key written, with its expiry, in the order written.
	var written, read []Key
	var exps []uint32
	s.t.Range(func(k Key, _ uint32) bool { written = append(written, k); return true })
	if _, err := ReadKeys(bytes.NewReader(raw), 0, func(k Key, exp uint32) { read, exps = append(read, k), append(exps, exp) }); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(read, written) {
		t.Fatalf("ReadKeys read %d keys, %d written (or another order)", len(read), len(written))
	}
	for i, k := range read {
		if exps[i] != s.t.Get(k) {
			t.Fatalf("key %d: expiry %d read, %d written", i, exps[i], s.t.Get(k))
		}
	}
	for _, bad := range [][]byte{raw[:len(raw)-1], append(append([]byte{}, raw[:30]...), raw[31:]...), []byte("nope")} {
		if _, err := NewStore(0).ReadSnapshot(bytes.NewReader(bad), 0); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("corrupt snapshot: err = %v", err)
		}
	}
	other := NewStore(0)
	other.SetOrigin(42)
	if _, err := other.ReadSnapshot(bytes.NewReader(raw), 0); !errors.Is(err, ErrOtherOrigin) {
		t.Fatalf("snapshot of another stream: err = %v", err)
	}
	if other.Stats().Keys != 0 {
		t.Fatal("a refused snapshot left keys behind")
	}
	flipped := append([]byte{}, raw...)
	flipped[40] ^= 1
	if _, err := NewStore(0).ReadSnapshot(bytes.NewReader(flipped), 0); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("flipped bit: err = %v", err)
	}
}

// A store whose table holds its cap makes no next set ready: the table never
// grows again.
func TestCappedStoreMakesNoNextSet(t *testing.T) {
	size := minSlots
	for size < 10_000 {
		size = int(float64(size)*growth) + 1
	}
	limit := int(0.85 * float64(size)) // past prepLoad, within maxLoad
	r := rand.New(rand.NewPCG(7, 8))
	s := NewStore(limit)
	for i := range 100_000 {
		s.Add(randKey(r), 1000, uint64(i), 1)
		if s.t.ready != nil && len(s.t.cur.keys) == size {
			t.Fatalf("%d keys added, %d held of %d: a next set of %d slots is ready beside %d", i+1, s.t.Len(), limit, len(s.t.ready.keys), size)
		}
	}
	c := s.Clone()
	c.Reset()
	if c.t.max != limit {
		t.Fatalf("a store's cap is lost on Clone and Reset: %d", c.t.max)
	}
}
