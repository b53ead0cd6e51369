package alert

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"regexp"
	"slices"
	"strings"
	"text/template"
	"time"

	"github.com/expr-lang/expr"
	"github.com/expr-lang/expr/ast"
	"github.com/expr-lang/expr/vm"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/configfile"
)

// Kinds of rule.
const (
	// KindMatch fires one alert for every event that matches the filter.
	KindMatch = "match"
	// KindThreshold fires while an aggregate over a sliding window, per group,
	// compares true with a value.
	KindThreshold = "threshold"
	// KindRate fires while the windowed aggregate changed against the previous
	// window by a factor or percentage.
	KindRate = "rate"
	// KindAbsence fires when a group had no matching event for a duration.
	KindAbsence = "absence"
)

// Aggregates a windowed rule can compute.
const (
	AggCount = "count"
	AggSum   = "sum"
	AggAvg   = "avg"
	AggMin   = "min"
	AggMax   = "max"
)

// RuleConfig is one entry of the rules section of SLUICE_CONFIG.
type RuleConfig struct {
	Name string `yaml:"name" json:"name"`
	// Kind is match (default), threshold, rate or absence.
	Kind string `yaml:"kind" json:"kind"`
	// Filter is an expr (github.com/expr-lang/expr) boolean expression over the event:
	// id, source, type, subject, time, key, data, enrichment.
	Filter string `yaml:"filter" json:"filter"`
	// GroupBy lists the fields (expr paths such as data.user or
	// enrichment.user_country) whose values make a group: each group has its own
	// window and its own alert, labelled with the values (data.user → user).
	GroupBy []string `yaml:"group_by" json:"group_by,omitempty"`
	// Window is the length of the sliding window (threshold, rate).
	Window time.Duration `yaml:"window" json:"window,omitempty"`
	// Step is how far the window slides each time it is evaluated; default
	// window/10, at least 1s.
	Step time.Duration `yaml:"step" json:"step,omitempty"`
	// Aggregate is count (default), sum, avg, min or max of Value.
	Aggregate string `yaml:"aggregate" json:"aggregate,omitempty"`
	// Value is an expr number expression over the event (sum, avg, min, max).
	Value string `yaml:"value" json:"value,omitempty"`
	// Op and Threshold: the rule holds while "<value> Op Threshold" (threshold)
	// or "<change> Op Threshold" (rate). Op is >, >=, <, <=, == or !=.
	Op        string  `yaml:"op" json:"op,omitempty"`
	Threshold float64 `yaml:"threshold" json:"threshold,omitempty"`
	// Change is how a rate rule compares windows: factor (current/previous) or
	// percent ((current-previous)/previous*100).
	Change string `yaml:"change" json:"change,omitempty"`
	// For is how long a group must stay silent before an absence rule fires.
	For time.Duration `yaml:"for" json:"for,omitempty"`
	// Groups lists groups an absence rule expects even before they are seen, as
	// label maps ({device: d1}).
	Groups []map[string]string `yaml:"groups" json:"groups,omitempty"`
	// AllowedLateness is how far behind the latest event time an event may arrive
	// and still count; windows are evaluated once the latest event time minus this
	// passes their end. Default 1m.
	AllowedLateness time.Duration     `yaml:"allowed_lateness" json:"allowed_lateness,omitempty"`
	Severity        string            `yaml:"severity" json:"severity"`
	Labels          map[string]string `yaml:"labels" json:"labels,omitempty"`
	// Annotations are text/template strings. Match rules see the event's fields
	// ({{ .data.amount }}); every rule sees {{ .labels.user }}, and windowed rules
	// {{ .value }} and {{ .threshold }}.
	Annotations map[string]string `yaml:"annotations" json:"annotations,omitempty"`
}

