package alert

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"
	"time"

	"github.com/expr-lang/expr/vm"

	"github.com/sluicehq/sluice/schemas/alerts"
)

// Engine evaluates rules on events in event time. It is not safe for concurrent
// use; its State is what a restart needs to carry on where it stopped.
//
// Windows are evaluated at multiples of the rule's step, once the watermark (the
// latest event time seen, minus the rule's allowed lateness) has passed them. An
// event older than the last evaluated window of a rule is late for it and does not
// count there. Given the same events in the same order, the engine returns the same
// alerts: replaying a stream gives the alerts the live run gave.
type Engine struct {
	rules []*Rule
	st    *State
	// late counts events that arrived after their window was evaluated, by rule,
	// since the last DrainLate.
	late map[string]int
	adds []add
	// states holds each rule's state, in rules' order (nil for match rules).
	states []*RuleState
	// vm runs every expression (Observe is not called concurrently).
	vm vm.VM
	// groups holds the event's groups already read, for rules with the same group_by.
	groups []groupOf
	// fields holds, in rules' order, the field the rule's comparison reads, shared
	// by the rules comparing the same field (nil: no comparison); event numbers
	// the current event for them.
	fields []*sharedField
	event  uint64
	// fullRings makes every group's ring the rule's whole ring at once, as the
	// engine did before rings started small: the tests' oracle for them.
	fullRings bool
	// everyStep makes the windows be evaluated at every step, quiet ones too (see
	// liveSteps): the tests' oracle for skipping them; steps counts the window ends
	// evaluated.
	everyStep bool
	steps     int
	// spill, if set, holds the groups of windowed rules beyond its bound on disk.
	spill *Spill
	// tracking: each rule's state notes the groups that change (RuleState.dirty),
	// for the checkpoints (Checkpoints), at most maxDirty of them.
	tracking bool
	maxDirty int
}

// groupOf is an event's group for one group_by.
type groupOf struct {
	groupBy string // the group_by paths, joined
	values  []string
	key     string
}

// State is the engine's durable state.
type State struct {
	// MaxTime is the latest event time seen (advanced by Idle when input stops); for
	// partitioned input (Partition), the least of the partitions' latest times.
	MaxTime time.Time `json:"max_time"`
	// Partitions holds each partition's latest time, for partitioned input.
	Partitions []time.Time `json:"partitions,omitempty"`
	// Rules holds each windowed rule's state, by name.
	Rules map[string]*RuleState `json:"rules"`
}

// RuleState is one rule's windows and alerts.
type RuleState struct {
	Version string `json:"version"`
	// Evaluated is the end of the last window evaluated (unix ns; 0: none yet).
	Evaluated int64 `json:"evaluated"`
	// First is the earliest bucket before the first evaluation (when HasFirst).
	First    int64                  `json:"first,omitempty"`
	HasFirst bool                   `json:"has_first,omitempty"`
	Groups   map[string]*GroupState `json:"groups"`
	// groupBy are the rule's group labels, for MarshalJSON (set by SetRules).
	groupBy []string
	// last is the group of the last event, by its key (nil: none): consecutive
	// events of one group skip the map.
	last    *GroupState
	lastKey string
	// cold are the groups on disk (nil: every group is in Groups), see Spill.
	cold *coldGroups
	// dirty holds the keys of the groups that changed or went since the last
	// checkpoint's segment (nil: the engine keeps no checkpoints); reset: the state
	// was made since then (the next segment holds every group of the rule).
	dirty    map[string]struct{}
	reset    bool
	maxDirty int
	// cow is the rule's part of a checkpoint's capture in flight (nil: none): a
	// group it holds is encoded before it changes (keep).
	cow *cowSet
}

// changed notes that the group of key changed or went since the last segment,
// when the engine keeps checkpoints; g is the group when it is in memory (nil: on
// disk, or gone).
//
// The set is bounded (maxDirty): past it, the rule's next segment holds every
// group instead (a rule whose groups change that much between two saves is
// written whole at about the cost of its changes), and the set is let go.
func (rs *RuleState) changed(key string, g *GroupState) {
	if rs.dirty == nil || rs.reset || g != nil && g.dirty {
		return
	}
	if g != nil {
		g.dirty = true
	}
	rs.dirty[key] = struct{}{}
	if len(rs.dirty) > rs.maxDirty {
		rs.reset, rs.dirty = true, map[string]struct{}{}
	}
}

