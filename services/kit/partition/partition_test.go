package partition_test

import (
	"fmt"
	"slices"
	"testing"

	"github.com/sluicehq/sluice/services/kit/partition"
)

func TestOfSpreadsKeysEvenly(t *testing.T) {
	const n, keys = 16, 160_000
	counts := make([]int, n)
	for i := range keys {
		p := partition.Of(fmt.Sprintf("%032x", i*7919), n)
		if p < 0 || p >= n {
			t.Fatalf("partition %d of %d", p, n)
		}
		counts[p]++
	}
	for p, c := range counts {
		if c < keys/n*9/10 || c > keys/n*11/10 {
			t.Fatalf("partition %d holds %d of %d keys: %v", p, c, keys, counts)
		}
	}
	if partition.Of("k", 1) != 0 || partition.Of("k", 0) != 0 {
		t.Fatal("one partition must be partition 0")
	}
	if partition.Of("abc", 16) != partition.Of("abc", 16) {
		t.Fatal("not deterministic")
	}
}

func TestSubjectRoundTrip(t *testing.T) {
	s := partition.Subject(12, "events.shop.order")
	if s != "partitioned.12.events.shop.order" {
		t.Fatal(s)
	}
	p, orig, err := partition.Parse(s)
	if err != nil || p != 12 || orig != "events.shop.order" {
		t.Fatal(p, orig, err)
	}
	for _, bad := range []string{"events.x", "partitioned.x.events", "partitioned.3", "partitioned.-1.a", "partitioned.3."} {
		if _, _, err := partition.Parse(bad); err == nil {
			t.Fatalf("%q parsed", bad)
		}
	}
}

// Every partition has exactly one worker, no worker more than its share, and a
// worker joining or leaving moves few partitions.
func TestAssign(t *testing.T) {
	for _, n := range []int{1, 4, 16, 64} {
		var workers []string
		prev := []string(nil)
		for w := range 6 {
			workers = append(workers, fmt.Sprintf("worker-%d", w))
			got := partition.Assign(n, workers)
			if len(got) != n {
				t.Fatalf("%d partitions, %d assigned", n, len(got))
			}
			load := map[string]int{}
			for p, owner := range got {
				if !slices.Contains(workers, owner) {
					t.Fatalf("partition %d to %q, not a worker", p, owner)
				}
				load[owner]++
			}
			share := (n + len(workers) - 1) / len(workers)
			for owner, l := range load {
				if l > share {
					t.Fatalf("%d partitions, %d workers: %s holds %d, share %d", n, len(workers), owner, l, share)
				}
			}
			// The same answer whatever order the workers are listed in.
			rev := slices.Clone(workers)
			slices.Reverse(rev)
			if !slices.Equal(got, partition.Assign(n, rev)) {
				t.Fatal("depends on the order of workers")
			}
			if prev != nil && n >= 16 {
				moved := 0
				for p := range got {
					if got[p] != prev[p] {
						moved++
					}
				}
				// The newcomer's share must move; allow as much again for the bound.
				if limit := 2*share + 1; moved > limit {
					t.Fatalf("%d partitions, worker %d joining moved %d (share %d)", n, len(workers), moved, share)
				}
			}
			prev = got
		}
	}
	if partition.Assign(4, nil) != nil {
		t.Fatal("no workers, yet assigned")
	}
}