// Rule is a compiled rule.
type Rule struct {
	RuleConfig
	// version identifies the rule's config: state survives a reload only for rules
	// whose config did not change.
	version string
	// onlyType, if set, is the event type the filter requires (type == "x" at its
	// top, alone or and-ed): other events skip the filter.
	onlyType string
	// typeOnly: the filter is that type check and nothing else.
	typeOnly bool
	filter   *vm.Program
	// rest, if set, is the filter without the type check: the filter is
	// `type == "x" && rest` (or rest && type == "x"), and the check is made apart.
	rest *vm.Program
	// cmp, if set, is the filter (or rest) when it is one comparison of a plain
	// field path with a literal, read without the expression machine where it can.
	cmp     *comparison
	value   *vm.Program
	groupBy []*vm.Program
	// groupPaths holds, for each group_by that is a plain field path (data.user,
	// source), its steps, read without the expression machine; nil for others.
	groupPaths  [][]string
	groupLabels []string
	// groupBySig is GroupBy joined: rules with the same one share an event's group.
	groupBySig  string
	annotations map[string]*template.Template
	// data is what the rule reads of events' data.
	data events.DataFields
}

// RuleError reports a rule that does not load, by name and position.
type RuleError struct {
	Index int
	Name  string
	Err   error
}

func (e *RuleError) Error() string {
	return fmt.Sprintf("rule %d (%q): %v", e.Index+1, e.Name, e.Err)
}

func (e *RuleError) Unwrap() error { return e.Err }

// LoadRules decodes and compiles the rules section of f. Rules that do not compile
// are reported together (as *RuleError) and left out; the rest are returned.
func LoadRules(f *configfile.File) ([]*Rule, error) {
	var cfgs []RuleConfig
	if err := f.Decode("rules", &cfgs); err != nil {
		return nil, err
	}
	return CompileRules(cfgs)
}