// maxDirty bounds the keys of changed groups a rule's state notes between two
// checkpoints by default (about 60 MiB of them).
const maxDirty = 1 << 20

// size is how many groups the rule has, in memory and on disk.
func (rs *RuleState) size() int {
	if rs.cold == nil {
		return len(rs.Groups)
	}
	return len(rs.Groups) + rs.cold.n
}

// GroupState is one group's buckets (threshold, rate), last event (absence) and
// alert.
type GroupState struct {
	// Labels are the group's labels only when its key cannot give them back (a
	// group_by value holds a NUL, the key's separator); otherwise nil in memory
	// (Rule.groupLabelsFor reads them from the key) and written from the key in a
	// snapshot (RuleState.MarshalJSON), as earlier releases read them.
	Labels map[string]string `json:"labels,omitempty"`
	// Buckets is a ring of the steps the windows span, by start time; only those
	// with events are saved.
	Buckets []Bucket `json:"buckets,omitempty"`
	// Latest is the start of the latest bucket with events.
	Latest int64 `json:"latest,omitempty"`
	// LastSeen is the latest event time of the group (absence).
	LastSeen int64 `json:"last_seen,omitempty"`
	// FiringSince is when the group's alert started firing (unix ns; 0: not firing).
	FiringSince int64 `json:"firing_since,omitempty"`
	// count is how many events the ring holds (kept by bucket and Observe; not
	// saved: UnmarshalJSON sums the buckets).
	count float64
	// ringed: Buckets is a ring (not as restored), of minRing slots or grown.
	ringed bool
	// touched is the Spill's epoch of the group's last event.
	touched uint32
	// dirty: the group is in its rule's dirty set.
	dirty bool
}

