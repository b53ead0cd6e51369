package notify

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
)

var now0 = time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)

func testReceivers(t *testing.T, cfgs ...ReceiverConfig) []*Receiver {
	t.Helper()
	var out []*Receiver
	for _, c := range cfgs {
		if c.URL == "" {
			c.URL = "https://hooks.example.com/" + c.Name
		}
		if c.SecretEnv == nil && c.Format != FormatSlack {
			c.SecretEnv = []string{"S"}
		}
		r, err := NewReceiver(c, func(string) (string, bool) { return "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", true })
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

func alert(rule, status string, startSec int, labels ...string) *alerts.Alert {
	l := map[string]string{"alertname": rule, "severity": "warning"}
	for i := 0; i+1 < len(labels); i += 2 {
		l[labels[i]] = labels[i+1]
	}
	a := &alerts.Alert{Rule: rule, Status: status, Severity: l["severity"], Labels: l, StartsAt: now0.Add(time.Duration(startSec) * time.Second)}
	a.Fingerprint = alerts.Fingerprint(rule, l)
	if status == alerts.Resolved {
		a.EndsAt = a.StartsAt.Add(time.Minute)
	}
	return a
}

// step is one thing that happens to a router in a table test: at sec, an alert
// arrives (a != nil) or the router is flushed.
type step struct {
	sec float64
	a   *alerts.Alert
}

// run plays steps and returns what was sent, as "sec receiver: fingerprints".
func run(t *testing.T, r *Router, silences []Silence, steps []step) []string {
	t.Helper()
	var sent []string
	for _, s := range steps {
		now := now0.Add(time.Duration(s.sec * float64(time.Second)))
		if s.a != nil {
			r.Add(s.a, now)
			continue
		}
		out, _, _ := r.Flush(now, silences)
		// Groups flush in the order of their keys (hashes): sort by receiver, then
		// by alerts, so tests read in a fixed order.
		slices.SortStableFunc(out, func(a, b Outgoing) int {
			return strings.Compare(a.Notification.Alerts[0].Labels["user"], b.Notification.Alerts[0].Labels["user"])
		})
		for _, o := range out {
			var parts []string
			for _, a := range o.Notification.Alerts {
				parts = append(parts, a.Labels["user"]+"="+a.Status)
			}
			sent = append(sent, fmt.Sprintf("%g %s: %s", s.sec, o.Receiver.Name, strings.Join(parts, " ")))
		}
	}
	return sent
}

func flushAt(secs ...float64) []step {
	var out []step
	for _, s := range secs {
		out = append(out, step{sec: s})
	}
	return out
}

func TestRouterTimers(t *testing.T) {
	route := RouteConfig{Receivers: []string{"hook"}, GroupBy: []string{"alertname"}, GroupWait: 10 * time.Second,
		GroupInterval: time.Minute, RepeatInterval: time.Hour}
	tests := []struct {
		name  string
		route RouteConfig
		steps []step
		want  []string
	}{
		{"group_wait gathers a burst into one notification", route,
			append([]step{{0, alert("logins", "firing", 0, "user", "a")}, {3, alert("logins", "firing", 0, "user", "b")}},
				flushAt(5, 9.9, 10, 11)...),
			[]string{"10 hook: a=firing b=firing"}},
		{"a change waits for group_interval after the last notification", route,
			append([]step{{0, alert("logins", "firing", 0, "user", "a")}, {10, nil}, {20, alert("logins", "firing", 20, "user", "b")}},
				flushAt(30, 69, 70)...),
			[]string{"10 hook: a=firing", "70 hook: a=firing b=firing"}},
		{"a resolution is sent once, then the alert leaves the group", route,
			append([]step{{0, alert("logins", "firing", 0, "user", "a")}, {10, nil}, {20, alert("logins", "resolved", 0, "user", "a")}},
				flushAt(70, 200, 4000)...),
			[]string{"10 hook: a=firing", "70 hook: a=resolved"}},
		{"repeat_interval repeats a group still firing", route,
			append([]step{{0, alert("logins", "firing", 0, "user", "a")}}, flushAt(10, 100, 3609, 3610, 3700, 7210)...),
			[]string{"10 hook: a=firing", "3610 hook: a=firing", "7210 hook: a=firing"}},
		{"the same alert again (a redelivery) changes nothing", route,
			append([]step{{0, alert("logins", "firing", 0, "user", "a")}, {10, nil}, {20, alert("logins", "firing", 0, "user", "a")}},
				flushAt(80, 200)...),
			[]string{"10 hook: a=firing"}},
		{"a resolution of an alert never held is dropped", route,
			append([]step{{0, alert("logins", "resolved", 0, "user", "a")}}, flushAt(10, 100)...), nil},
		{"group_by all labels: each alert its own group",
			RouteConfig{Receivers: []string{"hook"}, GroupBy: []string{"..."}},
			append([]step{{0, alert("logins", "firing", 0, "user", "a")}, {0, alert("logins", "firing", 0, "user", "b")}}, flushAt(0)...),
			[]string{"0 hook: a=firing", "0 hook: b=firing"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			routes, err := NewRoutes([]RouteConfig{tt.route}, testReceivers(t, ReceiverConfig{Name: "hook"}))
			if err != nil {
				t.Fatal(err)
			}
			got := run(t, NewRouter(routes, nil, nil), nil, tt.steps)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got  %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestRouterMatchingAndMuting(t *testing.T) {
	receivers := testReceivers(t, ReceiverConfig{Name: "shop"}, ReceiverConfig{Name: "all"},
		ReceiverConfig{Name: "quiet", SendResolved: new(bool)}, ReceiverConfig{Name: "replays", SendReplayed: true})
	byUser := []string{"user"}
	tests := []struct {
		name     string
		routes   []RouteConfig
		inhibit  []InhibitConfig
		silences []Silence
		steps    []step
		want     []string
	}{
		{"first matching route wins; continue lets the next one match too",
			[]RouteConfig{
				{Receivers: []string{"shop"}, Matchers: []string{"team=shop"}, GroupBy: byUser, Continue: true},
				{Receivers: []string{"all"}, Matchers: []string{`team=~"shop|pay"`}, GroupBy: byUser},
				{Receivers: []string{"quiet"}, GroupBy: byUser},
			}, nil, nil,
			[]step{{0, alert("r", "firing", 0, "user", "a", "team", "shop")}, {0, alert("r", "firing", 0, "user", "b", "team", "pay")},
				{0, alert("r", "firing", 0, "user", "c", "team", "ops")}, {1, nil}},
			[]string{"1 shop: a=firing", "1 all: a=firing", "1 all: b=firing", "1 quiet: c=firing"}},
		{"send_resolved: false leaves resolutions out",
			[]RouteConfig{{Receivers: []string{"quiet", "all"}, GroupBy: byUser}}, nil, nil,
			[]step{{0, alert("r", "firing", 0, "user", "a")}, {1, nil}, {2, alert("r", "resolved", 0, "user", "a")}, {3, nil}},
			[]string{"1 quiet: a=firing", "1 all: a=firing", "3 all: a=resolved"}},
		{"a silence mutes what it matches while active",
			[]RouteConfig{{Receivers: []string{"all"}, GroupBy: byUser}}, nil,
			[]Silence{{Matchers: []string{"user=a"}, StartsAt: now0, EndsAt: now0.Add(10 * time.Second)}},
			[]step{{0, alert("r", "firing", 0, "user", "a")}, {0, alert("r", "firing", 0, "user", "b")}, {1, nil}, {5, nil}, {11, nil}},
			[]string{"1 all: b=firing", "11 all: a=firing"}},
		{"a critical alert inhibits the warnings with the same user",
			[]RouteConfig{{Receivers: []string{"all"}, GroupBy: []string{"..."}}},
			[]InhibitConfig{{Source: []string{"severity=critical"}, Target: []string{"severity=warning"}, Equal: []string{"user"}}}, nil,
			[]step{{0, alert("r", "firing", 0, "user", "a", "severity", "critical")}, {0, alert("w", "firing", 0, "user", "a")},
				{0, alert("w", "firing", 0, "user", "b")}, {1, nil}},
			[]string{"1 all: a=firing", "1 all: b=firing"}},
		{"replayed alerts reach only receivers that asked",
			[]RouteConfig{{Receivers: []string{"all", "replays"}, GroupBy: byUser}}, nil, nil,
			[]step{{0, func() *alerts.Alert { a := alert("r", "firing", 0, "user", "a"); a.Replay = true; return a }()}, {1, nil}},
			[]string{"1 replays: a=firing"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			routes, err := NewRoutes(tt.routes, receivers)
			if err != nil {
				t.Fatal(err)
			}
			inhibit, err := newInhibit(tt.inhibit)
			if err != nil {
				t.Fatal(err)
			}
			for i := range tt.silences {
				if err := tt.silences[i].check(); err != nil {
					t.Fatal(err)
				}
			}
			got := run(t, NewRouter(routes, inhibit, nil), tt.silences, tt.steps)
			if !slices.Equal(got, tt.want) {
				t.Fatalf("got  %q\nwant %q", got, tt.want)
			}
		})
	}
}

// A router rebuilt from the saved groups carries on: no notification twice.
func TestRouterRestoredGroups(t *testing.T) {
	routes, err := NewRoutes([]RouteConfig{{Receivers: []string{"hook"}, GroupBy: []string{"alertname"}, GroupInterval: time.Minute}},
		testReceivers(t, ReceiverConfig{Name: "hook"}))
	if err != nil {
		t.Fatal(err)
	}
	r := NewRouter(routes, nil, nil)
	got := run(t, r, nil, []step{{0, alert("logins", "firing", 0, "user", "a")}, {1, nil}})
	r2 := NewRouter(routes, nil, r.Groups())
	got = append(got, run(t, r2, nil, []step{{2, alert("logins", "firing", 0, "user", "a")}, {100, nil}, {120, alert("logins", "resolved", 0, "user", "a")}, {200, nil}})...)
	want := []string{"1 hook: a=firing", "200 hook: a=resolved"}
	if !slices.Equal(got, want) {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestMatchers(t *testing.T) {
	labels := map[string]string{"team": "shop", "severity": "critical"}
	tests := []struct {
		in      string
		matches bool
		err     string
	}{
		{"team=shop", true, ""},
		{`team="shop"`, true, ""},
		{"team!=shop", false, ""},
		{`severity=~"crit.*"`, true, ""},
		{`severity=~"crit"`, false, ""}, // anchored
		{`severity!~"warning|info"`, true, ""},
		{"missing=", true, ""},
		{"team", false, "want name=value"},
		{"=shop", false, "want name=value"},
		{"9team=x", false, "want name=value"},
		{`team=~"("`, false, "missing closing"},
	}
	for _, tt := range tests {
		m, err := ParseMatcher(tt.in)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%q: err = %v, want %q", tt.in, err, tt.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tt.in, err)
			continue
		}
		if m.Matches(labels) != tt.matches {
			t.Errorf("%q matches = %v, want %v", tt.in, !tt.matches, tt.matches)
		}
	}
}

func TestRouteErrors(t *testing.T) {
	receivers := testReceivers(t, ReceiverConfig{Name: "hook"})
	_, err := NewRoutes([]RouteConfig{{Receivers: []string{"nope"}}, {Receivers: []string{"hook"}, Matchers: []string{"x"}}, {}}, receivers)
	for _, want := range []string{`route 1: no receiver is named "nope"`, `route 2: matcher "x"`, "route 3: receivers is required"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("err = %v, want %q", err, want)
		}
	}
}

// Firing counts each alert firing once, however many routes' groups hold it.
func TestRouterFiring(t *testing.T) {
	routes, err := NewRoutes([]RouteConfig{
		{Receivers: []string{"hook"}, GroupBy: []string{"alertname"}, Continue: true},
		{Receivers: []string{"hook"}, GroupBy: []string{"..."}},
	}, testReceivers(t, ReceiverConfig{Name: "hook"}))
	if err != nil {
		t.Fatal(err)
	}
	r := NewRouter(routes, nil, nil)
	now := time.Unix(1_700_000_000, 0)
	r.Add(alert("logins", "firing", 0, "user", "a"), now)
	r.Add(alert("logins", "firing", 0, "user", "b"), now)
	if got := r.Firing(); got != 2 {
		t.Fatalf("two alerts firing in two routes: Firing() = %d, want 2", got)
	}
	r.Add(alert("logins", "resolved", 0, "user", "a"), now)
	if got := r.Firing(); got != 1 {
		t.Fatalf("one resolved: Firing() = %d, want 1", got)
	}
}
