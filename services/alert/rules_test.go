package alert

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/configfile"
)

func TestLoadRulesGood(t *testing.T) {
	f, err := configfile.Load("testdata/rules.good.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rules, err := LoadRules(f)
	if err != nil {
		t.Fatal(err)
	}
	if len(rules) != 5 || rules[1].Kind != KindMatch || rules[1].Severity != "warning" || rules[2].Step != 6*time.Second ||
		rules[3].Change != "percent" || rules[4].AllowedLateness != time.Minute {
		t.Fatalf("rules = %+v", rules)
	}
}

// Each rule that does not compile is reported by position and name; the rest load.
func TestLoadRulesBad(t *testing.T) {
	f, err := configfile.Load("testdata/rules.bad.yaml")
	if err != nil {
		t.Fatal(err)
	}
	rules, err := LoadRules(f)
	if len(rules) != 1 || rules[0].Name != "fine" {
		t.Fatalf("loaded %d rules, want only the first 'fine'", len(rules))
	}
	var re *RuleError
	if !errors.As(err, &re) {
		t.Fatalf("err = %v, want *RuleError", err)
	}
	for _, want := range []string{
		`rule 2 ("broken-filter"): filter:`,
		`rule 3 ("unknown-field"): filter: unknown name tpye`,
		`rule 4 ("not-bool"): filter:`,
		`rule 5 ("windowed"): window is required`,
		`rule 6 ("fine"): another rule has this name`,
		`rule 7 ("bad-op"): op "=>"`,
		`rule 8 ("sum-without-value"): aggregate sum needs value`,
		`rule 9 ("uneven-step"): step 7s must divide window 1m0s`,
		`rule 10 ("silent-forever"): for is required`,
		`rule 11 ("odd-kind"): kind "sometimes"`,
		`rule 12 ("too-late"): allowed_lateness 2h0m0s is more than 1000 steps of 1s`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

func TestMatch(t *testing.T) {
	rules, err := CompileRules([]RuleConfig{{
		Name: "big", Filter: `type == "order.created" && data.amount > 1000`, Severity: "critical",
		Labels: map[string]string{"team": "shop"}, Annotations: map[string]string{"summary": "order {{ .data.order_id }}"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	ev := func(typ, data string) *events.Event {
		return &events.Event{ID: "1", Source: "s", Type: typ, Key: "k-" + data, Time: time.Unix(1_800_000_000, 0), Data: json.RawMessage(data)}
	}
	tests := []struct {
		name  string
		event *events.Event
		fires bool
	}{
		{"matches", ev("order.created", `{"order_id":"o1","amount":5000}`), true},
		{"below the threshold", ev("order.created", `{"order_id":"o1","amount":10}`), false},
		{"other type", ev("order.paid", `{"amount":5000}`), false},
		{"field missing: no match, no error", ev("order.created", `{"order_id":"o1"}`), false},
		{"wrong type: no match", ev("order.created", `{"amount":"lots"}`), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, _ := NewEngine(rules, nil).Observe(Env(tt.event))
			if (len(got) == 1) != tt.fires {
				t.Fatalf("fired %d alerts, want fires=%v", len(got), tt.fires)
			}
			if !tt.fires {
				return
			}
			a := got[0]
			if a.Rule != "big" || a.Status != "firing" || a.Labels["team"] != "shop" || a.Labels["alertname"] != "big" ||
				a.Annotations["summary"] != "order o1" || a.EventKey != tt.event.Key || !a.StartsAt.Equal(tt.event.Time) || a.Subject() != "alerts.big.critical" {
				t.Fatalf("alert = %+v", a)
			}
		})
	}
}

// Filters that require one event type skip other events without running.
func TestRequiredType(t *testing.T) {
	tests := map[string]string{
		`type == "login.failed"`:                 "login.failed",
		`"a" == type && data.x > 1`:              "a",
		`data.x > 1 and type == "b"`:             "b",
		`type == "a" || type == "b"`:             "",
		`type != "a"`:                            "",
		`source == "a"`:                          "",
		`type == "a" && (data.y == 1 || data.z)`: "a",
		`not (type == "a")`:                      "",
	}
	for filter, want := range tests {
		rules, err := CompileRules([]RuleConfig{{Name: "r", Filter: filter}})
		if err != nil {
			t.Fatalf("%s: %v", filter, err)
		}
		if rules[0].onlyType != want {
			t.Errorf("%s: onlyType %q, want %q", filter, rules[0].onlyType, want)
		}
	}
}
