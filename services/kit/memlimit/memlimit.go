// Package memlimit keeps Go's soft memory limit (runtime/debug.SetMemoryLimit) at a
// floor for a service that was given none, raised with the live heap so that a
// larger state never makes the collector run constantly.
//
// Go's collector runs when the heap reaches twice what the last collection found
// live (GOGC=100). A pipeline worker's live heap under a backlog is mostly events
// in flight, so its peak is about twice that; a soft limit makes the collector run
// at the limit instead. A fixed limit is wrong for a worker that holds more state
// than it (the collector would run all the time, Go caps it at about half the
// CPU), so the limit here is
//
//	max(floor, memory outside the heap + live heap × (1 + Headroom))
//
// recomputed after every collection: at most a collection every Headroom × live
// bytes allocated, twice as often as Go's default at Headroom 0.5, never more.
//
// Below the limit the collector runs at four times the live heap, not twice
// (GOGC=300, GCPercent, unless GOGC is set): the limit already bounds the memory,
// and room under it is better spent collecting less often. A pipeline worker at half
// load (a live heap of about 125 MB) collected every 1.25 s at twice, each
// collection taking part of a core for about 100 ms of marking (in an execution
// trace one began the run of slower batches that made the latency's tail); at four
// times it collects about half as often, and its p99 latency at half load fell by
// about a quarter (docs/benchmarks.md, twenty-seventh session). Its peak under a
// backlog, at the limit, does not change. A service whose live heap is small may
// hold up to four times it rather than twice (the sink while ClickHouse was down:
// 151 MiB of RSS, under the 256 MiB its test allows).
//
// Why not a library: Go's own soft limit is the mechanism; what is added is the
// floor-and-raise policy in one small loop and one fixed GOGC under it.
// github.com/bytedance/gopkg/util/gctuner tunes GOGC instead, moving it with the
// heap (up to 500 for small heaps) from a finalizer, with no limit to fall back on.
package memlimit

import (
	"context"
	"log/slog"
	"math"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Headroom is the share of the live heap the limit leaves for new allocation when
// the live heap is too large for the floor.
const Headroom = 0.5

// GCPercent is Go's GOGC while Run keeps the limit (see the package's doc).
const GCPercent = 300

// every is how often the loop looks for a finished collection.
const every = 100 * time.Millisecond

// Policy returns the limit for a floor, the live heap after the last collection and
// the runtime's memory outside the heap (stacks, metadata, the collector's own).
func Policy(floor, live, other uint64) uint64 {
	return max(floor, other+uint64(math.Ceil(float64(live)*(1+Headroom))))
}

var names = []string{
	"/gc/cycles/total:gc-cycles",
	"/gc/heap/live:bytes",
	"/memory/classes/total:bytes",
	"/memory/classes/heap/released:bytes",
	"/memory/classes/heap/objects:bytes",
	"/memory/classes/heap/unused:bytes",
	"/memory/classes/heap/free:bytes",
}

// Run sets the soft memory limit to Policy(floor, ...) and keeps it there after
// every collection until ctx is done, then puts back the limit it found; it sets
// GOGC to GCPercent meanwhile unless GOGC is set. It returns at once, doing
// nothing, when floor is 0 or GOMEMLIMIT is set (lookup is os.LookupEnv in mains):
// a limit given to Go directly wins.
func Run(ctx context.Context, floor uint64, lookup func(string) (string, bool), log *slog.Logger) {
	if floor == 0 {
		return
	}
	if v, ok := lookup("GOMEMLIMIT"); ok && v != "" {
		log.Debug("GOMEMLIMIT is set: the memory limit setting is not used", "GOMEMLIMIT", v)
		return
	}
	if v, ok := lookup("GOGC"); !ok || v == "" {
		defer debug.SetGCPercent(debug.SetGCPercent(GCPercent))
	}
	previous := debug.SetMemoryLimit(int64(min(floor, math.MaxInt64)))
	defer debug.SetMemoryLimit(previous)
	samples := make([]metrics.Sample, len(names))
	for i, n := range names {
		samples[i].Name = n
	}
	var cycles uint64
	set := floor
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		metrics.Read(samples)
		v := func(i int) uint64 { return samples[i].Value.Uint64() }
		if v(0) == cycles {
			continue
		}
		cycles = v(0)
		heap := v(3) + v(4) + v(5) + v(6)
		limit := Policy(floor, v(1), v(2)-min(v(2), heap))
		// Moved only when it changes by more than 1% (go_gc_gomemlimit_bytes shows it).
		if limit > set+set/100 || limit+set/100 < set {
			debug.SetMemoryLimit(int64(min(limit, math.MaxInt64)))
			if (limit > floor) != (set > floor) {
				log.Debug("memory limit", "limit_bytes", limit, "live_heap_bytes", v(1), "floor_bytes", floor)
			}
			set = limit
		}
	}
}
