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

// FuzzPartitionedOrder holds one engine fed the interleaved output of P
// partitions to the same engine fed the stream in its own order (the oracle).
// The input is divided by event key, as the pipeline's partitions divide it; each
// partition keeps the stream's order, and the partitions are interleaved in any
// way that makes no event later than the rules' allowed lateness (the event's time
// no more than that behind the latest time seen): every alert change must then be
// the same, with the same id, in the same order for each fingerprint. This is
// what makes the rules of a partitioned pipeline exact when one engine evaluates
// the rule input its partitions republish (docs/scaling.md).
func FuzzPartitionedOrder(f *testing.F) {
	f.Add(uint8(4), []byte{0, 1, 10, 0, 1, 10, 0, 1, 10, 0, 2, 200, 1, 3, 5}, []byte{3, 1, 4, 1, 5, 9, 2, 6})
	f.Add(uint8(2), []byte{2, 0, 255, 2, 0, 1, 1, 1, 128, 0, 0, 0, 0, 1, 3, 0, 1, 3, 0, 1, 3}, []byte{1, 1, 1, 0, 0, 0})
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
		// An interleaving: the choices pick among the partitions whose next event
		// is not late; when none is, the one with the oldest next event.
		var merged []*EventEnv
		latest = time.Time{}
		for c := 0; ; c++ {
			var ok, all []int
			for q := range queues {
				if len(queues[q]) == 0 {
					continue
				}
				all = append(all, q)
				if !times[queues[q][0]].Before(latest.Add(-lateness)) {
					ok = append(ok, q)
				}
			}
			if len(all) == 0 {
				break
			}
			var q int
			if len(ok) > 0 {
				pick := 0
				if len(choices) > 0 {
					pick = int(choices[c%len(choices)])
				}
				q = ok[pick%len(ok)]
			} else {
				q = slices.MinFunc(all, func(a, b int) int { return times[queues[a][0]].Compare(times[queues[b][0]]) })
			}
			i := queues[q][0]
			queues[q] = queues[q][1:]
			merged = append(merged, stream[i])
			latest = later(latest, times[i])
		}
		run := func(envs []*EventEnv) (map[string][]string, int) {
			e := NewEngine(rules, nil)
			byFingerprint := map[string][]string{}
			add := func(out []*alerts.Alert) {
				for _, a := range out {
					byFingerprint[a.Fingerprint] = append(byFingerprint[a.Fingerprint], alerts.MsgID(a))
				}
			}
			for _, env := range envs {
				out, _ := e.Observe(env)
				add(out)
			}
			add(e.Idle(time.Hour))
			late := 0
			for _, n := range e.Late {
				late += n
			}
			return byFingerprint, late
		}
		want, wantLate := run(stream)
		got, late := run(merged)
		if wantLate != 0 {
			t.Fatalf("the stream itself has %d late events", wantLate)
		}
		if late != 0 {
			// The interleaving could not keep every event within the lateness (a
			// partition's next event was too old whichever came first): outside what
			// the rules promise.
			return
		}
		if !maps.EqualFunc(got, want, slices.Equal) {
			t.Fatalf("partitions interleaved within the allowed lateness give other alert changes:\n got %q\nwant %q", got, want)
		}
	})
}

// later is the later of a and b.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