// CompileRules compiles cfgs; see LoadRules.
func CompileRules(cfgs []RuleConfig) ([]*Rule, error) {
	var (
		out  []*Rule
		errs []error
	)
	seen := map[string]bool{}
	for i, c := range cfgs {
		r, err := compile(c)
		if err == nil && seen[c.Name] {
			err = errors.New("another rule has this name")
		}
		if err != nil {
			errs = append(errs, &RuleError{Index: i, Name: c.Name, Err: err})
			continue
		}
		seen[c.Name] = true
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

func compile(c RuleConfig) (*Rule, error) {
	if c.Name == "" {
		return nil, errors.New("name is required")
	}
	if c.Kind == "" {
		c.Kind = KindMatch
	}
	if c.Filter == "" {
		return nil, errors.New("filter is required")
	}
	if c.Severity == "" {
		c.Severity = "warning"
	}
	if c.AllowedLateness == 0 {
		c.AllowedLateness = time.Minute
	}
	if c.AllowedLateness < 0 {
		return nil, errors.New("allowed_lateness must not be negative")
	}
	r := &Rule{annotations: map[string]*template.Template{}}
	var err error
	if r.filter, err = expr.Compile(c.Filter, expr.Env(EventEnv{}), expr.AsBool()); err != nil {
		return nil, fmt.Errorf("filter: %w", err)
	}
	r.onlyType = requiredType(r.filter.Node())
	r.typeOnly = r.onlyType != "" && requiredTypeIsAll(r.filter.Node())
	if rest := besideType(r.filter.Node()); rest != nil {
		// The other term, compiled on its own (printed back from the parse); where
		// that does not compile, the whole filter runs.
		r.rest, _ = expr.Compile(rest.String(), expr.Env(EventEnv{}), expr.AsBool())
		if r.rest != nil {
			r.cmp = comparisonOf(rest)
		}
	} else if !r.typeOnly {
		r.cmp = comparisonOf(r.filter.Node())
	}
	for _, path := range c.GroupBy {
		p, err := expr.Compile(path, expr.Env(EventEnv{}))
		if err != nil {
			return nil, fmt.Errorf("group_by %q: %w", path, err)
		}
		label := groupLabel(path)
		for _, l := range r.groupLabels {
			if l == label {
				return nil, fmt.Errorf("group_by %q: another field also makes label %q", path, label)
			}
		}
		r.groupBy = append(r.groupBy, p)
		r.groupPaths = append(r.groupPaths, fieldPath(path))
		r.groupLabels = append(r.groupLabels, label)
	}
	r.groupBySig = strings.Join(c.GroupBy, "\x00")
	switch c.Kind {
	case KindMatch:
	case KindThreshold, KindRate:
		if err := c.checkWindow(); err != nil {
			return nil, err
		}
		if c.AllowedLateness/c.Step > 1000 {
			// Each group keeps a bucket per step of window and lateness.
			return nil, fmt.Errorf("allowed_lateness %s is more than 1000 steps of %s", c.AllowedLateness, c.Step)
		}
		if c.Aggregate != AggCount {
			if r.value, err = expr.Compile(c.Value, expr.Env(EventEnv{}), expr.AsFloat64()); err != nil {
				return nil, fmt.Errorf("value: %w", err)
			}
		}
		if _, ok := compare[c.Op]; !ok {
			return nil, fmt.Errorf("op %q: want one of >, >=, <, <=, ==, !=", c.Op)
		}
		if c.Kind == KindRate {
			if c.Change == "" {
				c.Change = "factor"
			}
			if c.Change != "factor" && c.Change != "percent" {
				return nil, fmt.Errorf("change %q: want factor or percent", c.Change)
			}
		}
	case KindAbsence:
		if c.For <= 0 {
			return nil, errors.New("for is required: how long a group may stay silent")
		}
		for i, g := range c.Groups {
			for _, l := range r.groupLabels {
				if _, ok := g[l]; !ok {
					return nil, fmt.Errorf("groups[%d] lacks label %q (from group_by)", i, l)
				}
			}
			if len(g) != len(r.groupLabels) {
				return nil, fmt.Errorf("groups[%d] has labels group_by does not make (want exactly %s)", i, strings.Join(r.groupLabels, ", "))
			}
		}
	default:
		return nil, fmt.Errorf("kind %q: want match, threshold, rate or absence", c.Kind)
	}
	for k, text := range c.Annotations {
		t, err := template.New(k).Option("missingkey=zero").Parse(text)
		if err != nil {
			return nil, fmt.Errorf("annotation %s: %w", k, err)
		}
		r.annotations[k] = t
	}
	r.data = events.ExprDataFields(r.filter.Node())
	for _, p := range append(slices.Clone(r.groupBy), r.value) {
		if p != nil {
			r.data = r.data.Union(events.ExprDataFields(p.Node()))
		}
	}
	if c.Kind == KindMatch && len(c.Annotations) > 0 {
		r.data = events.AllData() // the templates see data whole
	}
	r.RuleConfig = c
	b, _ := json.Marshal(c)
	sum := sha256.Sum256(b)
	r.version = hex.EncodeToString(sum[:8])
	return r, nil
}

func (c *RuleConfig) checkWindow() error {
	if c.Window <= 0 {
		return errors.New("window is required")
	}
	if c.Step == 0 {
		c.Step = max(c.Window/10, time.Second)
	}
	if c.Step <= 0 || c.Step > c.Window || c.Window%c.Step != 0 {
		return fmt.Errorf("step %s must divide window %s", c.Step, c.Window)
	}
	if c.Window/c.Step > 1000 {
		return fmt.Errorf("window %s is more than 1000 steps of %s", c.Window, c.Step)
	}
	if c.Aggregate == "" {
		c.Aggregate = AggCount
	}
	switch c.Aggregate {
	case AggCount:
		if c.Value != "" {
			return errors.New("value is not used by aggregate count")
		}
	case AggSum, AggAvg, AggMin, AggMax:
		if c.Value == "" {
			return fmt.Errorf("aggregate %s needs value: the number to aggregate", c.Aggregate)
		}
	default:
		return fmt.Errorf("aggregate %q: want count, sum, avg, min or max", c.Aggregate)
	}
	return nil
}

var compare = map[string]func(a, b float64) bool{
	">":  func(a, b float64) bool { return a > b },
	">=": func(a, b float64) bool { return a >= b },
	"<":  func(a, b float64) bool { return a < b },
	"<=": func(a, b float64) bool { return a <= b },
	"==": func(a, b float64) bool { return a == b },
	"!=": func(a, b float64) bool { return a != b && !math.IsNaN(a) },
}

// groupLabel is the label a group_by path makes: its last part (data.user → user).
func groupLabel(path string) string {
	path = strings.TrimSpace(path)
	if i := strings.LastIndexByte(path, '.'); i >= 0 {
		path = path[i+1:]
	}
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' {
			return r
		}
		return '_'
	}, path)
}

