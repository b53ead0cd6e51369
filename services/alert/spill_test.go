package alert

import (
	"slices"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
)

// A group on disk that cannot fire on its own is deleted only once its last event
// has left the windows to come: a later event of it still counts with the earlier
// ones (u1's third event fires the rule with all three; u3's event sends u1 to
// disk before the windows ending at 6 and 8 are evaluated).
func TestSpillKeepsGroupsForTheirWindows(t *testing.T) {
	rules := mustRules(t, RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: 2 * time.Second, Op: ">", Threshold: 2, AllowedLateness: time.Millisecond})
	var envs []*EventEnv
	for _, x := range slices.Concat(logins("u1", 0.5, 0.6), logins("u3", 5), logins("u2", 8.5), logins("u1", 9), logins("u2", 10.5, 30)) {
		envs = append(envs, env(x))
	}
	memory := NewEngine(rules, nil)
	var fired []*alerts.Alert
	for _, e := range envs {
		out, _ := memory.Observe(e)
		fired = append(fired, out...)
	}
	if got := show(fired, "user"); !slices.Equal(got, []string{"firing u1 10", "resolved u1 10-12"}) {
		t.Fatalf("in memory: %q; the test shows nothing", got)
	}
	checkSpill(t, rules, envs)
}

// Removing a rule resolves its firing alerts, those of groups on disk too, in
// key order, and deletes its groups on disk.
func TestSpillSetRulesResolvesGroupsOnDisk(t *testing.T) {
	cfg := RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: 2 * time.Second, Op: ">", Threshold: 1, AllowedLateness: time.Millisecond}
	rules := mustRules(t, cfg)
	s, err := OpenSpill(SpillOptions{Dir: t.TempDir(), HotGroups: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	e := NewEngine(rules, nil)
	e.SpillTo(s)
	out := feed(t, e, slices.Concat(logins("u3", 1, 1.5), logins("u1", 1, 1.5), logins("u2", 1, 1.5), logins("u4", 3.5)))
	if got := slices.Sorted(slices.Values(show(out, "user"))); !slices.Equal(got, []string{"firing u1 2", "firing u2 2", "firing u3 2"}) {
		t.Fatalf("before: %q", got)
	}
	rs := e.State().Rules["count"]
	if rs.cold == nil || rs.cold.n < 3 {
		t.Fatalf("want the firing groups on disk, %d in memory", len(rs.Groups))
	}
	cfg.Threshold = 5
	out = e.SetRules(mustRules(t, cfg))
	if got := show(out, "user"); !slices.Equal(got, []string{"resolved u1 2-3.5", "resolved u2 2-3.5", "resolved u3 2-3.5"}) {
		t.Fatalf("changing the rule resolves %q", got)
	}
	if rs := e.State().Rules["count"]; rs.size() != 0 {
		t.Fatalf("the changed rule starts with %d groups", rs.size())
	}
	n := 0
	it, err := s.db.NewIter(nil)
	if err != nil {
		t.Fatal(err)
	}
	for it.First(); it.Valid(); it.Next() {
		n++
	}
	if err := it.Close(); err != nil {
		t.Fatal(err)
	}
	if n != 0 || e.Err() != nil {
		t.Fatalf("%d keys left on disk (err %v)", n, e.Err())
	}
}
