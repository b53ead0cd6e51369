package alert

import (
	"fmt"
	"hash/fnv"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
)

// FuzzPartitionedOrder holds the engine fed P partitions' input, interleaved, to
// the engine fed the stream in its own order (the oracle). The input is divided by
// event key, as the pipeline's partitions divide it; each partition keeps the
// stream's order; the partitions are interleaved in any way (one partition may run
// far ahead of another). The partitioned engine (Partition) gets the events a
// rule's filter matches (ObserveIn) and the time of the others (Progress), as the
// alert runner gets a partitioned pipeline's rule input and progress. Every alert
// change must be the same, with the same id, in the same order for each
// fingerprint, whenever the stream itself has no event later than the rules'
// allowed lateness (docs/scaling.md). The same with the groups on disk.
func FuzzPartitionedOrder(f *testing.F) {
	f.Add(uint8(4), []byte{0, 1, 10, 0, 1, 10, 0, 1, 10, 0, 2, 200, 1, 3, 5}, []byte{3, 1, 4, 1, 5, 9, 2, 6})
	f.Add(uint8(2), []byte{2, 0, 255, 2, 0, 1, 1, 1, 128, 0, 0, 0, 0, 1, 3, 0, 1, 3, 0, 1, 3}, []byte{1, 1, 1, 0, 0, 0})
	f.Add(uint8(128+4), []byte{0, 1, 10, 0, 1, 10, 0, 1, 10, 0, 2, 200, 1, 3, 5, 0, 3, 1, 0, 3, 1, 0, 3, 1}, []byte{3, 1, 4, 1, 5, 9, 2, 6})
	f.Add(uint8(8), []byte{0, 1, 0, 0, 1, 12, 0, 1, 12, 0, 1, 12, 0, 1, 12, 0, 1, 12, 0, 1, 12, 0, 1, 12,
		0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 10, 0, 1, 10, 0, 1, 10, 0, 1, 10, 0, 1, 10}, []byte{7, 7, 0, 3, 250, 1})
	const lateness = 3 * time.Second
	cfgs := []RuleConfig{
		{Name: "count", Kind: KindThreshold, Filter: `type == "t0"`, GroupBy: []string{"data.g"}, Window: 10 * time.Second, Step: 2 * time.Second, Op: ">", Threshold: 2, AllowedLateness: lateness},
		{Name: "rate", Kind: KindRate, Filter: `type == "t1"`, GroupBy: []string{"data.g"}, Window: 10 * time.Second, Step: 5 * time.Second, Aggregate: AggMin, Value: "data.v", Op: "<", Threshold: 0.5, AllowedLateness: lateness},
		{Name: "sum", Kind: KindThreshold, Filter: `type != "t2"`, GroupBy: []string{"data.g"}, Window: 6 * time.Second, Step: time.Second, Aggregate: AggSum, Value: "data.v", Op: ">=", Threshold: 300, AllowedLateness: lateness},
		{Name: "match", Filter: `type == "t1" && data.v > 100`},
	}
	f.Fuzz(func(t *testing.T, parts uint8, in, choices []byte) {
		rules, err := CompileRules(cfgs)
		if err != nil {
			t.Fatal(err)
		}
		p := int(parts%8) + 1
		// The stream: times move back by at most the lateness, so the stream itself
		// has no late event.
		var stream []*EventEnv
		var times []time.Time
		at := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
		latest := at
		for i := 0; i+2 < len(in); i += 3 {
			at = later(at.Add(time.Duration(int8(in[i+2]))*250*time.Millisecond), latest.Add(-lateness))
			latest = later(latest, at)
			e := &events.Event{ID: fmt.Sprint(i), Type: fmt.Sprint("t", in[i]%3), Key: fmt.Sprint("k", i), Time: at,
				Data: []byte(fmt.Sprintf(`{"g":"%d","v":%d}`, in[i+1]%4, in[i+1]))}
			stream = append(stream, Env(e))
			times = append(times, at)
		}
		// The partitions, by key as the keying step divides them.
		queues := make([][]int, p)
		for i, env := range stream {
			h := fnv.New64a()
			h.Write([]byte(env.Key))
			q := h.Sum64() % uint64(p)
			queues[q] = append(queues[q], i)
		}
		// An interleaving: the choices pick the partition whose next event comes.
		type fromPartition struct {
			p   int
			env *EventEnv
		}
		var merged []fromPartition
		for c := 0; ; c++ {
			var open []int
			for q := range queues {
				if len(queues[q]) > 0 {
					open = append(open, q)
				}
			}
			if len(open) == 0 {
				break
			}
			pick := 0
			if len(choices) > 0 {
				pick = int(choices[c%len(choices)]) + c/len(choices)
			}
			q := open[pick%len(open)]
			merged = append(merged, fromPartition{q, stream[queues[q][0]]})
			queues[q] = queues[q][1:]
		}
		end := latest.Add(time.Hour)
		collect := func(byFingerprint map[string][]string, out []*alerts.Alert) {
			for _, a := range out {
				byFingerprint[a.Fingerprint] = append(byFingerprint[a.Fingerprint], alerts.MsgID(a))
			}
		}
		// The oracle: one engine, the stream in order, then an hour of idle time.
		run := func(envs []*EventEnv) (map[string][]string, int) {
			e := NewEngine(rules, nil)
			byFingerprint := map[string][]string{}
			for _, env := range envs {
				out, _ := e.Observe(env)
				collect(byFingerprint, out)
			}
			collect(byFingerprint, e.Idle(end.Sub(e.State().MaxTime)))
			late := 0
			for _, n := range e.late {
				late += n
			}
			return byFingerprint, late
		}
		// The partitioned engine, restarted from its saved state halfway; with its
		// groups on disk (two in memory) when parts' high bit is set.
		partitioned := func(from *Engine) *Engine {
			var bin []byte
			if from != nil {
				var err error
				if bin, err = from.State().MarshalBinary(); err != nil {
					t.Fatal(err)
				}
				if err := from.Close(); err != nil {
					t.Fatal(err)
				}
			}
			dir := ""
			if parts >= 128 {
				dir = t.TempDir()
			}
			e, err := OpenEngine(Settings{Store: map[bool]string{true: StoreDisk, false: StoreMemory}[dir != ""], HotGroups: 2}, rules, bin, nil, dir, nil)
			if err != nil {
				t.Fatal(err)
			}
			e.Partition(p)
			return e
		}
		e := partitioned(nil)
		defer func() { _ = e.Close() }()
		matcher := NewMatcher(rules)
		got := map[string][]string{}
		for i, in := range merged {
			if i == len(merged)/2 {
				e = partitioned(e)
			}
			if matcher.Any(in.env) {
				out, _ := e.ObserveIn(in.p, in.env)
				collect(got, out)
			} else {
				collect(got, e.Progress(in.p, in.env.Time))
			}
		}
		for q := range p {
			collect(got, e.Progress(q, end))
		}
		want, late := run(stream)
		if late != 0 {
			t.Fatalf("the stream itself has %d late events", late)
		}
		if late := sum(e.late); late != 0 {
			t.Fatalf("%d events late in the partitioned engine", late)
		}
		if !maps.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("%d partitions interleaved give other alert changes:\n got %q\nwant %q", p, got, want)
		}
	})
}

// sum is the total of m's counts.
func sum(m map[string]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}

// later is the later of a and b.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