// EventEnv is what filters and annotation templates see of an event.
type EventEnv = events.ExprEnv

// requiredType returns the event type n requires, if it is `type == "x"` or an
// and of terms one of which is.
func requiredType(n ast.Node) string {
	switch b := n.(type) {
	case *ast.BinaryNode:
		switch b.Operator {
		case "==":
			id, okID := b.Left.(*ast.IdentifierNode)
			lit, okLit := b.Right.(*ast.StringNode)
			if !okID || !okLit {
				id, okID = b.Right.(*ast.IdentifierNode)
				lit, okLit = b.Left.(*ast.StringNode)
			}
			if okID && okLit && id.Value == "type" {
				return lit.Value
			}
		case "&&", "and":
			if t := requiredType(b.Left); t != "" {
				return t
			}
			return requiredType(b.Right)
		}
	}
	return ""
}

// besideType returns the other term of n when n is `type == "x" && other` or
// `other && type == "x"`; nil otherwise.
func besideType(n ast.Node) ast.Node {
	b, ok := n.(*ast.BinaryNode)
	if !ok || (b.Operator != "&&" && b.Operator != "and") {
		return nil
	}
	switch {
	case requiredType(b.Left) != "" && requiredTypeIsAll(b.Left):
		return b.Right
	case requiredType(b.Right) != "" && requiredTypeIsAll(b.Right):
		return b.Left
	}
	return nil
}

// comparison is a filter term `path op literal`: a plain field path (data.ms,
// source) compared with a number or string literal.
type comparison struct {
	path  []string
	op    string
	num   float64
	str   string
	isNum bool
}

// comparisonOf returns n as a comparison, or nil when it is not one.
func comparisonOf(n ast.Node) *comparison {
	b, ok := n.(*ast.BinaryNode)
	if !ok {
		return nil
	}
	c := &comparison{op: b.Operator, path: fieldPath(b.Left.String())}
	switch c.op {
	case ">", ">=", "<", "<=", "==", "!=":
	default:
		return nil
	}
	switch lit := b.Right.(type) {
	case *ast.IntegerNode:
		c.num, c.isNum = float64(lit.Value), true
	case *ast.FloatNode:
		c.num, c.isNum = lit.Value, true
	case *ast.StringNode:
		if c.op != "==" && c.op != "!=" {
			return nil
		}
		c.str = lit.Value
	default:
		return nil
	}
	if c.path == nil {
		return nil
	}
	return c
}

// test compares the field's value (as lookup read it: ok is false where it could
// not) with the literal; known is false where the expression machine must decide
// (the field missing, or of another type than the literal).
func (c *comparison) test(v any, ok bool) (result, known bool) {
	if !ok {
		return false, false
	}
	switch v := v.(type) {
	case float64:
		if !c.isNum {
			return false, false
		}
		switch c.op {
		case ">":
			return v > c.num, true
		case ">=":
			return v >= c.num, true
		case "<":
			return v < c.num, true
		case "<=":
			return v <= c.num, true
		case "==":
			return v == c.num, true
		default:
			return v != c.num, true
		}
	case string:
		if c.isNum {
			return false, false
		}
		return (v == c.str) == (c.op == "=="), true
	}
	return false, false
}

