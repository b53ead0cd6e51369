package alert

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/events"
)

// codecEngine is an engine with every kind of windowed state: groups by user
// (one value holds a NUL, so its labels are kept), sums and extremes of fractional
// and negative amounts, alerts firing, absences, and partitioned input.
func codecEngine(t testing.TB, events_ int) ([]*Rule, *Engine) {
	t.Helper()
	rules, err := CompileRules([]RuleConfig{
		{Name: "busy", Kind: KindThreshold, Filter: `type == "t0"`, GroupBy: []string{"data.user"}, Window: time.Minute, Op: ">", Threshold: 3, AllowedLateness: 2 * time.Minute},
		{Name: "spend", Kind: KindThreshold, Filter: `type == "t1"`, GroupBy: []string{"data.user", "source"}, Window: time.Minute,
			Aggregate: AggSum, Value: "data.amount", Op: ">", Threshold: 10},
		{Name: "low", Kind: KindThreshold, Filter: `type == "t1"`, GroupBy: []string{"data.user"}, Window: time.Minute,
			Aggregate: AggMin, Value: "data.amount", Op: "<", Threshold: -40},
		{Name: "surge", Kind: KindRate, Filter: `type == "t0"`, GroupBy: []string{"source"}, Window: time.Minute, Change: "factor", Op: ">", Threshold: 2},
		{Name: "quiet", Kind: KindAbsence, Filter: `type == "t2"`, GroupBy: []string{"data.user"}, For: 30 * time.Second},
	})
	if err != nil {
		t.Fatal(err)
	}
	e := NewEngine(rules, nil)
	e.Partition(3)
	rng := rand.New(rand.NewPCG(3, 4))
	start := time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)
	for i := range events_ {
		user := fmt.Sprintf("u%d", rng.IntN(200))
		if i%97 == 0 {
			user = "a\x00b"
		}
		data, _ := json.Marshal(map[string]any{"user": user, "amount": math.Round((rng.Float64()*100-50)*1000) / 1000})
		ev := &events.Event{ID: fmt.Sprint(i), Source: fmt.Sprint("s", i%3), Type: fmt.Sprint("t", rng.IntN(3)), Key: fmt.Sprint(i),
			Time: start.Add(time.Duration(i)*137*time.Millisecond + time.Duration(rng.IntN(1000))*time.Microsecond), Data: data}
		e.ObserveIn(i%3, Env(ev))
	}
	return rules, e
}

// stateJSON is the state st restores into for rules, as JSON (what an engine
// carrying on from it holds).
func stateJSON(t testing.TB, rules []*Rule, st *State) string {
	t.Helper()
	b, err := json.Marshal(NewEngine(rules, st).State())
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestStateBinaryRoundTrip(t *testing.T) {
	rules, e := codecEngine(t, 20_000)
	bin, err := e.State().MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(e.State())
	if err != nil {
		t.Fatal(err)
	}
	var fromBin, fromJSON State
	if err := fromBin.UnmarshalBinary(bin); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(js, &fromJSON); err != nil {
		t.Fatal(err)
	}
	firing, labelled := 0, 0
	for _, rs := range fromBin.Rules {
		for _, g := range rs.Groups {
			if g.FiringSince != 0 {
				firing++
			}
			if g.Labels != nil {
				labelled++
			}
		}
	}
	if firing == 0 || labelled == 0 || len(fromBin.Partitions) != 3 {
		t.Fatalf("the state lacks what the test is about: %d firing, %d with labels, %d partitions", firing, labelled, len(fromBin.Partitions))
	}
	if a, b := stateJSON(t, rules, &fromBin), stateJSON(t, rules, &fromJSON); a != b {
		t.Fatalf("the binary state restores other than the JSON one:\n%.2000s\n%.2000s", a, b)
	}
	if len(bin)*3 > len(js) {
		t.Errorf("binary state %d bytes, JSON %d: want under a third", len(bin), len(js))
	}
	t.Logf("binary %d bytes, JSON %d", len(bin), len(js))
}

func TestStateBinaryCorrupt(t *testing.T) {
	_, e := codecEngine(t, 500)
	bin, err := e.State().MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	for n := range len(bin) {
		var st State
		if err := st.UnmarshalBinary(bin[:n]); !errors.Is(err, ErrCorruptState) {
			t.Fatalf("the first %d of %d bytes: %v, want ErrCorruptState", n, len(bin), err)
		}
	}
	var st State
	if err := st.UnmarshalBinary(append(bin, 0)); !errors.Is(err, ErrCorruptState) {
		t.Fatalf("a byte after the state: %v, want ErrCorruptState", err)
	}
}

func TestStateNumbers(t *testing.T) {
	for _, v := range []float64{0, 1, -1, 2.5, -0.0, 1 << 52, -(1 << 52), 1<<52 - 1, math.MaxFloat64, math.SmallestNonzeroFloat64, math.Inf(1), math.Inf(-1), 1e-300} {
		d := &decoder{b: appendNumber(nil, v)}
		if got := d.number(); d.err != nil || math.Float64bits(got) != math.Float64bits(v) || len(d.b) != 0 {
			t.Errorf("%v comes back as %v (%v)", v, got, d.err)
		}
	}
	d := &decoder{b: appendNumber(nil, math.NaN())}
	if got := d.number(); !math.IsNaN(got) {
		t.Errorf("NaN comes back as %v", got)
	}
}

// FuzzStateBinary: no input makes the decoder panic, and what decodes encodes to
// a state that decodes the same.
func FuzzStateBinary(f *testing.F) {
	_, e := codecEngine(f, 300)
	bin, err := e.State().MarshalBinary()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(bin)
	f.Add(stateMagic)
	f.Fuzz(func(t *testing.T, data []byte) {
		var st State
		if st.UnmarshalBinary(data) != nil {
			return
		}
		again, err := st.MarshalBinary()
		if err != nil {
			return // a time MarshalBinary refuses (an offset it cannot hold)
		}
		var st2 State
		if err := st2.UnmarshalBinary(again); err != nil {
			t.Fatalf("a decoded state encodes to one that does not decode: %v", err)
		}
		a, _ := json.Marshal(&st)
		b, _ := json.Marshal(&st2)
		if string(a) != string(b) {
			t.Fatalf("a state changes through encoding:\n%s\n%s", a, b)
		}
	})
}
