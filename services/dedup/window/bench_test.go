package window

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"
)

// BenchmarkBytesPerKey fills a store with 1M and 10M keys and reports its memory per key.
func BenchmarkBytesPerKey(b *testing.B) {
	for _, n := range []int{1_000_000, 10_000_000} {
		b.Run(fmt.Sprintf("keys=%d", n), func(b *testing.B) {
			for range b.N {
				s := NewStore(0)
				r := rand.New(rand.NewPCG(1, uint64(n)))
				for i := range n {
					s.Add(Key{r.Uint64(), r.Uint64()}, 1_000_000, uint64(i+1), 0)
				}
				st := s.Stats()
				b.ReportMetric(float64(st.Bytes)/float64(st.Keys), "bytes/key")
			}
			b.ReportMetric(0, "ns/op")
		})
	}
}

// BenchmarkSeenAdd is the stage core's per-event work on a store of 1M keys: a
// lookup, and an add for a new key.
func BenchmarkSeenAdd(b *testing.B) {
	s := NewStore(0)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 1_000_000 {
		s.Add(Key{r.Uint64(), r.Uint64()}, 1_000_000, uint64(i+1), 0)
	}
	keys := make([]Key, 1<<16)
	for i := range keys {
		keys[i] = Key{r.Uint64(), r.Uint64()}
	}
	b.ResetTimer()
	for i := range b.N {
		k := keys[i&(len(keys)-1)]
		if !s.Seen(k, 10) {
			s.Add(k, 1_000_000, uint64(i), 10)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkRestore reads a snapshot of 1M keys back into a store.
func BenchmarkRestore(b *testing.B) {
	s := NewStore(0)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 1_000_000 {
		s.Add(Key{r.Uint64(), r.Uint64()}, 1_000_000, uint64(i+1), 0)
	}
	var buf bytes.Buffer
	if err := s.WriteSnapshot(&buf); err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(buf.Len()))
	b.ResetTimer()
	for range b.N {
		if _, err := NewStore(0).ReadSnapshot(bytes.NewReader(buf.Bytes()), 10); err != nil {
			b.Fatal(err)
		}
	}
}