// run runs p on env with m, or a new machine when m is nil. An engine reuses one
// machine for every expression it runs, which saves allocating one each time.
func run(m *vm.VM, p *vm.Program, env *EventEnv) (any, error) {
	if m == nil {
		return expr.Run(p, env)
	}
	return m.Run(p, env)
}

// requiredTypeIsAll reports whether n is only the comparison requiredType found.
func requiredTypeIsAll(n ast.Node) bool {
	b, ok := n.(*ast.BinaryNode)
	return ok && b.Operator == "=="
}

// plainPath is a field path group_by may read directly.
var plainPath = regexp.MustCompile(`^(?:(?:data|enrichment)(?:\.[A-Za-z_][A-Za-z0-9_]*)+|id|source|type|subject|key)$`)

// fieldPath returns the steps of a plain field path, nil for other expressions.
func fieldPath(src string) []string {
	if !plainPath.MatchString(src) {
		return nil
	}
	return strings.Split(src, ".")
}

// lookup reads a plain field path of env; ok is false where the expression
// machine would have to decide (a step that is not an object, or missing before
// the last).
func lookup(env *EventEnv, path []string) (v any, ok bool) {
	switch path[0] {
	case "id":
		return env.ID, true
	case "source":
		return env.Source, true
	case "type":
		return env.Type, true
	case "subject":
		return env.Subject, true
	case "key":
		return env.Key, true
	case "data":
		v = env.Data
	case "enrichment":
		if env.Enrichment == nil {
			return nil, false
		}
		v = env.Enrichment
	}
	for i, step := range path[1:] {
		m, isMap := v.(map[string]any)
		if !isMap {
			return nil, false
		}
		if v, ok = m[step]; !ok && i < len(path)-2 {
			return nil, false
		}
	}
	return v, true
}

// Matches evaluates the filter on env, with machine m (nil: a new one).
func (r *Rule) Matches(m *vm.VM, env *EventEnv) (bool, error) {
	return r.matches(m, env, nil, 0)
}

// Matcher tells the events that one of a set of rules' filters matches: the
// rule input a partitioned pipeline hands the alert runner. A filter that fails
// on an event does not match it, as in the engine. Not safe for concurrent use.
type Matcher struct {
	rules []*Rule
	vm    vm.VM
}

// NewMatcher returns a Matcher for rules.
func NewMatcher(rules []*Rule) *Matcher { return &Matcher{rules: rules} }

// Rules returns the rules m matches.
func (m *Matcher) Rules() []*Rule { return m.rules }

// Any reports whether one of the rules' filters matches env.
func (m *Matcher) Any(env *EventEnv) bool {
	for _, r := range m.rules {
		if ok, err := r.Matches(&m.vm, env); ok && err == nil {
			return true
		}
	}
	return false
}

// sharedField is the value of a field path, read once for every rule comparing it
// on the same event.
type sharedField struct {
	event uint64 // the event it was read for (0: none)
	v     any
	ok    bool
}

// matches is Matches, reading the comparison's field through shared (if not nil)
// for the event numbered event.
func (r *Rule) matches(m *vm.VM, env *EventEnv, shared *sharedField, event uint64) (bool, error) {
	if r.onlyType != "" && env.Type != r.onlyType {
		return false, nil
	}
	if r.typeOnly {
		return true, nil
	}
	if r.cmp != nil {
		var (
			v  any
			ok bool
		)
		if shared == nil {
			v, ok = lookup(env, r.cmp.path)
		} else {
			if shared.event != event {
				shared.v, shared.ok = lookup(env, r.cmp.path)
				shared.event = event
			}
			v, ok = shared.v, shared.ok
		}
		if ok, known := r.cmp.test(v, ok); known {
			return ok, nil
		}
	}
	p := r.filter
	if r.rest != nil {
		p = r.rest
	}
	out, err := run(m, p, env)
	if err != nil {
		return false, fmt.Errorf("rule %s: filter: %w", r.Name, err)
	}
	b, _ := out.(bool)
	return b, nil
}

