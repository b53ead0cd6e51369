package window

import (
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
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

// BenchmarkKeysAB is the dedup step on a store of n random keys (not cache
// friendly), in memory and on disk, same minutes: the per-event work (a lookup and,
// for the three events in four that are new, an add) with a capture and checkpoint
// every 1M events, as a 10 s interval at 100k events/s makes them. It reports
// events/s, bytes per key (memory for the table, disk for Pebble), the process's
// peak resident memory, and one checkpoint's CPU time after 200,000 new keys (10 s
// at 20,000 events/s) as a share of one core over 10 s: on disk the new keys, in
// memory the whole table copied and encoded, as the pipeline saves it. SLUICE_BENCH_KEYS sets
// the sizes (default 1000000; docs/benchmarks.md has 100M).
func BenchmarkKeysAB(b *testing.B) {
	sizes := []int{1_000_000}
	if v := os.Getenv("SLUICE_BENCH_KEYS"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(f)
			if err != nil {
				b.Fatalf("SLUICE_BENCH_KEYS: %v", err)
			}
			sizes = append(sizes, n)
		}
	}
	for _, n := range sizes {
		for _, store := range []string{"memory", "disk"} {
			b.Run(fmt.Sprintf("keys=%d/store=%s", n, store), func(b *testing.B) { benchKeys(b, n, store) })
		}
	}
}

// benchStore is what BenchmarkKeysAB drives.
type benchStore interface {
	Admit(k Key, exp uint32, seq uint64, now uint32) (bool, error)
	Stats() Stats
}

func benchKeys(b *testing.B, n int, store string) {
	var s benchStore
	var disk *Disk
	dir := b.TempDir()
	checkpoints := 0
	checkpoint := func() {
		if disk == nil {
			return
		}
		disk.Freeze(10)
		checkpoints++
		cdir := filepath.Join(dir, fmt.Sprint("c", checkpoints))
		if _, err := disk.Checkpoint(cdir); err != nil {
			b.Fatal(err)
		}
		os.RemoveAll(cdir)
	}
	if store == "disk" {
		var err error
		if disk, err = OpenDisk(filepath.Join(dir, "db"), 0, DefaultDiskOptions()); err != nil {
			b.Fatal(err)
		}
		defer disk.Close()
		s = disk
	} else {
		s = NewStore(0)
	}
	r := rand.New(rand.NewPCG(1, uint64(n)))
	const exp = 1_000_000
	seq := uint64(0)
	start := time.Now()
	for i := range n {
		seq++
		if _, err := s.Admit(Key{r.Uint64(), r.Uint64()}, exp, seq, 10); err != nil {
			b.Fatal(err)
		}
		if (i+1)%1_000_000 == 0 {
			checkpoint()
		}
	}
	checkpoint()
	b.Logf("%s: %d keys filled in %s", store, n, time.Since(start).Round(time.Millisecond))
	// Repeats are of keys added in this loop (recent ones: memory for the disk
	// store too) and of the filled ones, drawn again from the same sequence.
	old := rand.New(rand.NewPCG(1, uint64(n)))
	const events = 2_000_000
	b.ResetTimer()
	for range b.N {
		for i := range events {
			seq++
			k := Key{r.Uint64(), r.Uint64()}
			if i%4 == 3 {
				k = Key{old.Uint64(), old.Uint64()}
			}
			if _, err := s.Admit(k, exp, seq, 10); err != nil {
				b.Fatal(err)
			}
			if (i+1)%1_000_000 == 0 {
				checkpoint()
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.N*events)/b.Elapsed().Seconds(), "events/s")
	st := s.Stats()
	b.ReportMetric(float64(st.Bytes)/float64(max(1, st.Keys)), "bytes/key")
	// One checkpoint after 10 s at 20,000 events/s: on disk, the 200,000 new keys;
	// in memory, a copy of the table encoded whole (what the pipeline's save does).
	for range 200_000 {
		seq++
		if _, err := s.Admit(Key{r.Uint64(), r.Uint64()}, exp, seq, 10); err != nil {
			b.Fatal(err)
		}
	}
	before := cpuTime()
	if disk != nil {
		checkpoint()
	} else {
		mem := s.(*Store)
		if err := mem.Clone().WriteSnapshot(io.Discard); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(100*(cpuTime()-before).Seconds()/10, "checkpoint_%core")
	b.ReportMetric(float64(peakRSS())/(1<<20), "peak_rss_MiB")
	b.ReportMetric(0, "ns/op")
}

// cpuTime is the process's CPU time so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// peakRSS is the process's peak resident memory in bytes.
func peakRSS() int64 {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Maxrss << 10
}

// BenchmarkLongestPut adds 1.5M random keys to a table, one Put at a time, 75,000
// a second (7,500 every 100 ms: about what a pipeline worker decides at most), in
// a heap that has held 256 MB before (as a worker's has: memory used again must be
// zeroed when allocated), and reports the longest single Put: what adding a key
// can hold the pipeline's decide loop for while the table grows (it grows at about
// 1.05M keys here, into a set of 1.63M slots made ready from 0.93M).
func BenchmarkLongestPut(b *testing.B) {
	for range b.N {
		used := make([]byte, 256<<20)
		for i := 0; i < len(used); i += pageBytes {
			used[i] = 1
		}
		used = nil
		runtime.GC()
		var tb Table
		r := rand.New(rand.NewPCG(5, 6))
		var longest time.Duration
		tick := time.NewTicker(100 * time.Millisecond)
		for range 200 {
			<-tick.C
			for range 7_500 {
				k := Key{r.Uint64(), r.Uint64()}
				t0 := time.Now()
				tb.Put(k, 100)
				longest = max(longest, time.Since(t0))
			}
		}
		tick.Stop()
		b.ReportMetric(float64(longest.Microseconds())/1000, "longest-put-ms")
	}
	b.ReportMetric(0, "ns/op")
}
