package alert

import (
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
)

var t0 = time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)

// in is one test event: its type, seconds after t0 and data.
type in struct {
	typ  string
	sec  float64
	data string
}

func env(e in) *EventEnv {
	return Env(&events.Event{ID: fmt.Sprint(e.sec), Source: "test", Type: e.typ, Key: fmt.Sprintf("%s-%v", e.typ, e.sec),
		Time: t0.Add(time.Duration(e.sec * float64(time.Second))), Data: json.RawMessage(e.data)})
}

// show renders alert changes as "status group start[-end]" in seconds after t0.
func show(out []*alerts.Alert, group string) []string {
	var s []string
	for _, a := range out {
		line := fmt.Sprintf("%s %s %g", a.Status, a.Labels[group], a.StartsAt.Sub(t0).Seconds())
		if !a.EndsAt.IsZero() {
			line += fmt.Sprintf("-%g", a.EndsAt.Sub(t0).Seconds())
		}
		s = append(s, line)
	}
	return s
}

func mustRules(t *testing.T, cfgs ...RuleConfig) []*Rule {
	t.Helper()
	rules, err := CompileRules(cfgs)
	if err != nil {
		t.Fatal(err)
	}
	return rules
}

func feed(t *testing.T, e *Engine, ins []in) []*alerts.Alert {
	t.Helper()
	var out []*alerts.Alert
	for _, x := range ins {
		got, errs := e.Observe(env(x))
		for _, err := range errs {
			t.Logf("expression error: %v", err)
		}
		out = append(out, got...)
	}
	return out
}

func logins(user string, secs ...float64) []in {
	var out []in
	for _, s := range secs {
		out = append(out, in{"login.failed", s, `{"user":"` + user + `"}`})
	}
	return out
}