// Group returns the group values of env (in group_by's order) and their key, with
// machine m (nil: a new one).
func (r *Rule) Group(m *vm.VM, env *EventEnv) ([]string, string, error) {
	if len(r.groupBy) == 0 {
		return nil, "", nil
	}
	values := make([]string, len(r.groupBy))
	for i, p := range r.groupBy {
		var (
			v  any
			ok bool
		)
		if r.groupPaths[i] != nil {
			v, ok = lookup(env, r.groupPaths[i])
		}
		if !ok {
			var err error
			if v, err = run(m, p, env); err != nil {
				return nil, "", fmt.Errorf("rule %s: group_by %s: %w", r.Name, r.GroupBy[i], err)
			}
		}
		switch v := v.(type) {
		case nil:
		case string:
			values[i] = v
		default:
			values[i] = fmt.Sprint(v)
		}
	}
	if len(values) == 1 {
		return values, values[0], nil
	}
	return values, strings.Join(values, "\x00"), nil
}

// groupLabelsOf names values by group_by's labels.
func (r *Rule) groupLabelsOf(values []string) map[string]string {
	if len(values) == 0 {
		return nil
	}
	labels := make(map[string]string, len(values))
	for i, v := range values {
		labels[r.groupLabels[i]] = v
	}
	return labels
}

// keyHoldsLabels reports whether key (group_by values joined by NUL) splits back
// into the values: none of them held a NUL.
func (r *Rule) keyHoldsLabels(key string) bool {
	if len(r.groupLabels) == 0 {
		return key == ""
	}
	return strings.Count(key, "\x00") == len(r.groupLabels)-1
}

// groupLabelsFor are the group labels of g, of key.
func (r *Rule) groupLabelsFor(key string, g *GroupState) map[string]string {
	if g.Labels != nil || len(r.groupLabels) == 0 {
		return g.Labels
	}
	return labelsOfKey(r.groupLabels, key)
}

// labelsOfKey are the labels names give the values joined by NUL in key.
func labelsOfKey(names []string, key string) map[string]string {
	labels := make(map[string]string, len(names))
	for i, name := range names {
		v, rest, _ := strings.Cut(key, "\x00")
		if i == len(names)-1 {
			v = key
		}
		labels[name], key = v, rest
	}
	return labels
}

func (r *Rule) groupKey(labels map[string]string) string {
	values := make([]string, len(r.groupLabels))
	for i, l := range r.groupLabels {
		values[i] = labels[l]
	}
	return strings.Join(values, "\x00")
}

// Value evaluates the rule's value expression on env, with machine m (nil: a new
// one).
func (r *Rule) Value(m *vm.VM, env *EventEnv) (float64, error) {
	if r.value == nil {
		return 1, nil
	}
	v, err := run(m, r.value, env)
	if err != nil {
		return 0, fmt.Errorf("rule %s: value: %w", r.Name, err)
	}
	f, _ := v.(float64)
	return f, nil
}

// Annotate renders the annotations with data as the template's dot.
func (r *Rule) Annotate(data map[string]any) map[string]string {
	if len(r.annotations) == 0 {
		return nil
	}
	out := make(map[string]string, len(r.annotations))
	for k, t := range r.annotations {
		var buf bytes.Buffer
		if err := t.Execute(&buf, data); err != nil {
			out[k] = fmt.Sprintf("<annotation %s failed: %v>", k, err)
			continue
		}
		out[k] = buf.String()
	}
	return out
}

// eventData is what a match rule's annotations see: the event's fields.
func eventData(e *EventEnv, labels map[string]string) map[string]any {
	return map[string]any{
		"id": e.ID, "source": e.Source, "type": e.Type, "subject": e.Subject,
		"time": e.Time, "key": e.Key, "data": e.Data, "enrichment": e.Enrichment,
		"labels": labels,
	}
}