// Bucket aggregates the events of the step starting at Start (unix ns).
type Bucket struct {
	Start int64   `json:"start"`
	N     float64 `json:"n"`
	Sum   float64 `json:"sum"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
}

func (b *Bucket) add(v float64) {
	if b.N == 0 || v < b.Min {
		b.Min = v
	}
	if b.N == 0 || v > b.Max {
		b.Max = v
	}
	b.N++
	b.Sum += v
}

// NewEngine returns an engine for rules, carrying on from st (nil: a fresh start).
func NewEngine(rules []*Rule, st *State) *Engine {
	if st == nil {
		st = &State{}
	}
	if st.Rules == nil {
		st.Rules = map[string]*RuleState{}
	}
	e := &Engine{st: st, late: map[string]int{}}
	e.SetRules(rules)
	// Restored groups whose key holds their labels drop the copy (once, here: the
	// groups made later have none).
	for i, r := range e.rules {
		if rs := e.states[i]; rs != nil {
			for key, g := range rs.Groups {
				if g.Labels != nil && r.keyHoldsLabels(key) {
					g.Labels = nil
				}
			}
		}
	}
	return e
}

// State returns the engine's state (owned by the engine; encode it before the
// next call).
func (e *Engine) State() *State { return e.st }

// Rules returns the rules the engine evaluates.
func (e *Engine) Rules() []*Rule { return e.rules }

// SetRules replaces the rules. A rule whose config is unchanged keeps its state;
// alerts firing for a rule that was removed or changed are resolved, at the
// latest event time.
func (e *Engine) SetRules(rules []*Rule) []*alerts.Alert {
	e.keepAll()
	var out []*alerts.Alert
	keep := map[string]bool{}
	for _, r := range rules {
		if r.Kind == KindMatch {
			continue
		}
		if rs, ok := e.st.Rules[r.Name]; ok && rs.Version == r.version {
			keep[r.Name] = true
		}
	}
	old := map[string]*Rule{}
	for _, r := range e.rules {
		old[r.Name] = r
	}
	for _, name := range slices.Sorted(maps.Keys(e.st.Rules)) {
		if keep[name] {
			continue
		}
		rs := e.st.Rules[name]
		if r := old[name]; r != nil {
			firing := map[string]*GroupState{}
			for key, g := range rs.Groups {
				if g.FiringSince != 0 {
					firing[key] = g
				}
			}
			if rs.cold != nil {
				rs.cold.s.fail(rs.cold.each(func(key string, rec []byte) error {
					if g := rs.cold.decode(r, key, rec); g != nil && g.FiringSince != 0 {
						firing[key] = g
					}
					return nil
				}))
			}
			for _, key := range slices.Sorted(maps.Keys(firing)) {
				out = append(out, r.resolved(key, firing[key], e.st.MaxTime.UnixNano(), nil))
			}
		}
		if rs.cold != nil {
			rs.cold.drop()
		}
		delete(e.st.Rules, name)
	}
	for _, r := range rules {
		if r.Kind != KindMatch && !keep[r.Name] {
			rs := &RuleState{Version: r.version, Groups: map[string]*GroupState{}, reset: true}
			if r.Kind == KindAbsence {
				for _, labels := range r.Groups {
					key := r.groupKey(labels)
					g := &GroupState{}
					if !r.keyHoldsLabels(key) {
						g.Labels = labels
					}
					rs.Groups[key] = g
				}
			}
			e.st.Rules[r.Name] = rs
		}
	}
	e.rules = rules
	e.fields = make([]*sharedField, len(rules))
	byPath := map[string]*sharedField{}
	for i, r := range rules {
		if r.cmp == nil {
			continue
		}
		key := strings.Join(r.cmp.path, ".")
		if byPath[key] == nil {
			byPath[key] = &sharedField{}
		}
		e.fields[i] = byPath[key]
	}
	e.states = make([]*RuleState, len(rules))
	for i, r := range rules {
		rs := e.st.Rules[r.Name]
		e.states[i] = rs
		if rs == nil {
			continue
		}
		rs.groupBy = r.groupLabels
	}
	e.attachSpill()
	e.attachDirty()
	return out
}

// DrainLate calls f with each rule's count of late events since the last call
// (events that arrived after a window holding them was evaluated), then forgets
// them.
func (e *Engine) DrainLate(f func(rule string, n int)) {
	for rule, n := range e.late {
		f(rule, n)
	}
	clear(e.late)
}

// Observe evaluates env (an event at env.Time) and returns the alerts it causes:
// match alerts, resolved absences, and the transitions of every window the
// event's time lets close.
func (e *Engine) Observe(env *EventEnv) ([]*alerts.Alert, []error) {
	return e.observe(-1, env)
}

// Partition makes the engine's latest time the least of n partitions' latest
// times, each moved on by its events (ObserveIn) and its progress (Progress): a
// window closes only once the input of every partition has passed it, so input
// interleaved from n partitions, each in its own order, gives the alerts the
// stream in its order would, whatever the interleaving. A state of another count
// starts the partitions' times anew.
func (e *Engine) Partition(n int) {
	if len(e.st.Partitions) != n {
		e.st.Partitions = make([]time.Time, n)
	}
}

// ObserveIn is Observe for an event of partition p (see Partition).
func (e *Engine) ObserveIn(p int, env *EventEnv) ([]*alerts.Alert, []error) {
	if p < 0 || p >= len(e.st.Partitions) {
		return nil, []error{fmt.Errorf("alert: partition %d of %d", p, len(e.st.Partitions))}
	}
	return e.observe(p, env)
}

// Progress moves partition p's latest time on to t, as an event of p at t that no
// rule matches would, and returns the alerts of the windows that closes.
func (e *Engine) Progress(p int, t time.Time) []*alerts.Alert {
	if p < 0 || p >= len(e.st.Partitions) {
		return nil
	}
	e.moveTime(p, t)
	return e.advance()
}

// moveTime moves the latest time on for an event (or progress) at t of partition
// p (-1: input that is not partitioned).
func (e *Engine) moveTime(p int, t time.Time) {
	if p < 0 {
		if t.After(e.st.MaxTime) {
			e.st.MaxTime = t
		}
		return
	}
	parts := e.st.Partitions
	if t.After(parts[p]) {
		parts[p] = t
	}
	least := parts[0]
	for _, pt := range parts {
		if pt.IsZero() {
			return // a partition not heard from holds every window open
		}
		if pt.Before(least) {
			least = pt
		}
	}
	if least.After(e.st.MaxTime) {
		e.st.MaxTime = least
	}
}

func (e *Engine) observe(p int, env *EventEnv) ([]*alerts.Alert, []error) {
	var (
		out  []*alerts.Alert
		errs []error
	)
	t := env.Time.UnixNano()
	e.event++
	for i, r := range e.rules {
		ok, err := r.matches(&e.vm, env, e.fields[i], e.event)
		if err != nil {
			// A filter that fails on one event (a missing field, a wrong type) does not
			// match it; the event is not bad input.
			errs = append(errs, err)
			continue
		}
		if !ok {
			continue
		}
		values, key, err := e.group(r, env)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		switch r.Kind {
		case KindMatch:
			out = append(out, r.matched(env, r.groupLabelsOf(values)))
		case KindAbsence:
			g := e.states[i].group(r, key, values)
			if t > g.LastSeen {
				g.LastSeen = t
			}
			e.states[i].changed(key, g)
			if g.FiringSince != 0 {
				out = append(out, r.resolved(key, g, max(t, g.FiringSince), nil))
			}
		default:
			v, err := r.Value(&e.vm, env)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			e.adds = append(e.adds, add{r, e.states[i], key, values, v})
		}
	}
	e.moveTime(p, env.Time)
	// Windows the event's time closes are evaluated before it is counted: it never
	// belongs to them (its step starts at or after the watermark's), and the ring
	// of buckets then only ever holds steps still to be evaluated.
	out = append(out, e.advance()...)
	for _, a := range e.adds {
		r, rs := a.rule, a.state
		step := int64(r.Step)
		b := floorDiv(t, step) * step
		if rs.Evaluated != 0 && b+step <= rs.Evaluated {
			// Late: a window holding the event was evaluated already. It still counts
			// in the windows to come, unless none of them holds it.
			e.late[r.Name]++
			if b+r.span() <= rs.Evaluated {
				continue
			}
		}
		if rs.Evaluated == 0 && (!rs.HasFirst || b < rs.First) {
			rs.First, rs.HasFirst = b, true
		}
		g := rs.group(r, a.key, a.values)
		g.bucket(b, step, e.firstRing(r), rs.keepFrom(r)).add(a.value)
		g.count++
		rs.changed(a.key, g)
	}
	if len(e.adds) > 0 && e.spill != nil {
		e.evict()
	}
	clear(e.adds)
	e.adds = e.adds[:0]
	clear(e.groups)
	e.groups = e.groups[:0]
	return out, errs
}

// group returns r.Group of env, read once for all the rules with the same group_by
// (an error is not kept: it names its rule).
func (e *Engine) group(r *Rule, env *EventEnv) ([]string, string, error) {
	for _, g := range e.groups {
		if g.groupBy == r.groupBySig {
			return g.values, g.key, nil
		}
	}
	values, key, err := r.Group(&e.vm, env)
	if err == nil {
		e.groups = append(e.groups, groupOf{r.groupBySig, values, key})
	}
	return values, key, err
}

// add is an event value waiting to be counted in a rule's group.
type add struct {
	rule   *Rule
	state  *RuleState
	key    string
	values []string
	value  float64
}

// Idle moves the latest event time d forward, as if an event had arrived d later:
// the stage calls it while no input arrives, so windows close and absences fire
// when events stop. It does nothing before the first event.
func (e *Engine) Idle(d time.Duration) []*alerts.Alert {
	if e.st.MaxTime.IsZero() || d <= 0 {
		return nil
	}
	e.st.MaxTime = e.st.MaxTime.Add(d)
	return e.advance()
}

// advance evaluates every window of every rule that the watermark passed.
func (e *Engine) advance() []*alerts.Alert {
	if e.st.MaxTime.IsZero() {
		return nil
	}
	var out []*alerts.Alert
	latest := e.st.MaxTime.UnixNano()
	for i, r := range e.rules {
		rs := e.states[i]
		watermark := latest - int64(r.AllowedLateness)
		switch r.Kind {
		case KindThreshold, KindRate:
			out = e.advanceWindows(r, rs, watermark, out)
		case KindAbsence:
			out = r.advanceAbsence(rs, watermark, latest, out)
		}
	}
	return out
}

func (e *Engine) advanceWindows(r *Rule, rs *RuleState, watermark int64, out []*alerts.Alert) []*alerts.Alert {
	step := int64(r.Step)
	end := floorDiv(watermark, step) * step
	if rs.Evaluated == 0 {
		// The first window ends at the first boundary after the earliest bucket.
		if !rs.HasFirst || rs.First+step > end {
			return out
		}
		rs.Evaluated = rs.First
	}
	if end <= rs.Evaluated {
		return out
	}
	// The steps below change groups anywhere, in memory and on disk.
	rs.keepAll()
	// Past a window's span, the steps are walked only where a window can change
	// (live): an event far older or newer than the others would otherwise have the
	// loop visit every group at every step of the gap between them.
	var live []ends
	if end-rs.Evaluated > r.span()+step && !e.everyStep {
		live = r.liveSteps(rs)
	}
	for b := rs.Evaluated + step; b <= end; b += step {
		if live != nil {
			for len(live) > 0 && live[0].to < b {
				live = live[1:]
			}
			if len(live) == 0 || live[0].from > end {
				// No window changes up to the watermark.
				rs.Evaluated = end
				break
			}
			b = max(b, live[0].from)
		}
		e.steps++
		from := len(out)
		for key, g := range rs.Groups {
			var drop bool
			firing := g.FiringSince
			if out, drop = r.evaluate(key, g, b, out); drop {
				delete(rs.Groups, key)
				if rs.last == g {
					rs.last = nil
				}
				rs.changed(key, nil)
			} else if g.FiringSince != firing {
				rs.changed(key, g)
			}
		}
		if rs.cold != nil {
			out = rs.cold.advance(r, b, out, rs.changed)
		}
		// Groups are visited in no order: the changes of one step are sorted, so a
		// replay gives them in the same order.
		slices.SortFunc(out[from:], func(x, y *alerts.Alert) int { return strings.Compare(x.Fingerprint, y.Fingerprint) })
		rs.Evaluated = b
		if rs.size() == 0 {
			// Nothing left to evaluate: jump to the watermark.
			rs.Evaluated = end
			break
		}
	}
	return out
}

// ends is a range of window ends [from, to].
type ends struct{ from, to int64 }

// liveSteps returns the window ends after rs.Evaluated at which some group's
// windows can change, as ranges in order: a window ending at b holds the steps in
// [b-span, b), so a step s with events is in the windows ending in (s, s+span], and
// has left them at s+span+step. Between those ranges every window of every group
// is empty, as at the end of the range before: no alert changes, and no group goes
// that would not go at the next end evaluated (a group goes at the last end whose
// windows hold its latest step, which is live).
//
// A group on disk that cannot fire (coldGroups.bounded, not a candidate) is not
// read: its steps change no alert, and it goes at an end evaluated later.
func (r *Rule) liveSteps(rs *RuleState) []ends {
	step, reach := int64(r.Step), r.span()
	starts := map[int64]struct{}{}
	note := func(g *GroupState) {
		for _, b := range g.Buckets {
			if b.N > 0 && b.Start+reach+step > rs.Evaluated {
				starts[b.Start] = struct{}{}
			}
		}
	}
	for _, g := range rs.Groups {
		note(g)
	}
	if rs.cold != nil {
		rs.cold.groups(r, note)
	}
	var live []ends
	for _, s := range slices.Sorted(maps.Keys(starts)) {
		from, to := s+step, s+reach+step
		if n := len(live); n > 0 && from <= live[n-1].to+step {
			live[n-1].to = max(live[n-1].to, to)
			continue
		}
		live = append(live, ends{from, to})
	}
	if live == nil {
		live = []ends{}
	}
	return live
}

// evaluate evaluates the window ending at b for g (of key), appending its alert's
// change to out; drop tells that no event of g is left in the windows to come and
// its alert is not firing: the group goes.
func (r *Rule) evaluate(key string, g *GroupState, b int64, out []*alerts.Alert) ([]*alerts.Alert, bool) {
	holds, value := false, 0.0
	if g.FiringSince != 0 || !r.cannotHold(g) {
		holds, value = r.holds(g, b)
	}
	switch {
	case holds && g.FiringSince == 0:
		g.FiringSince = b
		out = append(out, r.firing(key, g, value))
	case !holds && g.FiringSince != 0:
		out = append(out, r.resolved(key, g, b, &value))
	}
	return out, g.Latest < b+int64(r.Step)-r.span() && g.FiringSince == 0
}

func (r *Rule) advanceAbsence(rs *RuleState, watermark, now int64, out []*alerts.Alert) []*alerts.Alert {
	// Groups are checked each time the watermark moves on by a tenth of for (at
	// least 1s): the alert's start is exact, its detection up to that late.
	if rs.Evaluated != 0 && watermark < rs.Evaluated+max(int64(r.For)/10, int64(time.Second)) {
		return out
	}
	rs.keepAll()
	for _, key := range slices.Sorted(maps.Keys(rs.Groups)) {
		g := rs.Groups[key]
		if g.LastSeen == 0 {
			// A listed group not seen yet is silent from the first event time.
			g.LastSeen = now
			rs.changed(key, g)
		}
		if g.FiringSince == 0 && watermark-g.LastSeen >= int64(r.For) {
			g.FiringSince = g.LastSeen + int64(r.For)
			rs.changed(key, g)
			out = append(out, r.firing(key, g, float64(watermark-g.LastSeen)/1e9))
		}
	}
	rs.Evaluated = watermark
	return out
}

// cannotHold reports that a count threshold cannot hold for g, whatever the
// window: its ring holds no more events than the threshold asks for (count is
// every event the ring holds, so at least any window's). Most groups of a rule
// that rarely fires are then passed over without reading their buckets.
func (r *Rule) cannotHold(g *GroupState) bool {
	if r.Kind != KindThreshold || r.Aggregate != AggCount {
		return false
	}
	switch r.Op {
	case ">":
		return g.count <= r.Threshold
	case ">=":
		return g.count < r.Threshold
	}
	return false
}

// holds evaluates the window ending at end (exclusive of end itself: buckets in
// [end-window, end)).
func (r *Rule) holds(g *GroupState, end int64) (bool, float64) {
	window := int64(r.Window)
	cur, ok := r.aggregate(g, end-window, end)
	if r.Kind == KindThreshold {
		if !ok {
			return false, 0
		}
		return compare[r.Op](cur, r.Threshold), cur
	}
	prev, okPrev := r.aggregate(g, end-2*window, end-window)
	if !ok || !okPrev || prev == 0 {
		// An empty or zero previous window is no baseline to compare with.
		return false, 0
	}
	var change float64
	switch r.Change {
	case "percent":
		change = (cur - prev) / prev * 100
	default:
		change = cur / prev
	}
	if math.IsNaN(change) {
		return false, 0
	}
	return compare[r.Op](change, r.Threshold), change
}

// aggregate returns the rule's aggregate over the buckets in [from, to); ok is
// false for avg, min and max of no events.
func (r *Rule) aggregate(g *GroupState, from, to int64) (float64, bool) {
	var acc Bucket
	switch step, n := int64(r.Step), int64(len(g.Buckets)); {
	case g.Latest < from:
		// No event in the range: skip the ring.
	case g.ringed && n == r.ring():
		// A ring of the rule's size holds step s at s/step mod n, with a slot for
		// each step of the range: only those slots are read. (A ring as restored is
		// a list of the steps with events, whatever its length: a grown ring's
		// list can have the rule's size and no slot order.)
		for s := from; s < to; s += step {
			if b := &g.Buckets[floorMod(s/step, n)]; b.Start == s {
				acc.merge(b)
			}
		}
	default:
		// A ring as restored (only steps with events, in no slot order), or grown.
		for i := range g.Buckets {
			if b := &g.Buckets[i]; b.Start >= from && b.Start < to {
				acc.merge(b)
			}
		}
	}
	switch r.Aggregate {
	case AggCount:
		return acc.N, true
	case AggSum:
		return acc.Sum, true
	}
	if acc.N == 0 {
		return 0, false
	}
	switch r.Aggregate {
	case AggAvg:
		return acc.Sum / acc.N, true
	case AggMin:
		return acc.Min, true
	default:
		return acc.Max, true
	}
}

// merge adds b's events to acc.
func (acc *Bucket) merge(b *Bucket) {
	if b.N == 0 {
		return
	}
	if acc.N == 0 || b.Min < acc.Min {
		acc.Min = b.Min
	}
	if acc.N == 0 || b.Max > acc.Max {
		acc.Max = b.Max
	}
	acc.N += b.N
	acc.Sum += b.Sum
}

// ring is how many steps a group's buckets hold: the windows' span, the steps
// ahead of the last evaluation that lateness keeps open, and the current one.
func (r *Rule) ring() int64 {
	return (r.span()+int64(r.AllowedLateness))/int64(r.Step) + 2
}

// span is how far back the windows evaluated at one time reach.
func (r *Rule) span() int64 {
	if r.Kind == KindRate {
		return 2 * int64(r.Window)
	}
	return int64(r.Window)
}

// keepFrom is the start of the oldest step a window still to be evaluated reads
// (every step before the first evaluation).
func (rs *RuleState) keepFrom(r *Rule) int64 {
	if rs.Evaluated == 0 {
		return math.MinInt64
	}
	return rs.Evaluated + int64(r.Step) - r.span()
}

// bucket returns the ring slot for the step starting at start, emptied if it held
// an older step that no window to come reads (keep: the oldest step one reads).
// A ring starts with minRing slots and doubles whenever a step still to be read
// would take the slot of another: most groups have events in a step or two of
// their windows, and a ring of the rule's size (ring: every step the windows need
// while the input's times stay within the lateness of the latest) would be mostly
// empty. Partitioned input (Engine.Partition) can run further ahead of the windows
// evaluated, and the ring then grows past that rather than drop a step still to be
// evaluated.
func (g *GroupState) bucket(start, step, first, keep int64) *Bucket {
	if !g.ringed {
		g.resize(max(first, int64(len(g.Buckets))), step, keep)
	}
	for {
		size := int64(len(g.Buckets))
		b := &g.Buckets[floorMod(start/step, size)]
		if b.Start == start {
			break
		}
		if b.N > 0 && b.Start >= keep {
			g.resize(2*size, step, keep)
			continue
		}
		g.count -= b.N
		*b = Bucket{Start: start}
		break
	}
	b := &g.Buckets[floorMod(start/step, int64(len(g.Buckets)))]
	if start > g.Latest {
		g.Latest = start
	}
	return b
}

// resize makes the buckets a ring of at least size slots holding every step with
// events from keep on (doubling size until they fit).
func (g *GroupState) resize(size, step, keep int64) {
	for ; ; size *= 2 {
		ring := make([]Bucket, size)
		fits := true
		for _, b := range g.Buckets {
			if b.N == 0 || b.Start < keep {
				continue
			}
			slot := &ring[floorMod(b.Start/step, size)]
			if slot.N > 0 {
				fits = false
				break
			}
			*slot = b
		}
		if fits {
			g.Buckets, g.count, g.ringed = ring, 0, true
			for _, b := range ring {
				g.count += b.N
			}
			return
		}
	}
}

// minRing is how many slots a group's ring starts with.
const minRing = 2

// firstRing is the size of a group's ring when it is made: minRing, or the rule's
// whole ring for the tests' oracle (fullRings).
func (e *Engine) firstRing(r *Rule) int64 {
	if e.fullRings {
		return r.ring()
	}
	return minRing
}

func floorMod(a, n int64) int64 {
	m := a % n
	if m < 0 {
		m += n
	}
	return m
}

// MarshalJSON saves only the buckets with events.
func (g *GroupState) MarshalJSON() ([]byte, error) {
	type plain GroupState
	c := plain(*g)
	c.Buckets = nil
	for _, b := range g.Buckets {
		if b.N > 0 {
			c.Buckets = append(c.Buckets, b)
		}
	}
	return json.Marshal(c)
}

// MarshalJSON writes the rule's state with every group's labels, those read from
// its key included (earlier releases read them from the snapshot). The groups are
// written one at a time: a labelled copy of each lives only while it is encoded.
func (rs *RuleState) MarshalJSON() ([]byte, error) {
	type plain RuleState
	if rs.cold != nil && rs.cold.n > 0 {
		return nil, errors.New("alert state: groups on disk are written in the binary form only (State.MarshalBinary)")
	}
	if len(rs.groupBy) == 0 {
		return json.Marshal((*plain)(rs))
	}
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, key := range slices.Sorted(maps.Keys(rs.Groups)) {
		if i > 0 {
			buf.WriteByte(',')
		}
		k, err := json.Marshal(key)
		if err != nil {
			return nil, err
		}
		g := rs.Groups[key]
		if g.Labels == nil {
			labeled := *g
			labeled.Labels = labelsOfKey(rs.groupBy, key)
			g = &labeled
		}
		v, err := g.MarshalJSON()
		if err != nil {
			return nil, err
		}
		buf.Write(k)
		buf.WriteByte(':')
		buf.Write(v)
	}
	buf.WriteByte('}')
	// The groups field of plain, shadowed by the encoded groups.
	return json.Marshal(struct {
		*plain
		Groups json.RawMessage `json:"groups"`
	}{(*plain)(rs), buf.Bytes()})
}

// UnmarshalJSON restores a saved group, and the count of its buckets: a ring saved
// with every slot holding events comes back full-size, and the count bound
// (cannotHold) reads count for it at once.
func (g *GroupState) UnmarshalJSON(data []byte) error {
	type plain GroupState
	if err := json.Unmarshal(data, (*plain)(g)); err != nil {
		return err
	}
	g.count = 0
	for _, b := range g.Buckets {
		g.count += b.N
	}
	return nil
}

func (rs *RuleState) group(r *Rule, key string, values []string) *GroupState {
	if rs.cow != nil {
		rs.keep(key) // the caller changes it
	}
	if rs.last != nil && rs.lastKey == key {
		if rs.cold != nil {
			rs.last.touched = rs.cold.s.epoch
		}
		return rs.last
	}
	g := rs.Groups[key]
	if g == nil && rs.cold != nil {
		if g = rs.cold.take(r, key); g != nil {
			rs.Groups[key] = g
		}
	}
	if g == nil {
		g = &GroupState{}
		if !r.keyHoldsLabels(key) {
			g.Labels = r.groupLabelsOf(values)
		}
		rs.Groups[key] = g
	}
	rs.last, rs.lastKey = g, key
	if rs.cold != nil {
		g.touched = rs.cold.s.epoch
	}
	return g
}

func (r *Rule) labels(group map[string]string) map[string]string {
	l := make(map[string]string, len(r.Labels)+len(group)+2)
	maps.Copy(l, r.Labels)
	maps.Copy(l, group)
	l["alertname"] = r.Name
	l["severity"] = r.Severity
	return l
}

func (r *Rule) matched(env *EventEnv, group map[string]string) *alerts.Alert {
	// Each matching event is its own alert: its key is one of the labels.
	labels := r.labels(group)
	labels["event_key"] = env.Key
	return &alerts.Alert{
		Fingerprint: alerts.Fingerprint(r.Name, labels),
		Rule:        r.Name,
		Status:      alerts.Firing,
		Severity:    r.Severity,
		Labels:      labels,
		Annotations: r.Annotate(eventData(env, group)),
		StartsAt:    env.Time,
		EventKey:    env.Key,
	}
}

func (r *Rule) firing(key string, g *GroupState, value float64) *alerts.Alert {
	group := r.groupLabelsFor(key, g)
	labels := r.labels(group)
	return &alerts.Alert{
		Fingerprint: alerts.Fingerprint(r.Name, labels),
		Rule:        r.Name,
		Status:      alerts.Firing,
		Severity:    r.Severity,
		Labels:      labels,
		Annotations: r.Annotate(r.windowData(group, value)),
		StartsAt:    time.Unix(0, g.FiringSince).UTC(),
		Value:       jsonFloat(value),
	}
}

// resolved ends the alert of g (of key) at t and returns the resolution.
func (r *Rule) resolved(key string, g *GroupState, t int64, value *float64) *alerts.Alert {
	group := r.groupLabelsFor(key, g)
	labels := r.labels(group)
	a := &alerts.Alert{
		Fingerprint: alerts.Fingerprint(r.Name, labels),
		Rule:        r.Name,
		Status:      alerts.Resolved,
		Severity:    r.Severity,
		Labels:      labels,
		StartsAt:    time.Unix(0, g.FiringSince).UTC(),
		EndsAt:      time.Unix(0, t).UTC(),
	}
	v := 0.0
	if value != nil {
		v = *value
		a.Value = jsonFloat(v)
	}
	a.Annotations = r.Annotate(r.windowData(group, v))
	g.FiringSince = 0
	return a
}

func (r *Rule) windowData(group map[string]string, value float64) map[string]any {
	return map[string]any{"labels": group, "value": value, "threshold": r.Threshold, "window": r.Window.String(), "rule": r.Name}
}

// jsonFloat is v, or nil where JSON cannot hold it.
func jsonFloat(v float64) *float64 {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return nil
	}
	return &v
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if (a%b != 0) && ((a < 0) != (b < 0)) {
		q--
	}
	return q
}