func TestWindowedRules(t *testing.T) {
	failed := RuleConfig{Name: "failed-logins", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: time.Minute, Step: 10 * time.Second, Op: ">", Threshold: 5, AllowedLateness: time.Millisecond}
	orders := func(agg, op string, threshold float64) RuleConfig {
		return RuleConfig{Name: "orders", Kind: KindThreshold, Filter: `type == "order"`, Window: time.Minute, Step: 10 * time.Second,
			Aggregate: agg, Value: "data.amount", Op: op, Threshold: threshold, AllowedLateness: time.Millisecond, GroupBy: []string{"source"}}
	}
	order := func(sec, amount float64) in { return in{"order", sec, fmt.Sprintf(`{"amount":%g}`, amount)} }
	tests := []struct {
		name   string
		rule   RuleConfig
		events []in
		group  string
		want   []string
	}{
		{"threshold fires once per group while it holds, resolves when the burst leaves the window", failed,
			append(logins("u1", 0, 1, 2, 3, 4, 5), logins("u2", 1, 2, 80)...), "user",
			[]string{"firing u1 10", "resolved u1 10-70"}},
		{"exactly the threshold does not fire", failed,
			append(logins("u1", 0, 1, 2, 3, 4), logins("u2", 100)...), "user", nil},
		{"six events spread over two minutes never fill one window", failed,
			append(logins("u1", 0, 25, 50, 75, 100, 125), logins("u2", 300)...), "user", nil},
		{"a window edge: events at 0 and 59.9 share the window [0,60)", failed,
			append(logins("u1", 0, 0, 0, 59.9, 59.9, 59.9), logins("u2", 200)...), "user",
			[]string{"firing u1 60", "resolved u1 60-70"}},
		{"the window is evaluated only once the watermark passes it", failed,
			logins("u1", 0, 1, 2, 3, 4, 5, 9.9), "user", nil},
		{"sum", orders(AggSum, ">=", 100), []in{order(0, 60), order(5, 40), order(200, 0)}, "source",
			[]string{"firing test 10", "resolved test 10-70"}},
		{"avg", orders(AggAvg, ">", 50), []in{order(0, 60), order(5, 50), order(200, 0)}, "source",
			[]string{"firing test 10", "resolved test 10-70"}},
		{"avg below", orders(AggAvg, ">", 50), []in{order(0, 60), order(5, 30), order(200, 0)}, "source", nil},
		{"min", orders(AggMin, "<", 1), []in{order(0, 60), order(30, 0.5), order(200, 0)}, "source",
			[]string{"firing test 40", "resolved test 40-100"}},
		{"max", orders(AggMax, ">", 100), []in{order(0, 60), order(30, 500), order(200, 0)}, "source",
			[]string{"firing test 40", "resolved test 40-100"}},
		{"rate: revenue down by more than half against the previous minute",
			RuleConfig{Name: "drop", Kind: KindRate, Filter: `type == "order"`, Window: time.Minute, Step: time.Minute, Aggregate: AggSum,
				Value: "data.amount", Change: "percent", Op: "<", Threshold: -50, AllowedLateness: time.Millisecond, GroupBy: []string{"source"}},
			[]in{order(0, 600), order(30, 400), order(70, 300), order(100, 100), order(130, 1000), order(190, 1000), order(250, 0)}, "source",
			[]string{"firing test 120", "resolved test 120-180"}},
		{"rate by factor: count doubled (an empty previous window is no baseline)",
			RuleConfig{Name: "spike", Kind: KindRate, Filter: `type == "order"`, Window: time.Minute, Step: time.Minute,
				Change: "factor", Op: ">=", Threshold: 2, AllowedLateness: time.Millisecond, GroupBy: []string{"source"}},
			[]in{order(0, 1), order(60, 1), order(61, 1), order(130, 1), order(131, 1), order(250, 0)}, "source",
			[]string{"firing test 120", "resolved test 120-180"}},
		{"absence: a group silent for the duration fires, its next event resolves",
			RuleConfig{Name: "silent", Kind: KindAbsence, Filter: `type == "beat"`, GroupBy: []string{"data.device"}, For: 30 * time.Second,
				AllowedLateness: time.Millisecond},
			[]in{{"beat", 0, `{"device":"d1"}`}, {"beat", 0, `{"device":"d2"}`}, {"beat", 20, `{"device":"d2"}`},
				{"beat", 40, `{"device":"d2"}`}, {"beat", 50, `{"device":"d1"}`}, {"beat", 60, `{"device":"d2"}`}}, "device",
			[]string{"firing d1 30", "resolved d1 30-50"}},
		{"absence of a listed group never seen",
			RuleConfig{Name: "silent", Kind: KindAbsence, Filter: `type == "beat"`, GroupBy: []string{"data.device"}, For: 30 * time.Second,
				AllowedLateness: time.Millisecond, Groups: []map[string]string{{"device": "d9"}}},
			[]in{{"beat", 0, `{"device":"d1"}`}, {"beat", 25, `{"device":"d1"}`}, {"beat", 45, `{"device":"d1"}`}}, "device",
			[]string{"firing d9 30"}},
		{"lateness holds windows open: an event 20 s late still counts",
			RuleConfig{Name: "failed-logins", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
				Window: time.Minute, Step: 10 * time.Second, Op: ">", Threshold: 2, AllowedLateness: 30 * time.Second},
			append(logins("u1", 0, 1, 25), logins("u1", 5)...), "user", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := NewEngine(mustRules(t, tt.rule), nil)
			got := show(feed(t, e, tt.events), tt.group)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got  %q\nwant %q", got, tt.want)
			}
		})
	}
}

// Late events: one whose every window was evaluated is dropped and counted; one
// still inside windows to come counts there.
func TestLateEvents(t *testing.T) {
	rule := RuleConfig{Name: "failed-logins", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: time.Minute, Step: 10 * time.Second, Op: ">", Threshold: 2, AllowedLateness: time.Millisecond}
	e := NewEngine(mustRules(t, rule), nil)
	out := feed(t, e, logins("u2", 0, 101))
	out = append(out, feed(t, e, logins("u1", 5, 5, 5))...) // every window holding 5 s was evaluated
	if len(out) != 0 || e.late["failed-logins"] != 3 {
		t.Fatalf("out %q, late %d; want nothing and 3 late", show(out, "user"), e.late["failed-logins"])
	}
	out = feed(t, e, logins("u1", 95, 95, 95, 200)) // late for the window ending at 100, in time for 110
	if got := show(out, "user"); !slices.Equal(got, []string{"firing u1 110", "resolved u1 110-160"}) || e.late["failed-logins"] != 6 {
		t.Fatalf("got %q, %d late", got, e.late["failed-logins"])
	}
}

