// Package partition divides sluice's input into partitions, the unit of ownership:
// every event key belongs to exactly one partition (Of), a partition's input is the
// subjects partitioned.<p>.> of stream PARTITIONS (Subject, Parse), and workers own
// disjoint sets of partitions (Assign, Group), fenced by KV revisions.
package partition

import (
	"cmp"
	"fmt"
	"hash/fnv"
	"slices"
	"strconv"
	"strings"
)

// Prefix is the subject prefix of the partitioned copy of EVENTS.
const Prefix = "partitioned."

// Of is the partition of key among n (0 when n <= 1).
func Of(key string, n int) int {
	if n <= 1 {
		return 0
	}
	h := fnv.New64a()
	h.Write([]byte(key))
	return int(h.Sum64() % uint64(n))
}

// Subject is the subject of an event published to subject, in partition p:
// partitioned.<p>.<subject>.
func Subject(p int, subject string) string {
	return Prefix + strconv.Itoa(p) + "." + subject
}

// Filter is the filter subject of partition p's input.
func Filter(p int) string { return Prefix + strconv.Itoa(p) + ".>" }

// Parse splits a partitioned subject into its partition and the subject the event
// was published to.
func Parse(subject string) (p int, original string, err error) {
	rest, ok := strings.CutPrefix(subject, Prefix)
	if !ok {
		return 0, "", fmt.Errorf("subject %q is not partitioned (%s<p>.<subject>)", subject, Prefix)
	}
	num, original, ok := strings.Cut(rest, ".")
	if p, err = strconv.Atoi(num); !ok || err != nil || p < 0 || original == "" {
		return 0, "", fmt.Errorf("subject %q is not partitioned (%s<p>.<subject>)", subject, Prefix)
	}
	return p, original, nil
}

// Assign gives each of n partitions one of workers: bounded-load rendezvous
// hashing. Each partition ranks the workers by a hash of (worker, partition) and
// goes to the first that holds fewer than ceil(n/len(workers)) partitions. Every
// worker computing it from the same set gets the same answer; a worker joining or
// leaving moves few partitions beyond its share; no worker holds more than its
// share. The answer's index is the partition; nil without workers.
func Assign(n int, workers []string) []string {
	if len(workers) == 0 {
		return nil
	}
	ws := slices.Clone(workers)
	slices.Sort(ws)
	ws = slices.Compact(ws)
	limit := (n + len(ws) - 1) / len(ws)
	load := make(map[string]int, len(ws))
	out := make([]string, n)
	type ranked struct {
		w string
		h uint64
	}
	rank := make([]ranked, len(ws))
	for p := range n {
		for i, w := range ws {
			h := fnv.New64a()
			h.Write([]byte(w))
			h.Write([]byte{0})
			h.Write([]byte(strconv.Itoa(p)))
			rank[i] = ranked{w, mix(h.Sum64())}
		}
		slices.SortFunc(rank, func(a, b ranked) int { return cmp.Or(cmp.Compare(b.h, a.h), cmp.Compare(a.w, b.w)) })
		for _, r := range rank {
			if load[r.w] < limit {
				out[p] = r.w
				load[r.w]++
				break
			}
		}
	}
	return out
}

// mix spreads FNV's low-entropy high bits (splitmix64's finalizer).
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}
