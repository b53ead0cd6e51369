package window

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"

	"github.com/sluicehq/sluice/services/kit/pebblelog/pebbletest"
)

// checkpointed is a Disk checkpoint copied away (the object store's copy) with the
// position it was captured at, and the memory store's snapshot at that capture.
type checkpointed struct {
	seq   uint64
	clock uint32
	files map[string][]byte
	mem   []byte
}

// TestDiskRestoreExact is the disk store's property: crashed at any point and
// restored from any checkpoint taken while input went on, it decides every input
// after the checkpoint's position as the memory store restored from its snapshot at
// the same capture does, and, with times in order, as one uninterrupted run
// (the oracle: a map of each key's expiry).
func TestDiskRestoreExact(t *testing.T) {
	for seed := range uint64(16) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { diskRestoreExact(t, seed) })
	}
}

func diskRestoreExact(t *testing.T, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 7))
	inOrder := seed%2 == 0
	const positions = 3000
	// The input: each position holds 1 to 3 keys (a batch message's elements), drawn
	// from a small pool so that repeats are many, at a time that grows (with a little
	// disorder when !inOrder), each held 20 to 200 s.
	type item struct {
		k        Key
		now, exp uint32
	}
	input := make([][]item, positions+1)
	now := uint32(1_000)
	for seq := 1; seq <= positions; seq++ {
		now += uint32(rng.IntN(3))
		for range 1 + rng.IntN(3) {
			at := now
			if !inOrder && now > 30 {
				at -= uint32(rng.IntN(30))
			}
			input[seq] = append(input[seq], item{Key{0, uint64(rng.IntN(400))}, at, at + 20 + uint32(rng.IntN(180))})
		}
	}
	// The oracle, in order: one run of a map.
	want := make([][]bool, positions+1)
	held := map[Key]uint32{}
	for seq := 1; seq <= positions; seq++ {
		for _, it := range input[seq] {
			repeat := held[it.k] > it.now
			if !repeat && it.exp > it.now {
				held[it.k] = it.exp
			}
			want[seq] = append(want[seq], repeat)
		}
	}

	root := t.TempDir()
	dirs := 0
	newDir := func() string {
		dirs++
		return filepath.Join(root, fmt.Sprint(dirs))
	}
	disk, err := OpenDisk(newDir(), 0, DiskOptions{CacheBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { disk.Close() }()
	mem := NewStore(0)
	var last *checkpointed
	// A capture waits for its checkpoint (the saver) for a few positions.
	var pending *checkpointed
	pendingAt := 0
	clock := uint32(0)
	crashes := 0
	for seq := uint64(1); seq <= positions; seq++ {
		for i, it := range input[seq] {
			clock = max(clock, it.now)
			got, err := disk.Admit(it.k, it.exp, seq, it.now)
			if err != nil {
				t.Fatal(err)
			}
			memGot, _ := mem.Admit(it.k, it.exp, seq, it.now)
			if got != memGot {
				t.Fatalf("seq %d key %d: disk says repeat=%v, memory %v", seq, it.k.Lo, got, memGot)
			}
			if inOrder && got != want[seq][i] {
				t.Fatalf("seq %d key %d: repeat=%v, the oracle %v", seq, it.k.Lo, got, want[seq][i])
			}
		}
		switch {
		case pending == nil && rng.IntN(40) == 0:
			// A capture: the memory store is copied, the disk's horizon set; its files
			// are written a few positions later.
			disk.Freeze(clock)
			mem.Expire(clock)
			var b bytes.Buffer
			if err := mem.WriteSnapshot(&b); err != nil {
				t.Fatal(err)
			}
			pending, pendingAt = &checkpointed{seq: seq, clock: clock, mem: b.Bytes()}, int(seq)+rng.IntN(30)
		case pending != nil && int(seq) >= pendingAt:
			dir := newDir()
			names, err := disk.Checkpoint(dir)
			if err != nil {
				t.Fatal(err)
			}
			pending.files = map[string][]byte{}
			for _, name := range names {
				b, err := os.ReadFile(filepath.Join(dir, name))
				if err != nil {
					t.Fatal(err)
				}
				pending.files[name] = b
			}
			os.RemoveAll(dir)
			last, pending = pending, nil
		case rng.IntN(150) == 0:
			// A crash: what is not checkpointed is gone; both restart from the last
			// checkpoint (or empty) and decide the input after it again.
			crashes++
			disk.Close()
			mem = NewStore(0)
			dir := newDir()
			var from uint64
			var h uint32 // the checkpoint's clock
			if last != nil {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				for name, b := range last.files {
					if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
						t.Fatal(err)
					}
				}
				if _, err := mem.ReadSnapshot(bytes.NewReader(last.mem), last.clock); err != nil {
					t.Fatal(err)
				}
				from, h = last.seq, last.clock
			}
			if disk, err = OpenDisk(dir, h, DiskOptions{CacheBytes: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			pending, clock, seq = nil, h, from
		}
	}
	if crashes == 0 {
		t.Log("no crash in this input")
	}
	// What the disk holds is what memory holds.
	var diskKeys, memKeys []Key
	disk.Range(clock, func(k Key, _ uint32) bool { diskKeys = append(diskKeys, k); return true })
	mem.Range(clock, func(k Key, _ uint32) bool { memKeys = append(memKeys, k); return true })
	if len(diskKeys) != len(memKeys) {
		t.Fatalf("disk holds %d keys, memory %d", len(diskKeys), len(memKeys))
	}
}

// Checkpoint removes expired keys by the expiry index, and a key whose window
// ended by a capture is absent at once, before any checkpoint.
func TestDiskExpiry(t *testing.T) {
	disk, err := OpenDisk(t.TempDir(), 0, DiskOptions{CacheBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	for i := range uint64(20_000) {
		if _, err := disk.Admit(Key{i, i}, 100+uint32(i%10), i+1, 50); err != nil {
			t.Fatal(err)
		}
	}
	if n := disk.Stats().Keys; n != 20_000 {
		t.Fatalf("%d keys held, want 20000", n)
	}
	if repeat, _ := disk.Admit(Key{1, 1}, 500, 30_000, 60); !repeat {
		t.Fatal("a key inside its window not taken for a repeat")
	}
	disk.Freeze(104)
	for _, k := range []Key{{1, 1}, {4, 4}} {
		if repeat, _ := disk.Admit(k, 300+uint32(k.Lo), 30_001, 60); repeat {
			t.Fatalf("key %d, expired at the horizon, taken for a repeat", k.Lo)
		}
	}
	disk.Freeze(200)
	if _, err := disk.Checkpoint(filepath.Join(t.TempDir(), "c1")); err != nil {
		t.Fatal(err)
	}
	// Left: key 1 (added again until 500) and key 4 (again until 300).
	if n := disk.Stats().Keys; n != 2 {
		t.Fatalf("%d keys held after the sweep, want 2", n)
	}
	var held []Key
	if err := disk.Range(0, func(k Key, _ uint32) bool { held = append(held, k); return true }); err != nil {
		t.Fatal(err)
	}
	if len(held) != 2 {
		t.Fatalf("the files hold %v, want keys 1 and 4", held)
	}
}

// A corrupt table of the keys on disk (bytes flipped) fails the store's reads with
// an error naming the corruption (the run ends, and the next restores the
// checkpoint, its files' digests checked) instead of ending the process, which is
// Pebble's default.
func TestDiskCorruptFile(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "db")
	d, err := OpenDisk(dir, 0, DiskOptions{CacheBytes: 1})
	if err != nil {
		t.Fatal(err)
	}
	const n = 20000
	for i := range uint64(n) {
		if _, err := d.Admit(Key{Hi: i * 7919, Lo: i}, 10_000, i+1, 10); err != nil {
			t.Fatal(err)
		}
	}
	d.Freeze(10)
	if _, err := d.Checkpoint(filepath.Join(t.TempDir(), "cp")); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	pebbletest.CorruptTables(t, dir)
	d, err = OpenDisk(dir, 10, DiskOptions{CacheBytes: 1})
	if err == nil {
		defer d.Close()
		for i := range uint64(n) {
			if _, err = d.Admit(Key{Hi: i * 7919, Lo: i}, 10_000, n+i+1, 20); err != nil {
				break
			}
		}
	}
	if !pebble.IsCorruptionError(err) || !strings.Contains(err.Error(), "dedup keys: a file on disk is corrupt") {
		t.Fatalf("with a table corrupted: %v, want an error naming the corruption", err)
	}
}