// A restart from the state's JSON at any point gives the alerts an uninterrupted
// run gives: replay is deterministic.
func TestStateRoundTrip(t *testing.T) {
	rules := []RuleConfig{
		{Name: "failed-logins", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
			Window: time.Minute, Step: 10 * time.Second, Op: ">", Threshold: 3},
		{Name: "silent", Kind: KindAbsence, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"}, For: 45 * time.Second},
	}
	var events []in
	for i := range 400 {
		user := fmt.Sprintf("u%d", i%7)
		if i%7 == 3 && i > 100 && i < 250 {
			continue // u3 goes silent for a while
		}
		events = append(events, logins(user, float64(i)*0.8+float64(i%5)*3)...)
	}
	whole := show(feed(t, NewEngine(mustRules(t, rules...), nil), events), "user")
	if len(whole) < 4 {
		t.Fatalf("the test events fire too little: %q", whole)
	}
	for _, cut := range []int{1, 57, 200, len(events) - 1} {
		e := NewEngine(mustRules(t, rules...), nil)
		first := feed(t, e, events[:cut])
		e2 := restart(t, e, mustRules(t, rules...))
		got := show(append(first, feed(t, e2, events[cut:])...), "user")
		if !slices.Equal(got, whole) {
			t.Fatalf("cut at %d:\ngot  %q\nwant %q", cut, got, whole)
		}
	}
}

// When events stop, Idle moves event time on: windows close and absences fire.
func TestIdle(t *testing.T) {
	e := NewEngine(mustRules(t,
		RuleConfig{Name: "silent", Kind: KindAbsence, Filter: `type == "beat"`, GroupBy: []string{"data.device"}, For: 30 * time.Second},
		RuleConfig{Name: "burst", Kind: KindThreshold, Filter: `type == "beat"`, Window: 10 * time.Second, Op: ">", Threshold: 1},
	), nil)
	if out := e.Idle(time.Hour); out != nil {
		t.Fatalf("idle before any event: %v", out)
	}
	out := feed(t, e, []in{{"beat", 0, `{"device":"d1"}`}, {"beat", 1, `{"device":"d1"}`}})
	for range 100 {
		out = append(out, e.Idle(time.Second)...)
	}
	var got []string
	for _, a := range out {
		got = append(got, a.Rule+" "+a.Status)
	}
	want := []string{"burst firing", "burst resolved", "silent firing"}
	if !slices.Equal(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
	if d := out[2].StartsAt.Sub(t0); d != 31*time.Second {
		t.Fatalf("absence starts at %s, want 31s (last event + for)", d)
	}
}

// Changing a rule resets its state and resolves what it had firing; an unchanged
// rule keeps its state.
func TestSetRules(t *testing.T) {
	a := RuleConfig{Name: "a", Kind: KindAbsence, Filter: `type == "beat"`, For: 10 * time.Second, AllowedLateness: time.Millisecond}
	b := RuleConfig{Name: "b", Kind: KindAbsence, Filter: `type == "beat"`, For: 10 * time.Second, AllowedLateness: time.Millisecond}
	e := NewEngine(mustRules(t, a, b), nil)
	out := feed(t, e, []in{{"beat", 0, `{}`}, {"other", 20, `{}`}})
	if len(out) != 2 {
		t.Fatalf("want both absences firing, got %q", show(out, ""))
	}
	b.For = 20 * time.Second
	out = e.SetRules(mustRules(t, a, b))
	if len(out) != 1 || out[0].Rule != "b" || out[0].Status != alerts.Resolved {
		t.Fatalf("changing b: got %+v, want b resolved", out)
	}
	if e.State().Rules["a"].Groups[""].FiringSince == 0 {
		t.Fatal("unchanged rule a lost its firing alert")
	}
}

// Annotations see the group's labels and the value.
func TestWindowAnnotations(t *testing.T) {
	rule := RuleConfig{Name: "failed-logins", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: time.Minute, Op: ">", Threshold: 1, AllowedLateness: time.Millisecond, Severity: "critical",
		Labels:      map[string]string{"team": "security"},
		Annotations: map[string]string{"summary": "{{ .value }} failed logins for {{ .labels.user }} in {{ .window }} (over {{ .threshold }})"}}
	out := feed(t, NewEngine(mustRules(t, rule), nil), logins("u1", 0, 1, 2, 120))
	if len(out) == 0 {
		t.Fatal("no alert")
	}
	a := out[0]
	want := "3 failed logins for u1 in 1m0s (over 1)"
	if a.Annotations["summary"] != want || a.Labels["team"] != "security" || a.Labels["user"] != "u1" || a.Labels["severity"] != "critical" ||
		a.Value == nil || *a.Value != 3 || !strings.HasPrefix(alerts.MsgID(a), "alert:"+a.Fingerprint+":firing:") {
		t.Fatalf("alert = %+v (summary %q)", a, a.Annotations["summary"])
	}
	if out[1].Fingerprint != a.Fingerprint || alerts.MsgID(out[1]) == alerts.MsgID(a) {
		t.Fatal("a resolution keeps the fingerprint and has its own message id")
	}
}

// A count threshold passes over groups whose ring holds too few events to reach it
// (cannotHold); it fires and resolves exactly as the same rule written as a sum of
// 1 (which is always evaluated), and the ring's count stays the sum of its buckets.
func TestCountBoundSkipsNothingThatHolds(t *testing.T) {
	for _, op := range []string{">", ">="} {
		rule := func(name, agg, value string) RuleConfig {
			return RuleConfig{Name: name, Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
				Window: 10 * time.Second, Step: time.Second, Aggregate: agg, Value: value, Op: op, Threshold: 12, AllowedLateness: 2 * time.Second}
		}
		e := NewEngine(mustRules(t, rule("count", AggCount, ""), rule("sum", AggSum, "1")), nil)
		rng := rand.New(rand.NewPCG(1, 2))
		var out []*alerts.Alert
		sec := 0.0
		for range 5000 {
			sec += rng.Float64() * 0.4
			at := sec - rng.Float64()*3 // some late
			user := fmt.Sprintf("u%d", rng.IntN(4))
			got, _ := e.Observe(env(in{"login.failed", at, fmt.Sprintf(`{"user":%q}`, user)}))
			out = append(out, got...)
			for key, g := range e.st.Rules["count"].Groups {
				n := 0.0
				for _, b := range g.Buckets {
					n += b.N
				}
				if n != g.count {
					t.Fatalf("group %s: count %g, buckets hold %g", key, g.count, n)
				}
			}
		}
		by := map[string][]string{}
		for _, a := range out {
			by[a.Rule] = append(by[a.Rule], show([]*alerts.Alert{a}, "user")...)
		}
		if len(by["count"]) < 20 {
			t.Fatalf("op %s: %d changes; the test shows little", op, len(by["count"]))
		}
		// Changes of one step come sorted by fingerprint, which names the rule.
		slices.Sort(by["count"])
		slices.Sort(by["sum"])
		if !slices.Equal(by["count"], by["sum"]) {
			t.Errorf("op %s: count rule\n%q\nsum of 1\n%q", op, by["count"], by["sum"])
		}
	}
}

// Rules with the same group_by share the event's group, read once; a rule with
// another group_by reads its own.
func TestRulesShareGroups(t *testing.T) {
	rule := func(name string, by ...string) RuleConfig {
		return RuleConfig{Name: name, Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: by,
			Window: 10 * time.Second, Step: 10 * time.Second, Op: ">", Threshold: 0, AllowedLateness: time.Millisecond}
	}
	e := NewEngine(mustRules(t, rule("a", "data.user"), rule("by-source", "source"), rule("b", "data.user"), rule("both", "data.user", "source")), nil)
	out := feed(t, e, append(logins("u1", 1), logins("u2", 2, 30)...))
	got := map[string][]string{}
	for _, a := range out {
		if a.Status == alerts.Firing {
			got[a.Rule] = append(got[a.Rule], a.Labels["user"]+"/"+a.Labels["source"])
		}
	}
	want := map[string][]string{"a": {"u1/", "u2/"}, "b": {"u1/", "u2/"}, "by-source": {"/test"}, "both": {"u1/test", "u2/test"}}
	for name, w := range want {
		slices.Sort(got[name])
		if !slices.Equal(got[name], w) {
			t.Errorf("rule %s fired for %q, want %q", name, got[name], w)
		}
	}
}

// Rules see what they read of data alike whether all of it or only what they name
// (DataFields) is decoded: the same alerts, for rules of every kind.
func TestRulesReadWhatTheyName(t *testing.T) {
	cfgs := []RuleConfig{
		{Name: "big", Filter: `type == "order" && data.amount > 100`},
		{Name: "per-user", Kind: KindThreshold, Filter: `data.kind == "x"`, GroupBy: []string{"data.user"}, Window: 10 * time.Second,
			Aggregate: AggSum, Value: `data.amount`, Op: ">", Threshold: 150, AllowedLateness: time.Millisecond},
		{Name: "rate", Kind: KindRate, Filter: `type == "order"`, GroupBy: []string{"data.region.name"}, Window: 10 * time.Second,
			Op: ">", Threshold: 1.5, AllowedLateness: time.Millisecond},
	}
	rules := mustRules(t, cfgs...)
	if got := DataFields(rules).String(); got != "{amount,kind,region,user}" {
		t.Fatalf("the rules read %s of data, want {amount,kind,region,user}", got)
	}
	var ins []in
	for i := range 200 {
		ins = append(ins, in{"order", float64(i) / 4, fmt.Sprintf(`{"noise":{"a":[%d,"}"]},"user":"u%d","kind":"x","amount":%d,"region":{"name":"r%d"},"note":"\"q\""}`,
			i, i%3, i%7*30, i%2)})
	}
	observe := func(f events.DataFields) []string {
		e := NewEngine(mustRules(t, cfgs...), nil)
		var out []string
		for _, x := range ins {
			got, errs := e.Observe(EnvFor(&events.Event{ID: fmt.Sprint(x.sec), Source: "test", Type: x.typ,
				Time: t0.Add(time.Duration(x.sec * float64(time.Second))), Data: json.RawMessage(x.data)}, f))
			if len(errs) > 0 {
				t.Fatal(errs)
			}
			for _, a := range got {
				v := "-"
				if a.Value != nil {
					v = fmt.Sprint(*a.Value)
				}
				out = append(out, fmt.Sprint(a.Rule, " ", a.Status, " ", a.Labels, " ", v, " ", a.StartsAt.Sub(t0)))
			}
		}
		return out
	}
	all, named := observe(events.AllData()), observe(DataFields(rules))
	if len(all) < 10 || !slices.Equal(all, named) {
		t.Fatalf("all of data decoded: %d alerts %q\nonly what the rules name: %d alerts %q", len(all), all, len(named), named)
	}
	if got := DataFields(mustRules(t, RuleConfig{Name: "m", Filter: `data.x > 1`, Annotations: map[string]string{"a": "{{ .data }}"}})).String(); got != "all" {
		t.Errorf("a match rule with annotations reads %s of data, want all", got)
	}
}

// A group whose windows have all passed is dropped; its next event starts it
// again, and the new group fires like any other (a rule remembers the group of its
// last event, and must not keep the dropped one).
func TestGroupDroppedThenBack(t *testing.T) {
	e := NewEngine(mustRules(t, RuleConfig{Name: "burst", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: 10 * time.Second, Op: ">", Threshold: 2, AllowedLateness: time.Millisecond}), nil)
	feed(t, e, logins("u1", 1))
	feed(t, e, []in{{"page.view", 60, `{}`}}) // u1's windows all passed: dropped
	if _, ok := e.State().Rules["burst"].Groups["u1"]; ok {
		t.Fatal("u1 was not dropped")
	}
	out := feed(t, e, append(logins("u1", 61, 62, 63), logins("u2", 80)...))
	if got := show(out, "user"); !slices.Equal(got, []string{"firing u1 70"}) {
		t.Fatalf("got %q, want u1 firing at 70", got)
	}
}

// Rules comparing the same field read it once per event, and each still decides
// as it would alone.
func TestRulesShareFields(t *testing.T) {
	cfgs := []RuleConfig{
		{Name: "n1", Filter: `data.n > 1`}, {Name: "n5", Filter: `type == "a" && data.n > 5`},
		{Name: "m", Filter: `data.m == "x"`}, {Name: "n-text", Filter: `data.n == "3"`},
	}
	e := NewEngine(mustRules(t, cfgs...), nil)
	alone := mustRules(t, cfgs...)
	fired := map[string]int{}
	want := map[string]int{}
	for i := range 20 {
		x := in{"a", float64(i), fmt.Sprintf(`{"n":%d,"m":"%s"}`, i%10, []string{"x", "y"}[i%2])}
		if i%7 == 3 {
			x.data = `{"n":"3"}` // another type: expr decides
		}
		out, _ := e.Observe(env(x))
		for _, a := range out {
			fired[a.Rule]++
		}
		for _, r := range alone {
			if ok, _ := r.Matches(nil, env(x)); ok {
				want[r.Name]++
			}
		}
	}
	if !maps.Equal(fired, want) || want["n1"] == 0 || want["n5"] == 0 || want["m"] == 0 || want["n-text"] == 0 {
		t.Fatalf("fired %v, want %v (each rule alone)", fired, want)
	}
}

// A group whose every ring slot holds events is saved with as many buckets as the
// ring has: restored, it is a full ring again, and its count (not saved) must be
// the buckets' sum, or the count bound passes over a window that holds. (Found by
// FuzzEngine in CI.)
func TestRestoredFullRing(t *testing.T) {
	rules := mustRules(t, RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: 2 * time.Second, Op: ">", Threshold: 2, AllowedLateness: 3 * time.Second})
	if n := rules[0].ring(); n != 8 {
		t.Fatalf("ring of %d steps; the events below fill 8", n)
	}
	var envs []*EventEnv
	// One event every 3 steps: 8 events land in the 8 slots, never more than 2 in
	// a window. Then 4 in 2 steps: the rule holds.
	for i := range 8 {
		envs = append(envs, env(in{"login.failed", float64(6 * i), `{"user":"u1"}`}))
	}
	for _, sec := range []float64{43, 44, 45, 50, 55, 60, 65, 70} {
		envs = append(envs, env(in{"login.failed", sec, `{"user":"u1"}`}))
	}
	whole, _ := checkRestart(t, rules, envs)
	if len(whole) == 0 {
		t.Fatal("the rule never fired; the test shows nothing")
	}
}

// A group's labels are read from its key (the group_by values joined by NUL) and
// not kept beside it, unless a value holds a NUL itself (then the key cannot be
// split back and the group keeps them). Alerts carry the same labels either way,
// a snapshot writes every group's labels (earlier releases read them from it), and
// a restart from it gives the same alerts, labels included.
func TestGroupLabelsFromKey(t *testing.T) {
	rules := mustRules(t, RuleConfig{Name: "burst", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user", "data.app"},
		Window: 10 * time.Second, Step: 2 * time.Second, Op: ">", Threshold: 1, AllowedLateness: time.Second},
		RuleConfig{Name: "quiet", Kind: KindAbsence, Filter: `type == "heartbeat"`, GroupBy: []string{"data.host"}, For: 5 * time.Second,
			Groups: []map[string]string{{"host": "h1"}}})
	var envs []*EventEnv
	for i := range 4 {
		envs = append(envs,
			env(in{"login.failed", float64(i), `{"user":"u1","app":"web"}`}),
			env(in{"login.failed", float64(i) + 0.5, `{"user":"a\u0000b","app":"web"}`}))
	}
	envs = append(envs, env(in{"heartbeat", 30, `{"host":"h1"}`}), env(in{"login.failed", 40, `{"user":"u2","app":"api"}`}))
	_, e := checkRestart(t, rules, envs)

	e = NewEngine(rules, nil)
	fired := map[string]map[string]string{}
	for _, ev := range envs[:8] { // the bursts: both fire, by the window ending at 2 s
		out, _ := e.Observe(ev)
		for _, a := range out {
			fired[a.Labels["user"]] = a.Labels
		}
	}
	if fired["u1"]["app"] != "web" || fired["a\x00b"]["app"] != "web" || fired["a\x00b"]["alertname"] != "burst" {
		t.Fatalf("alerts' labels: %v", fired)
	}
	groups := e.State().Rules["burst"].Groups
	if g := groups["u1\x00web"]; g == nil || g.Labels != nil {
		t.Fatalf("group u1/web: %+v; want it held without labels", g)
	}
	if g := groups["a\x00b\x00web"]; g == nil || g.Labels["user"] != "a\x00b" {
		t.Fatalf("group a\\x00b/web: %+v; want it held with its labels", g)
	}
	if g := e.State().Rules["quiet"].Groups["h1"]; g == nil || g.Labels != nil {
		t.Fatalf("listed absence group h1: %+v; want it held without labels", g)
	}
	b, err := json.Marshal(e.State())
	if err != nil {
		t.Fatal(err)
	}
	var saved struct {
		Rules map[string]struct {
			Groups map[string]struct {
				Labels map[string]string `json:"labels"`
			} `json:"groups"`
		} `json:"rules"`
	}
	if err := json.Unmarshal(b, &saved); err != nil {
		t.Fatal(err)
	}
	if l := saved.Rules["burst"].Groups["u1\x00web"].Labels; l["user"] != "u1" || l["app"] != "web" || len(l) != 2 {
		t.Fatalf("the snapshot's labels of u1/web: %v", l)
	}
	if l := saved.Rules["quiet"].Groups["h1"].Labels; l["host"] != "h1" {
		t.Fatalf("the snapshot's labels of h1: %v", l)
	}
	// Restored, the groups drop the labels their keys hold.
	r := restart(t, e, rules)
	if g := r.State().Rules["burst"].Groups["u1\x00web"]; g == nil || g.Labels != nil {
		t.Fatalf("restored group u1/web: %+v; want it held without labels", g)
	}
}

// TestQuietStepsSkipped: an event a day older than the others, before a rule's
// first window closed, and one a day later than the others, evaluate only the
// steps where a window changes, with the alerts of an engine that evaluates every
// step (each jump was 8,640 steps over every group: with millions of steps, a
// partition's alerting stalled for minutes). A count "<" rule keeps its groups
// firing on empty windows, so they never go.
func TestQuietStepsSkipped(t *testing.T) {
	rules := mustRules(t,
		RuleConfig{Name: "many", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
			Window: time.Minute, Step: 10 * time.Second, Op: ">", Threshold: 3, AllowedLateness: time.Second},
		RuleConfig{Name: "few", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
			Window: time.Minute, Step: 10 * time.Second, Op: "<", Threshold: 2, AllowedLateness: time.Second},
		RuleConfig{Name: "rising", Kind: KindRate, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
			Window: 30 * time.Second, Step: 10 * time.Second, Op: ">", Threshold: 2, AllowedLateness: time.Second})
	day := 86400.0
	var ins []in
	ins = append(ins, logins("a", 0, 1, 2, 3, 4)...)
	ins = append(ins, logins("old", -day)...)
	ins = append(ins, logins("a", 40)...)
	ins = append(ins, logins("b", 5, 6, 7, 8, 9, 50, 51)...)
	ins = append(ins, logins("b", 100, 101, 102, 103, 104, 105, 106)...)
	ins = append(ins, logins("late", day, day+1, day+2, day+3, day+4)...)
	envs := make([]*EventEnv, len(ins))
	for i, x := range ins {
		envs[i] = env(x)
	}
	skipping, every := checkSteps(t, rules, envs)
	if every < 4*8640 {
		t.Fatalf("the oracle evaluated %d window ends: the input has no long quiet gap", every)
	}
	if skipping > 200 {
		t.Fatalf("%d window ends evaluated (every step: %d): quiet steps are walked", skipping, every)
	}
	t.Logf("window ends evaluated: %d, every step: %d", skipping, every)
	checkRestart(t, rules, envs)
}
