package pipeline

import "testing"

// sized is an emptied batch whose prepared input and rows have room for n each.
func sized(n int) *batch {
	return &batch{preps: make([]prep, 0, n), rows: make([]row, 0, n)}
}

func TestSparesKeepOneOfAnySizeAndMoreWithinRoom(t *testing.T) {
	s := newSpares(5 * bytesOf(sized(10)))
	big := sized(1000)
	s.put(big)
	// Small batches (parts) are kept beside the big one while they fit the room.
	var small []*batch
	for range 6 {
		b := sized(10)
		small = append(small, b)
		s.put(b)
	}
	if len(s.free) != 5 || s.bytes != s.room {
		t.Fatalf("kept %d small batches (%d bytes), want 5 (%d bytes): a sixth would pass the room", len(s.free), s.bytes, s.room)
	}
	// Another big one does not fit.
	s.put(sized(1000))
	if len(s.free) != 5 {
		t.Fatalf("kept a batch over the room: %d small batches", len(s.free))
	}
	got := map[*batch]bool{}
	for range 6 {
		got[s.get()] = true
	}
	for _, b := range small[:5] {
		if !got[b] {
			t.Fatal("a small batch kept was not given back")
		}
	}
	if !got[big] {
		t.Fatal("the big batch kept was not given back")
	}
	if s.bytes != 0 || s.one != nil || len(s.free) != 0 {
		t.Fatalf("the pool still holds something: %d bytes", s.bytes)
	}
	if b := s.get(); b == nil || got[b] {
		t.Fatal("an empty pool gives a new batch")
	}
}
