package alert

import (
	"reflect"
	"testing"
)

// group_by read as a plain path gives what the expression gives, for every shape of
// data, and the filter that is only a type check gives what the expression gives.
func TestPlainPathsAsExpressions(t *testing.T) {
	rule, err := compile(RuleConfig{Name: "r", Filter: `type == "page.view"`,
		GroupBy: []string{"data.user", "data.a.b", "source", "enrichment.user_plan", "data.n", "key"}})
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range rule.groupPaths {
		if p == nil {
			t.Fatalf("group_by %s is not read as a plain path", rule.GroupBy[i])
		}
	}
	if !rule.typeOnly {
		t.Fatal("the filter is only a type check")
	}
	slow := *rule
	slow.groupPaths = make([][]string, len(rule.groupPaths))
	slow.typeOnly = false
	envs := []*EventEnv{
		{Type: "page.view", Source: "web", Key: "k", Data: map[string]any{"user": "u1", "a": map[string]any{"b": 2.5}, "n": 7.0}},
		{Type: "page.view", Data: map[string]any{"user": nil, "a": "not an object"}, Enrichment: map[string]any{"user_plan": "pro"}},
		{Type: "page.view", Data: map[string]any{}},
		{Type: "other", Data: []any{1.0}},
		{Type: "page.view"},
	}
	for i, env := range envs {
		fv, fk, ferr := rule.Group(env)
		sv, sk, serr := slow.Group(env)
		if !reflect.DeepEqual(fv, sv) || fk != sk || (ferr == nil) != (serr == nil) {
			t.Errorf("env %d: plain paths %q %q %v; expressions %q %q %v", i, fv, fk, ferr, sv, sk, serr)
		}
		fm, ferr := rule.Matches(env)
		sm, serr := slow.Matches(env)
		if fm != sm || (ferr == nil) != (serr == nil) {
			t.Errorf("env %d: filter %v %v; expression %v %v", i, fm, ferr, sm, serr)
		}
	}
}
