package alert

import (
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
)

// FuzzRule: no filter or annotation makes compiling or evaluating a rule panic.
func FuzzRule(f *testing.F) {
	f.Add(`type == "order.created" && data.amount > 1000`, `order {{ .data.order_id }}`)
	f.Add(`data.x[0] / 0 > 1`, `{{ .nope.deeper }}`)
	f.Add(`len(source) > 2 ? true : false`, `{{`)
	e := &events.Event{ID: "1", Source: "s", Type: "order.created", Key: "k", Time: time.Unix(0, 0), Data: []byte(`{"amount":5000,"order_id":"o","x":[1]}`)}
	env := Env(e)
	f.Fuzz(func(t *testing.T, filter, annotation string) {
		rules, err := CompileRules([]RuleConfig{{Name: "r", Filter: filter, Annotations: map[string]string{"a": annotation}}})
		if err != nil {
			return
		}
		if _, err := rules[0].Matches(nil, env); err != nil {
			return
		}
		rules[0].Annotate(eventData(env, nil))
	})
}

// FuzzEngine: any sequence of events (types, groups, times jumping back and
// forth) neither panics the engine nor makes a restart from its saved state give
// other alerts than an uninterrupted run.
func FuzzEngine(f *testing.F) {
	f.Add([]byte{0, 1, 10, 0, 1, 10, 0, 1, 10, 0, 2, 200, 1, 3, 5})
	f.Add([]byte{2, 0, 255, 2, 0, 1, 1, 1, 128, 0, 0, 0})
	// Eight t0 events 6 s apart fill every slot of the count rule's ring before the
	// restart; three more in 2 s make it hold after (TestRestoredFullRing).
	f.Add([]byte{0, 1, 0, 0, 1, 12, 0, 1, 12, 0, 1, 12, 0, 1, 12, 0, 1, 12, 0, 1, 12, 0, 1, 12,
		0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 10, 0, 1, 10, 0, 1, 10, 0, 1, 10, 0, 1, 10})
	cfgs := []RuleConfig{
		{Name: "count", Kind: KindThreshold, Filter: `type == "t0"`, GroupBy: []string{"data.g"}, Window: 10 * time.Second, Step: 2 * time.Second, Op: ">", Threshold: 2, AllowedLateness: 3 * time.Second},
		{Name: "rate", Kind: KindRate, Filter: `type == "t1"`, GroupBy: []string{"data.g"}, Window: 10 * time.Second, Step: 5 * time.Second, Aggregate: AggMin, Value: "data.v", Op: "<", Threshold: 0.5, AllowedLateness: time.Second},
		{Name: "absent", Kind: KindAbsence, Filter: `type == "t2"`, GroupBy: []string{"data.g"}, For: 20 * time.Second, Groups: []map[string]string{{"g": "x"}}},
		{Name: "match", Filter: `type == "t1" && data.v > 100`},
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		rules, err := CompileRules(cfgs)
		if err != nil {
			t.Fatal(err)
		}
		var envs []*EventEnv
		at := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
		for i := 0; i+2 < len(in); i += 3 {
			at = at.Add(time.Duration(int8(in[i+2])) * 500 * time.Millisecond)
			e := &events.Event{ID: fmt.Sprint(i), Type: fmt.Sprint("t", in[i]%3), Key: fmt.Sprint(i), Time: at,
				Data: []byte(fmt.Sprintf(`{"g":"%d","v":%d}`, in[i+1]%4, in[i+1]))}
			envs = append(envs, Env(e))
		}
		_, e := checkRestart(t, rules, envs)
		e.Idle(time.Hour)
	})
}

// checkRestart fails t unless stopping halfway through envs and carrying on from
// the saved state (through JSON) gives the alerts of an uninterrupted run (as
// JSON: labels, values and annotations too); it returns those alerts' ids and the
// restarted engine.
func checkRestart(t *testing.T, rules []*Rule, envs []*EventEnv) ([]string, *Engine) {
	t.Helper()
	run := func(envs []*EventEnv, e *Engine) (ids, all []string) {
		for _, env := range envs {
			got, _ := e.Observe(env)
			for _, a := range got {
				ids = append(ids, alerts.MsgID(a))
			}
			all = append(all, alertsJSON(t, got)...)
		}
		return ids, all
	}
	ids, whole := run(envs, NewEngine(rules, nil))
	checkRings(t, rules, envs)
	checkSteps(t, rules, envs)
	checkSpill(t, rules, envs)
	checkCheckpoints(t, rules, envs)
	half := len(envs) / 2
	e := NewEngine(rules, nil)
	_, first := run(envs[:half], e)
	legacy := restartJSON(t, e, rules)
	e = restart(t, e, rules)
	_, rest := run(envs[half:], e)
	if restored := append(first, rest...); !slices.Equal(restored, whole) {
		t.Fatalf("a restart from the saved state gives other alerts:\n%q\n%q", restored, whole)
	}
	if _, rest := run(envs[half:], legacy); !slices.Equal(append(first, rest...), whole) {
		t.Fatalf("a restart from the state saved as JSON (earlier releases) gives other alerts:\n%q\n%q", append(first, rest...), whole)
	}
	return ids, e
}

