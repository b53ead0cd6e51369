package window

import (
	"bytes"
	"testing"
)

// A clone is a snapshot of the store at one point: what the store takes after it
// is not in the clone, and the clone writes the snapshot the store would have.
func TestClone(t *testing.T) {
	s := NewStore(0)
	s.SetOrigin(7)
	for i := range 1000 {
		s.Add(Key{Hi: uint64(i), Lo: 1}, 100, uint64(i+1), 10)
	}
	var want bytes.Buffer
	if err := s.WriteSnapshot(&want); err != nil {
		t.Fatal(err)
	}
	c := s.Clone()
	for i := 1000; i < 2000; i++ {
		s.Add(Key{Hi: uint64(i), Lo: 1}, 100, uint64(i+1), 10)
	}
	var got bytes.Buffer
	if err := c.WriteSnapshot(&got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.Bytes(), want.Bytes()) {
		t.Fatal("the clone's snapshot differs from the store's at the time of the clone")
	}
	if c.Seen(Key{Hi: 1500, Lo: 1}, 10) || !s.Seen(Key{Hi: 1500, Lo: 1}, 10) {
		t.Fatal("a key added after the clone is in the clone, or not in the store")
	}
}

// A clone taken while keys are added (the table growing, and moving its keys to
// each larger set, as it goes) holds every key up to its last sequence: the copy
// is made for the table's shape outside the lock, and made again when the table
// changed shape meanwhile.
func TestCloneWhileAdding(t *testing.T) {
	const n = 300_000
	s := NewStore(0)
	key := func(i int) Key { return Key{Hi: uint64(i) * 0x9e3779b97f4a7c15, Lo: uint64(i+1) * 0xbf58476d1ce4e5b9} }
	added := make(chan struct{})
	go func() {
		defer close(added)
		for i := range n {
			s.Add(key(i), 100, uint64(i+1), 10)
		}
	}()
	clones := 0
	for done := false; !done; clones++ {
		select {
		case <-added:
			done = true
		default:
		}
		c := s.Clone()
		last := int(c.Stats().LastSeq)
		if c.Stats().Keys != last {
			t.Fatalf("a clone holds %d keys up to seq %d; want %d", c.Stats().Keys, last, last)
		}
		for i := 0; i < last; i += max(1, last/1000) {
			if !c.Seen(key(i), 10) {
				t.Fatalf("key %d (seq %d) is not in a clone up to seq %d", i, i+1, last)
			}
		}
		if last > 0 && !c.Seen(key(last-1), 10) {
			t.Fatalf("the last key of a clone up to seq %d is not in it", last)
		}
	}
	t.Logf("%d clones while %d keys were added", clones, n)
}
