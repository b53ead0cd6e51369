package alert

import (
	"reflect"
	"testing"

	"github.com/expr-lang/expr/vm"
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
		fv, fk, ferr := rule.Group(nil, env)
		sv, sk, serr := slow.Group(nil, env)
		if !reflect.DeepEqual(fv, sv) || fk != sk || (ferr == nil) != (serr == nil) {
			t.Errorf("env %d: plain paths %q %q %v; expressions %q %q %v", i, fv, fk, ferr, sv, sk, serr)
		}
		fm, ferr := rule.Matches(nil, env)
		sm, serr := slow.Matches(nil, env)
		if fm != sm || (ferr == nil) != (serr == nil) {
			t.Errorf("env %d: filter %v %v; expression %v %v", i, fm, ferr, sm, serr)
		}
	}
}

// A filter that is a type check and-ed with more runs the rest alone after checking
// the type apart, on one reused machine: it gives what the whole expression gives,
// errors included.
func TestFilterBesideType(t *testing.T) {
	envs := []*EventEnv{
		{Type: "page.view", Data: map[string]any{"ms": 150.0, "user": "u1", "flag": true}},
		{Type: "page.view", Data: map[string]any{"ms": 50.0, "user": "u2", "flag": false}},
		{Type: "page.view", Data: map[string]any{"ms": "slow", "flag": "yes"}},
		{Type: "page.view", Data: map[string]any{}},
		{Type: "page.view", Data: []any{1.0}},
		{Type: "other", Data: map[string]any{"ms": 150.0, "user": "u1", "flag": true}},
		{Type: "page.view"},
		{Type: "page.view", Data: map[string]any{"ms": 100.0, "user": 5.0}, Source: "web"},
		{Type: "page.view", Data: map[string]any{"ms": nil, "user": nil}, Source: "app"},
		{Type: "page.view", Data: map[string]any{"ms": map[string]any{"x": 1.0}}, Enrichment: map[string]any{"user_plan": "pro"}},
	}
	var m vm.VM
	for _, filter := range []string{
		`type == "page.view" && data.ms > 100`,
		`data.ms > 100 && type == "page.view"`,
		`type == "page.view" and (data.user == "u1" || data.ms < 60)`,
		`type == "page.view" && data.flag`,
		`"page.view" == type && (data?.ms ?? 0) > 100`,
		`type == "page.view" && data.ms >= 100`,
		`type == "page.view" && data.ms < 100.5`,
		`type == "page.view" && data.ms <= 100`,
		`type == "page.view" && data.ms == 100`,
		`type == "page.view" && data.ms != 100`,
		`type == "page.view" && data.user == "u1"`,
		`type == "page.view" && data.user != "u1"`,
		`type == "page.view" && source == "web"`,
		`type == "page.view" && enrichment.user_plan == "pro"`,
		`type == "page.view" && data.ms.x > 0`,
	} {
		rule, err := compile(RuleConfig{Name: "r", Filter: filter})
		if err != nil {
			t.Fatal(err)
		}
		if rule.rest == nil {
			t.Fatalf("%s: the type check is not made apart", filter)
		}
		whole := *rule
		whole.onlyType, whole.rest, whole.cmp = "", nil, nil
		matchLikeExpr(t, &m, rule, &whole, envs)
	}
	for _, filter := range []string{
		`data.ms > 100`, `data.user == "u1"`, `source != "web"`, `data.ms > 100.5`,
	} {
		rule, err := compile(RuleConfig{Name: "r", Filter: filter})
		if err != nil {
			t.Fatal(err)
		}
		if rule.cmp == nil {
			t.Fatalf("%s: not read as a comparison", filter)
		}
		whole := *rule
		whole.cmp = nil
		matchLikeExpr(t, &m, rule, &whole, envs)
	}
	for _, filter := range []string{`type == "a" || data.ms > 1`, `type == "a" && data.ms > 1 && data.ms < 5`} {
		rule, err := compile(RuleConfig{Name: "r", Filter: filter})
		if err != nil {
			t.Fatal(err)
		}
		if rule.rest != nil {
			t.Errorf("%s: split, but the type check is not a term of the top-level and", filter)
		}
	}
}

// matchLikeExpr checks that rule's filter, run on m, gives on every env what the
// whole expression gives (whole: rule with the shortcuts taken out), errors included.
func matchLikeExpr(t *testing.T, m *vm.VM, rule, whole *Rule, envs []*EventEnv) {
	t.Helper()
	for i, env := range envs {
		got, gerr := rule.Matches(m, env)
		want, werr := whole.Matches(nil, env)
		if got != want || (gerr == nil) != (werr == nil) {
			t.Errorf("%s, env %d: %v %v; the whole expression %v %v", rule.Filter, i, got, gerr, want, werr)
		}
	}
}