// runIdle feeds envs to e, then an hour without input, and returns the alerts as
// JSON (values and annotations too).
func runIdle(t *testing.T, e *Engine, envs []*EventEnv) []string {
	t.Helper()
	var out []string
	for _, env := range envs {
		got, _ := e.Observe(env)
		out = append(out, alertsJSON(t, got)...)
	}
	return append(out, alertsJSON(t, e.Idle(time.Hour))...)
}

// checkRings fails t unless an engine whose rings start small gives the alerts
// (values and annotations too) of one whose rings are the rule's whole ring.
func checkRings(t *testing.T, rules []*Rule, envs []*EventEnv) {
	t.Helper()
	full := NewEngine(rules, nil)
	full.fullRings = true
	if small, whole := runIdle(t, NewEngine(rules, nil), envs), runIdle(t, full, envs); !slices.Equal(small, whole) {
		t.Fatalf("rings that start small give other alerts than whole rings:\n%s\n%s", small, whole)
	}
}

// checkSteps fails t unless an engine that skips the steps in which no window can
// change (liveSteps) gives the alerts (values and annotations too) of one that
// evaluates every step; it returns how many window ends each evaluated.
func checkSteps(t *testing.T, rules []*Rule, envs []*EventEnv) (skipping, every int) {
	t.Helper()
	skip, all := NewEngine(rules, nil), NewEngine(rules, nil)
	all.everyStep = true
	if got, want := runIdle(t, skip, envs), runIdle(t, all, envs); !slices.Equal(got, want) {
		t.Fatalf("skipping quiet steps gives other alerts than evaluating every step:\n%s\n%s", got, want)
	}
	return skip.steps, all.steps
}

// checkSpill fails t unless an engine that keeps groups on disk (Spill) gives the
// alerts (values and annotations too) of one that keeps them all in memory: with
// every group written to disk after each event (a bound of one), with a few in
// memory, and carrying on from a state saved halfway (groups on disk included)
// by a new engine with a Spill of its own.
func checkSpill(t *testing.T, rules []*Rule, envs []*EventEnv) {
	t.Helper()
	run := func(e *Engine, envs []*EventEnv, idle bool) []string {
		var out []string
		for _, env := range envs {
			got, _ := e.Observe(env)
			out = append(out, alertsJSON(t, got)...)
		}
		if idle {
			out = append(out, alertsJSON(t, e.Idle(time.Hour))...)
		}
		if err := e.Err(); err != nil {
			t.Fatal(err)
		}
		return out
	}
	// One Spill, emptied for each engine (opening one takes ~10 ms).
	s, err := OpenSpill(SpillOptions{Dir: t.TempDir(), CacheBytes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	}()
	// spilled is an engine carrying on from bin (nil: a fresh start) as OpenEngine
	// makes it: the groups beyond hot go to disk as the state is read.
	spilled := func(hot int, bin []byte) *Engine {
		if err := s.db.DeleteRange([]byte{0}, []byte{0xff}, pebble.NoSync); err != nil {
			t.Fatal(err)
		}
		s.hot, s.epoch, s.err = hot, 0, nil
		st, err := decodeStateTo(bin, nil, rules, s)
		if err != nil {
			t.Fatal(err)
		}
		e := NewEngine(rules, st)
		e.SpillTo(s)
		held := 0
		for i, r := range rules {
			if rs := e.states[i]; rs != nil && r.Kind != KindAbsence {
				held += len(rs.Groups)
			}
		}
		if held > hot {
			t.Fatalf("%d groups in memory after a restore, at most %d wanted", held, hot)
		}
		return e
	}
	memory := run(NewEngine(rules, nil), envs, true)
	for _, hot := range []int{1, 3} {
		if got := run(spilled(hot, nil), envs, true); !slices.Equal(got, memory) {
			t.Fatalf("groups on disk (%d in memory) give other alerts than groups in memory:\n%s\n%s", hot, got, memory)
		}
		half := len(envs) / 2
		e := spilled(hot, nil)
		first := run(e, envs[:half], false)
		bin, err := e.State().MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if got := append(first, run(spilled(hot, bin), envs[half:], true)...); !slices.Equal(got, memory) {
			t.Fatalf("a restart from a state with groups on disk (%d in memory) gives other alerts:\n%s\n%s", hot, got, memory)
		}
	}
}

// alertsJSON is each of as as JSON: labels, values and annotations.
func alertsJSON(t *testing.T, as []*alerts.Alert) []string {
	t.Helper()
	out := make([]string, 0, len(as))
	for _, a := range as {
		b, err := json.Marshal(a)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, string(b))
	}
	return out
}

// restart saves e's state and returns a new engine for rules carrying on from it,
// as a restarted stage does.
func restart(t *testing.T, e *Engine, rules []*Rule) *Engine {
	t.Helper()
	b, err := e.State().MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var st State
	if err := st.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	return NewEngine(rules, &st)
}

// restartJSON is restart through the JSON form earlier releases saved.
func restartJSON(t *testing.T, e *Engine, rules []*Rule) *Engine {
	t.Helper()
	b, err := json.Marshal(e.State())
	if err != nil {
		t.Fatal(err)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return NewEngine(rules, &st)
}
