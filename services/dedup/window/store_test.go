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
