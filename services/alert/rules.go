package alert

import (
	"bytes"
	"errors"
	"fmt"
	"text/template"

	"github.com/expr-lang/expr"
	"github.com/expr-lang/expr/vm"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/configfile"
)

// RuleConfig is one entry of the rules section of SLUICE_CONFIG.
type RuleConfig struct {
	Name string `yaml:"name"`
	// Kind is match: every event that matches Filter fires an alert.
	Kind string `yaml:"kind"`
	// Filter is an expr (github.com/expr-lang/expr) boolean expression over the event:
	// id, source, type, subject, time, data, enrichment.
	Filter      string            `yaml:"filter"`
	Severity    string            `yaml:"severity"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

// Rule is a compiled rule.
type Rule struct {
	RuleConfig
	filter      *vm.Program
	annotations map[string]*template.Template
}

// Kinds of rule this build evaluates.
const KindMatch = "match"

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
	if c.Kind != KindMatch {
		return nil, fmt.Errorf("kind %q is not supported by this build (supported: %s)", c.Kind, KindMatch)
	}
	if c.Filter == "" {
		return nil, errors.New("filter is required")
	}
	if c.Severity == "" {
		c.Severity = "warning"
	}
	prog, err := expr.Compile(c.Filter, expr.Env(EventEnv{}), expr.AsBool())
	if err != nil {
		return nil, fmt.Errorf("filter: %w", err)
	}
	r := &Rule{RuleConfig: c, filter: prog, annotations: map[string]*template.Template{}}
	for k, text := range c.Annotations {
		t, err := template.New(k).Option("missingkey=zero").Parse(text)
		if err != nil {
			return nil, fmt.Errorf("annotation %s: %w", k, err)
		}
		r.annotations[k] = t
	}
	return r, nil
}

// EventEnv is what filters and annotation templates see of an event.
type EventEnv = events.ExprEnv

// Matches evaluates the filter on env.
func (r *Rule) Matches(env *EventEnv) (bool, error) {
	out, err := expr.Run(r.filter, env)
	if err != nil {
		return false, fmt.Errorf("rule %s: filter: %w", r.Name, err)
	}
	b, _ := out.(bool)
	return b, nil
}

// Annotate renders the annotations with the event's fields as the template's dot:
// {{ .id }}, {{ .data.amount }} and so on.
func (r *Rule) Annotate(env *EventEnv) map[string]string {
	if len(r.annotations) == 0 {
		return nil
	}
	out := make(map[string]string, len(r.annotations))
	for k, t := range r.annotations {
		var buf bytes.Buffer
		if err := t.Execute(&buf, templateData(env)); err != nil {
			out[k] = fmt.Sprintf("<annotation %s failed: %v>", k, err)
			continue
		}
		out[k] = buf.String()
	}
	return out
}

func templateData(e *EventEnv) map[string]any {
	return map[string]any{
		"id": e.ID, "source": e.Source, "type": e.Type, "subject": e.Subject,
		"time": e.Time, "key": e.Key, "data": e.Data, "enrichment": e.Enrichment,
	}
}
