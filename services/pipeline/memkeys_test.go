package pipeline

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/dedup/window"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition/partitiontest"
)

// memRun is a run of partition 0 whose claim worker "a" holds, for the keys in
// memory alone: a nats-server with the pipeline's object store.
func memRun(t *testing.T) (*run, jetstream.ObjectStore) {
	t.Helper()
	ctx := context.Background()
	_, js := natstest.Run(t).Connect(t)
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: Bucket})
	if err != nil {
		t.Fatal(err)
	}
	store, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: Bucket, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	r := &run{pipeline: &pipeline{cfg: cfg, store: store, log: testLog}, claim: partitiontest.Claim(t, kv),
		created: time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)}
	return r, store
}

// The keys in memory saved as segments: keys admitted with random windows while
// time moves on, captures whose saves fail at random (encoded and never saved, or
// not even encoded), restarts from the last state saved. Each restart holds
// exactly the keys the last saved capture held (the oracle: the store's keys at
// that capture), less those expired at the restore's clock; captures write the
// keys admitted since the last save, and every key held at most every maxSegments:
// merging the segments (this machine's copies, or downloaded when gone), or from
// a copy of the table when no segment holds the keys yet.
func TestMemKeysSegments(t *testing.T) {
	r, store := memRun(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(5, 6))
	var saved []byte               // the keys part of the last state saved
	var want map[window.Key]uint32 // the keys held at its capture
	now := uint32(1_000_000)
	m, err := r.openKeys(ctx, nil, now)
	if err != nil {
		t.Fatal(err)
	}
	held := func(ks keyStore, at uint32) map[window.Key]uint32 {
		got := map[window.Key]uint32{}
		if err := ks.Range(at, func(k window.Key, exp uint32) bool { got[k] = exp; return true }); err != nil {
			t.Fatal(err)
		}
		return got
	}
	deltas, merges, clones := 0, 0, 0
	for round := range 120 {
		admit := func(n int) {
			for range n {
				k := window.Key{Hi: rng.Uint64N(3000), Lo: rng.Uint64()}
				if rng.IntN(4) == 0 && len(want) > 0 {
					for wk := range want { // a repeat of a key held
						k = wk
						break
					}
				}
				if _, err := m.Admit(k, now+1+uint32(rng.IntN(200)), uint64(round), now); err != nil {
					t.Fatal(err)
				}
			}
		}
		admit(rng.IntN(400))
		now += uint32(rng.IntN(8))
		c := m.capture(now)
		switch mc := c.(*memCapture); {
		case mc.all != nil:
			clones++
		case mc.merge != nil:
			merges++
		default:
			deltas++
		}
		if rng.IntN(4) == 0 { // this machine's copies of the segments gone
			if err := os.RemoveAll(filepath.Join(m.(*memKeys).dir, "cache")); err != nil {
				t.Fatal(err)
			}
		}
		at := held(m, now)
		// While the capture is saved: the decide loop's sweep, in steps between
		// admissions, and the next capture's keys.
		for m.sweep(now, 1+rng.IntN(1<<12)) {
			admit(rng.IntN(3))
		}
		admit(rng.IntN(50))
		switch rng.IntN(5) {
		case 0: // the save fails before it is written
			continue
		case 1: // written, but the state never points at it
			if err := c.encode(ctx, &bytes.Buffer{}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		var buf bytes.Buffer
		if err := c.encode(ctx, &buf); err != nil {
			t.Fatal(err)
		}
		var segs []segment
		if !bytes.HasPrefix(buf.Bytes(), memMagic) || json.Unmarshal(buf.Bytes()[len(memMagic):], &segs) != nil || len(segs) > maxSegments {
			t.Fatalf("round %d: the state's keys part names %d segments (%.40q)", round, len(segs), buf.Bytes())
		}
		c.saved(ctx)
		saved, want = buf.Bytes(), at
		if rng.IntN(6) == 0 { // a restart from it
			if err := m.Close(); err != nil {
				t.Fatal(err)
			}
			restoredAt := now + uint32(rng.IntN(5))
			if m, err = r.openKeys(ctx, saved, restoredAt); err != nil {
				t.Fatal(err)
			}
			got := held(m, restoredAt)
			wantNow := maps.Clone(want)
			maps.DeleteFunc(wantNow, func(_ window.Key, exp uint32) bool { return exp <= restoredAt })
			if !maps.Equal(got, wantNow) {
				t.Fatalf("round %d: restored %d keys, the saved capture held %d (unexpired)", round, len(got), len(wantNow))
			}
			now = restoredAt
		}
	}
	t.Logf("deltas %d merges %d clones %d", deltas, merges, clones)
	if deltas < 40 || merges < 3 || clones < 1 {
		t.Fatalf("%d captures of the keys admitted since a save, %d of every key merged, %d copied: the test does not exercise each", deltas, merges, clones)
	}
	m.Close()
	// What the state names is all the store keeps of the keys (the last two states'
	// segments): no segment of a failed save stays behind.
	infos, err := store.List(ctx)
	if err != nil && !errors.Is(err, jetstream.ErrNoObjectsFound) {
		t.Fatal(err)
	}
	if len(infos) > 2*maxSegments {
		t.Fatalf("%d objects left in the store", len(infos))
	}
}

// A capture of every key that cannot read the segments it merges (this machine's
// copies and the objects both gone) fails, and the next copies the table instead:
// the saves go on, and a restore holds every key.
func TestMemKeysMergeFallsBack(t *testing.T) {
	r, store := memRun(t)
	ctx := context.Background()
	now := uint32(1_000_000)
	m := openMem(t, r, nil, now)
	defer m.Close()
	next := uint64(0)
	admit := func() {
		for range 10 {
			next++
			if _, err := m.Admit(window.Key{Hi: next, Lo: next}, now+1000, next, now); err != nil {
				t.Fatal(err)
			}
		}
	}
	save := func() ([]byte, error) {
		c := m.capture(now)
		var buf bytes.Buffer
		if err := c.encode(ctx, &buf); err != nil {
			return nil, err
		}
		c.saved(ctx)
		return buf.Bytes(), nil
	}
	for {
		admit()
		if m.whole || len(m.segs)+1 <= maxSegments {
			if _, err := save(); err != nil {
				t.Fatal(err)
			}
			continue
		}
		break // the next capture merges
	}
	c := m.capture(now)
	if mc := c.(*memCapture); mc.merge == nil {
		t.Fatalf("capture after %d segments: not a merge", len(m.segs))
	}
	if err := os.RemoveAll(filepath.Join(m.dir, "cache")); err != nil {
		t.Fatal(err)
	}
	infos, err := store.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, info := range infos {
		if err := store.Delete(ctx, info.Name); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.encode(ctx, &bytes.Buffer{}); err == nil {
		t.Fatal("a merge of segments that are nowhere succeeded")
	}
	admit()
	c = m.capture(now)
	if mc := c.(*memCapture); mc.all == nil {
		t.Fatal("the capture after a failed merge does not copy the table")
	}
	var buf bytes.Buffer
	if err := c.encode(ctx, &buf); err != nil {
		t.Fatal(err)
	}
	c.saved(ctx)
	back, err := r.openKeys(ctx, buf.Bytes(), now)
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	if got := back.Stats().Keys; got != int(next) {
		t.Fatalf("restored %d keys, %d admitted", got, next)
	}
}

// The log of admitted keys against a slice: random appends, views of the first n
// (which later appends and drops must not change before the view is done with),
// and drops of a view's keys.
func TestAdmittedLog(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	var l admittedLog
	var want []admitted
	next := uint64(0)
	for round := range 300 {
		for range rng.IntN(3 * addedChunk) {
			next++
			a := admitted{window.Key{Hi: next}, uint32(next)}
			l.add(a)
			want = append(want, a)
		}
		n := rng.IntN(l.n + 1)
		view := l.first(n)
		for range rng.IntN(addedChunk) { // appends while the view is encoded
			next++
			a := admitted{window.Key{Hi: next}, uint32(next)}
			l.add(a)
			want = append(want, a)
		}
		var got []admitted
		for _, c := range view {
			got = append(got, c...)
		}
		if !slices.Equal(got, want[:n]) {
			t.Fatalf("round %d: a view of the first %d keys holds %d, or others", round, n, len(got))
		}
		if l.n != len(want) {
			t.Fatalf("round %d: %d keys held, %d added", round, l.n, len(want))
		}
		if rng.IntN(4) > 0 { // the view's save succeeded
			l.drop(n)
			want = want[n:]
		}
	}
	var got []admitted
	for _, c := range l.first(l.n) {
		got = append(got, c...)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("the log holds %d keys, %d expected (or others)", len(got), len(want))
	}
	if len(l.spare) == 0 {
		t.Fatal("no chunk kept for use again")
	}
}

// Saves that fail for long: the log of keys admitted since the last save would grow
// for as long, with keys long expired. It is bounded by the table's size (plus a
// chunk): past it the log starts again and the next capture writes the table whole.
// A capture taken before that and saved after it does not trim the new log, and the
// state saved next holds every key the table held.
func TestMemKeysLogBounded(t *testing.T) {
	r, _ := memRun(t)
	ctx := context.Background()
	now := uint32(1_000_000)
	m := openMem(t, r, nil, now)
	defer func() { m.Close() }()
	rng := rand.New(rand.NewPCG(7, 8))
	key := func() window.Key { return window.Key{Hi: rng.Uint64(), Lo: rng.Uint64()} } // as hashes spread
	next := uint64(0)
	var early keysCapture
	for round := range 30 {
		for range 10_000 {
			next++
			if _, err := m.Admit(key(), now+10, next, now); err != nil {
				t.Fatal(err)
			}
		}
		if round == 2 {
			early = m.capture(now) // a save under way while the others fail
		}
		m.mu.Lock()
		logged, keys := m.added.n, m.Stats().Keys
		m.mu.Unlock()
		if logged > keys+addedChunk {
			t.Fatalf("round %d: %d keys logged since the last save, the table holds %d", round, logged, keys)
		}
		now += 20 // every key admitted so far expired
		for m.sweep(now, 1<<16) {
		}
	}
	if m.logs == 0 {
		t.Fatal("the log never started again")
	}
	var buf bytes.Buffer
	if err := early.encode(ctx, &buf); err != nil {
		t.Fatal(err)
	}
	early.saved(ctx)
	if !m.whole {
		t.Fatal("a capture from before the log started again made the next capture a delta")
	}
	// Keys admitted after the last sweep, held now; the next capture writes them all.
	for range 100 {
		next++
		if _, err := m.Admit(window.Key{Hi: next, Lo: next}, now+10, next, now); err != nil {
			t.Fatal(err)
		}
	}
	c := m.capture(now)
	if c.(*memCapture).all == nil {
		t.Fatal("the capture after the log started again is not of every key")
	}
	buf.Reset()
	if err := c.encode(ctx, &buf); err != nil {
		t.Fatal(err)
	}
	c.saved(ctx)
	want := map[window.Key]uint32{}
	if err := m.Range(now, func(k window.Key, exp uint32) bool { want[k] = exp; return true }); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	m = openMem(t, r, buf.Bytes(), now)
	got := map[window.Key]uint32{}
	if err := m.Range(now, func(k window.Key, exp uint32) bool { got[k] = exp; return true }); err != nil {
		t.Fatal(err)
	}
	if len(want) == 0 || !maps.Equal(got, want) {
		t.Fatalf("restored %d keys; the table held %d", len(got), len(want))
	}
}

// openMem opens partition 0's keys in memory from the keys part of a state (nil:
// none) at now.
func openMem(t *testing.T, r *run, state []byte, now uint32) *memKeys {
	t.Helper()
	ks, err := r.openKeys(context.Background(), state, now)
	if err != nil {
		t.Fatal(err)
	}
	return ks.(*memKeys)
}
