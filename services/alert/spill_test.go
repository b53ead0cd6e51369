package alert

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/services/kit/pebblelog/pebbletest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/testlog"
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

// The groups' disk full (a 4 MiB tmpfs, filled): Pebble's flush fails and is
// retried, the error is logged, and writes, so the engine, wait once the
// memtables are full; nothing fails and nothing is lost. When space returns the
// engine goes on, and its alerts are those of the engine with every group in
// memory.
func TestSpillDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts a tmpfs: run it as root (CI does)")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=4m"); err != nil {
		t.Fatalf("mount a tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	rules := mustRules(t, RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: time.Second, Op: ">", Threshold: 2, AllowedLateness: time.Millisecond})
	const n = 40_000
	var envs []*EventEnv
	for i := range n {
		// Users 0–999 come back every thousand events; the rule fires for those with
		// three events in a window.
		envs = append(envs, env(in{"login.failed", float64(i) / 1000, fmt.Sprintf(`{"user":"u%d"}`, i%1000+i/3000*1000)}))
	}
	memory := NewEngine(rules, nil)
	var want []string
	for _, e := range envs {
		out, _ := memory.Observe(e)
		want = append(want, alertsJSON(t, out)...)
	}
	if len(want) == 0 {
		t.Fatal("the rule never fired; the test shows nothing")
	}

	var logged testlog.Buffer
	s, err := OpenSpill(SpillOptions{Dir: dir, HotGroups: 10, MemTableBytes: 256 << 10, CacheBytes: 1 << 20,
		Logger: slog.New(slog.NewTextHandler(&logged, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	filler := filepath.Join(dir, "filler")
	fill(t, filler)
	e := NewEngine(rules, nil)
	e.SpillTo(s)
	var observed atomic.Int64
	var got []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		for _, env := range envs {
			out, _ := e.Observe(env)
			got = append(got, alertsJSON(t, out)...)
			observed.Add(1)
		}
	}()
	poll.Until(t, time.Minute, func() error {
		if !strings.Contains(logged.String(), "the alert groups on disk cannot be written") {
			return fmt.Errorf("no disk error logged; %d events observed", observed.Load())
		}
		return nil
	})
	if observed.Load() == n {
		t.Fatal("every event was observed on a full disk; the test shows nothing")
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 2*time.Minute, func() error {
		select {
		case <-done:
			return nil
		default:
			return fmt.Errorf("%d of %d events observed since space returned", observed.Load(), n)
		}
	})
	if err := e.Err(); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, want) {
		t.Fatalf("after a full disk the alerts differ from those in memory:\n%s\n%s", got, want)
	}
}

// fill writes path until its file system is full.
func fill(t *testing.T, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return
		}
	}
}

// A corrupt file of the groups on disk (bytes of a table flipped) fails the engine
// (Err names the file) instead of ending the process (Pebble's default).
func TestSpillCorruptFile(t *testing.T) {
	rules := mustRules(t, RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: time.Second, Op: ">", Threshold: 2, AllowedLateness: time.Millisecond})
	s, err := OpenSpill(SpillOptions{Dir: t.TempDir(), HotGroups: 1, CacheBytes: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	e := NewEngine(rules, nil)
	e.SpillTo(s)
	user := func(i int) *EventEnv {
		return env(in{"login.failed", float64(i) / 1000, fmt.Sprintf(`{"user":"u%d"}`, i%500)})
	}
	for i := range 2000 {
		e.Observe(user(i))
	}
	if err := s.db.Flush(); err != nil {
		t.Fatal(err)
	}
	pebbletest.CorruptTables(t, s.dir)
	for i := 2000; i < 4000 && e.Err() == nil; i++ {
		e.Observe(user(i))
	}
	if err := e.Err(); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("after a table was corrupted: %v, want an error naming the corruption", err)
	}
}
