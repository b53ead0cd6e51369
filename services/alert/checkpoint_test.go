package alert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/partition"
)

// dirFiles keeps checkpoint files in a directory, for the engine's own tests (the
// stages keep them in a NATS object store: partition.Files).
type dirFiles struct{ dir string }

func copyFile(from, to string) error {
	r, err := os.Open(from)
	if err != nil {
		return err
	}
	defer r.Close()
	w, err := os.Create(to)
	if err != nil {
		return err
	}
	_, err = io.Copy(w, r)
	return errors.Join(err, w.Close())
}

func (d dirFiles) Upload(_ context.Context, dir string, names []string) ([]partition.File, error) {
	out := make([]partition.File, len(names))
	for i, name := range names {
		if _, err := os.Stat(filepath.Join(d.dir, name)); err != nil {
			if err := copyFile(filepath.Join(dir, name), filepath.Join(d.dir, name)); err != nil {
				return nil, err
			}
		}
		out[i] = partition.File{Name: name, Object: name}
	}
	return out, nil
}

func (d dirFiles) Restore(_ context.Context, files []partition.File, dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, f := range files {
		if err := copyFile(filepath.Join(d.dir, f.Object), filepath.Join(dir, f.Name)); err != nil {
			return err
		}
	}
	return nil
}

func (dirFiles) Keep(context.Context, []partition.File) {}

func (dirFiles) Continues() bool { return true }

// checkCheckpoints fails t unless an engine restarted from its checkpoints gives
// the alerts (values and annotations too) of an uninterrupted run: about 24
// checkpoints are captured (so compactions run: deltas merged, bases rewritten),
// and the run restarts twice from a checkpoint taken some events
// before it stopped (the events since then read again, as a stage does), with
// the groups in memory and with all but two on disk. Each checkpoint is uploaded
// after the next event changed the engine (a saver uploads while the engine runs
// on), and every fifth is given up without an upload (the next one's names its
// segment too). Captures are made in steps (Begin, Step, End) across up to two
// more events, which change the groups the capture holds before they are encoded:
// what is restored is the state at Begin.
func checkCheckpoints(t *testing.T, rules []*Rule, envs []*EventEnv) {
	t.Helper()
	ctx := context.Background()
	log := slog.New(slog.DiscardHandler)
	memory := func() []string {
		e := NewEngine(rules, nil)
		var out []string
		for _, env := range envs {
			got, _ := e.Observe(env)
			out = append(out, alertsJSON(t, got)...)
		}
		return append(out, alertsJSON(t, e.Idle(time.Hour))...)
	}()
	// The third: at most one changed group noted between two captures (past it, the
	// rule is written whole).
	for run, s := range []Settings{{Store: StoreMemory}, {Store: StoreDisk, HotGroups: 2}, {Store: StoreMemory}} {
		store := dirFiles{t.TempDir()}
		groups := t.TempDir()
		open := func(list []Segment) (*Checkpoints, *Engine) {
			cp := NewCheckpoints(store, filepath.Join(t.TempDir(), "segments"), log)
			e, err := cp.Open(ctx, s, rules, list, nil, nil, groups)
			if err != nil {
				t.Fatal(err)
			}
			if run == 2 {
				e.maxDirty = 1
				for _, rs := range e.states {
					if rs != nil {
						rs.maxDirty = 1
					}
				}
			}
			return cp, e
		}
		cp, e := open(nil)
		// saved[i] is the checkpoint of the state after envs[:i]; outs[i] the alerts
		// of envs[i].
		saved := map[int][]Segment{0: nil}
		every := max(2, len(envs)/24)
		var outs [][]string
		// Restarts: at a third and two thirds of the run, from the checkpoint two
		// captures before (or the start).
		stops := map[int]bool{len(envs) / 3: true, 2 * len(envs) / 3: true}
		// pending is a capture not uploaded yet, after envs[:pendingAt], its state
		// then pendingState.
		var pending *Capture
		var pendingAt, captures int
		var pendingState map[string]string
		// begun is a capture begun after envs[:begunAt] and not ended, its state
		// then begunState; it ends lag events later.
		var begun *Pending
		var begunAt, lag int
		var begunState map[string]string
		for i := 0; i < len(envs); i++ {
			if stops[i] {
				delete(stops, i)
				from := max(0, i-2*every)
				for ; saved[from] == nil && from > 0; from-- {
				}
				if err := e.Close(); err != nil {
					t.Fatal(err)
				}
				cp, e = open(saved[from])
				outs, i, pending, begun = outs[:from], from, nil, nil
			}
			got, _ := e.Observe(envs[i])
			outs = append(outs, alertsJSON(t, got))
			if pending != nil {
				list, err := pending.Upload(ctx)
				if err != nil {
					t.Fatal(err)
				}
				pending.Saved(ctx)
				saved[pendingAt] = list
				if s.Store == StoreMemory {
					// The state restored is the state captured, not the engine's since.
					_, restored := open(list)
					if got := dumpState(t, restored); !maps.Equal(got, pendingState) {
						t.Fatalf("the state restored from a checkpoint after %d events differs from the one captured:\n%v\n%v", pendingAt, got, pendingState)
					}
				}
				pending = nil
			}
			// end ends the capture begun; every fifth is given up.
			end := func() {
				c, err := begun.End()
				if err != nil {
					t.Fatal(err)
				}
				begun = nil
				if captures++; captures%5 != 2 {
					pending, pendingAt, pendingState = c, begunAt, begunState
				}
			}
			if begun != nil {
				if i < begunAt-1+lag {
					begun.Step(1)
				} else {
					end()
				}
			}
			if i%every == every-1 && begun == nil && pending == nil {
				var err error
				if begun, err = cp.Begin(e); err != nil {
					t.Fatal(err)
				}
				begunAt, lag = i+1, captures%3
				if s.Store == StoreMemory {
					begunState = dumpState(t, e)
				}
				if lag == 0 {
					end()
				}
			}
		}
		got := slices.Concat(outs...)
		got = append(got, alertsJSON(t, e.Idle(time.Hour))...)
		if err := errors.Join(e.Err(), e.Close()); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, memory) {
			t.Fatalf("restarts from checkpoints (%s store) give other alerts:\n%s\n%s", s.Store, got, memory)
		}
	}
}

// dumpState is e's state: each rule's fields and each group's encoding, whether
// in memory or on disk.
func dumpState(t *testing.T, e *Engine) map[string]string {
	t.Helper()
	out := map[string]string{"": fmt.Sprint(e.st.MaxTime.UnixNano(), e.st.Partitions)}
	for name, rs := range e.st.Rules {
		out[name] = fmt.Sprint(rs.Version, rs.Evaluated, rs.First, rs.HasFirst)
		// A group as its encoding holds it (its labels in order).
		group := func(rec []byte) string {
			d := &decoder{b: rec}
			g := d.group()
			if d.err != nil {
				t.Fatal(d.err)
			}
			return fmt.Sprint(g.Labels, g.Latest, g.LastSeen, g.FiringSince, g.Buckets)
		}
		for key, g := range rs.Groups {
			out[name+"\x00"+key] = group(appendGroup(nil, g))
		}
		if rs.cold != nil {
			if err := rs.cold.each(func(key string, rec []byte) error {
				out[name+"\x00"+key] = group(rec)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
	}
	return out
}

// failingFiles fails uploads while fail is set.
type failingFiles struct {
	dirFiles
	fail *bool
}

func (f failingFiles) Upload(ctx context.Context, dir string, names []string) ([]partition.File, error) {
	if *f.fail {
		return nil, errors.New("the object store is away")
	}
	return f.dirFiles.Upload(ctx, dir, names)
}

// checkpointer is a test's Checkpoints over a directory of files, and a capture,
// upload and save in one step.
type checkpointer struct {
	t     *testing.T
	files SegmentFiles
	log   *slog.Logger
}

func newCheckpointer(t *testing.T) *checkpointer {
	return &checkpointer{t: t, files: dirFiles{t.TempDir()}, log: slog.New(slog.DiscardHandler)}
}

func (c *checkpointer) open(rules []*Rule, list []Segment) (*Checkpoints, *Engine) {
	c.t.Helper()
	cp := NewCheckpoints(c.files, filepath.Join(c.t.TempDir(), "segments"), c.log)
	e, err := cp.Open(context.Background(), DefaultSettings(), rules, list, nil, nil, "")
	if err != nil {
		c.t.Fatal(err)
	}
	return cp, e
}

func (c *checkpointer) save(cp *Checkpoints, e *Engine) ([]Segment, error) {
	c.t.Helper()
	ctx := context.Background()
	capture, err := cp.Capture(e)
	if err != nil {
		c.t.Fatal(err)
	}
	list, err := capture.Upload(ctx)
	if err != nil {
		return nil, err
	}
	capture.Saved(ctx)
	return list, nil
}

// checkRestored fails t unless the engine restored from list has e's state.
func (c *checkpointer) checkRestored(rules []*Rule, list []Segment, e *Engine) {
	c.t.Helper()
	_, restored := c.open(rules, list)
	if got, want := dumpState(c.t, restored), dumpState(c.t, e); !maps.Equal(got, want) {
		c.t.Fatalf("the state restored differs from the one captured:\n%v\n%v", got, want)
	}
}

// A rule removed, then back as it was, starts with no groups: the groups of its
// earlier state in older segments do not come back with it, also once the deltas
// between are merged into one.
func TestCheckpointRuleRemovedAndBack(t *testing.T) {
	count := RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: time.Second, Op: ">", Threshold: 100}
	other := RuleConfig{Name: "other", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: time.Second, Op: ">", Threshold: 50}
	both, rest := mustRules(t, count, other), mustRules(t, other)
	c := newCheckpointer(t)
	cp, e := c.open(both, nil)
	// Many groups in the base, so that the deltas stay smaller than half of it.
	for u := range 200 {
		feed(t, e, logins(fmt.Sprint("u", u), 0.5))
	}
	feed(t, e, slices.Concat(logins("a", 1, 2), logins("b", 3)))
	list, err := c.save(cp, e) // the base: count has a, b and the us
	if err != nil {
		t.Fatal(err)
	}
	e.SetRules(rest)
	feed(t, e, logins("c", 4))
	if list, err = c.save(cp, e); err != nil {
		t.Fatal(err)
	}
	e.SetRules(both)
	feed(t, e, logins("d", 5))
	for i := range maxDeltas + 2 {
		feed(t, e, logins("e", 5+float64(i)/10))
		if list, err = c.save(cp, e); err != nil {
			t.Fatal(err)
		}
	}
	if len(list) > maxDeltas || !strings.HasSuffix(list[0].File.Name, "-1.alert") {
		t.Fatalf("want the first base and the deltas merged, got %+v", list)
	}
	if groups := slices.Sorted(maps.Keys(e.State().Rules["count"].Groups)); !slices.Equal(groups, []string{"d", "e"}) || len(e.State().Rules["other"].Groups) != 205 {
		t.Fatalf("count's groups are %q", groups)
	}
	c.checkRestored(both, list, e)
	// Removed and back between two captures.
	e.SetRules(rest)
	e.SetRules(both)
	feed(t, e, logins("f", 7))
	if list, err = c.save(cp, e); err != nil {
		t.Fatal(err)
	}
	if groups := slices.Sorted(maps.Keys(e.State().Rules["count"].Groups)); !slices.Equal(groups, []string{"f"}) {
		t.Fatalf("count's groups are %q", groups)
	}
	c.checkRestored(both, list, e)
}

// A checkpoint whose upload failed stays in the next: the changes it captured are
// restored from the next save.
func TestCheckpointAfterAFailedSave(t *testing.T) {
	rules := mustRules(t, RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: time.Second, Op: ">", Threshold: 2, AllowedLateness: time.Millisecond})
	fail := false
	c := newCheckpointer(t)
	c.files = failingFiles{c.files.(dirFiles), &fail}
	cp, e := c.open(rules, nil)
	feed(t, e, logins("a", 1))
	if _, err := c.save(cp, e); err != nil {
		t.Fatal(err)
	}
	fail = true
	feed(t, e, logins("b", 2, 2.5, 3, 3.5)) // fires at 4 s
	if _, err := c.save(cp, e); err == nil {
		t.Fatal("the upload did not fail")
	}
	fail = false
	feed(t, e, logins("c", 5))
	list, err := c.save(cp, e)
	if err != nil {
		t.Fatal(err)
	}
	if rs := e.State().Rules["count"]; rs.Groups["b"] == nil || rs.Groups["b"].FiringSince == 0 {
		t.Fatal("b is not firing")
	}
	c.checkRestored(rules, list, e)
}

// A segment that is not whole is an error naming the checkpoint, wrapping
// ErrCorruptState.
func TestCheckpointCorruptSegment(t *testing.T) {
	rules := mustRules(t, RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: time.Second, Op: ">", Threshold: 2, AllowedLateness: time.Millisecond})
	c := newCheckpointer(t)
	cp, e := c.open(rules, nil)
	feed(t, e, slices.Concat(logins("a", 1, 2), logins("b", 3)))
	list, err := c.save(cp, e)
	if err != nil {
		t.Fatal(err)
	}
	obj := filepath.Join(c.files.(dirFiles).dir, list[0].File.Object)
	b, err := os.ReadFile(obj)
	if err != nil {
		t.Fatal(err)
	}
	var failed *Checkpoints
	for _, cut := range []int{len(b) - 1, len(b) - 5, len(segMagic) + 3, 3} {
		if err := os.WriteFile(obj, b[:cut], 0o644); err != nil {
			t.Fatal(err)
		}
		failed = NewCheckpoints(c.files, filepath.Join(t.TempDir(), "segments"), c.log)
		_, err := failed.Open(context.Background(), DefaultSettings(), rules, list, nil, nil, "")
		if !errors.Is(err, ErrCorruptState) || !strings.Contains(err.Error(), "checkpoint") {
			t.Fatalf("a segment cut at %d of %d bytes: %v", cut, len(b), err)
		}
	}
	// Opened again from an older state without a checkpoint (as the pipeline tries
	// when a file is lost), the Checkpoints keep nothing of the failed list: the
	// first capture writes every group.
	if e, err = failed.Open(context.Background(), DefaultSettings(), rules, nil, nil, nil, ""); err != nil {
		t.Fatal(err)
	}
	feed(t, e, logins("c", 4))
	list, err = c.save(failed, e)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || !list[0].Base {
		t.Fatalf("the first checkpoint after a failed open is %+v, want one base", list)
	}
}

// A capture in steps keeps the groups it encodes in a spool file, unlinked at
// once, and closes it when its segment is written, when a later Begin ends it and
// its segment is given up by a restore, and at Close: no spool stays open.
func TestCheckpointSpoolClosed(t *testing.T) {
	rules := mustRules(t, RuleConfig{Name: "count", Kind: KindThreshold, Filter: `type == "login.failed"`, GroupBy: []string{"data.user"},
		Window: 10 * time.Second, Step: time.Second, Op: ">", Threshold: 100})
	c := newCheckpointer(t)
	cp, e := c.open(rules, nil)
	for u := range 50 {
		feed(t, e, logins(fmt.Sprint("u", u), 0.5))
	}
	if _, err := c.save(cp, e); err != nil { // the base, written at once
		t.Fatal(err)
	}
	// spools counts the spool files open, checking they are unlinked.
	spools := func() int {
		t.Helper()
		fds, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, fd := range fds {
			target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name()))
			if err != nil || !strings.Contains(filepath.Base(target), "spool-") {
				continue
			}
			if !strings.HasSuffix(target, " (deleted)") {
				t.Fatalf("the spool %s is not unlinked", target)
			}
			n++
		}
		return n
	}
	ctx := context.Background()
	feed(t, e, slices.Concat(logins("u1", 1), logins("u2", 1.1)))
	p, err := cp.Begin(e)
	if err != nil {
		t.Fatal(err)
	}
	feed(t, e, logins("u1", 1.2)) // u1 is kept as it was at Begin
	if got := spools(); got != 1 {
		t.Fatalf("%d spools open during a capture, want 1", got)
	}
	p.Step(1)
	capture, err := p.End()
	if err != nil {
		t.Fatal(err)
	}
	list, err := capture.Upload(ctx)
	if err != nil {
		t.Fatal(err)
	}
	capture.Saved(ctx)
	if got := spools(); got != 0 {
		t.Fatalf("%d spools open after the upload, want 0", got)
	}
	// A capture ended by a later Begin, and both given up by a restore.
	feed(t, e, logins("u3", 2))
	if _, err := cp.Begin(e); err != nil {
		t.Fatal(err)
	}
	feed(t, e, logins("u4", 2.1))
	if _, err := cp.Begin(e); err != nil {
		t.Fatal(err)
	}
	if got := spools(); got != 2 {
		t.Fatalf("%d spools open, want 2 (one ended, not written; one begun)", got)
	}
	if _, err := cp.Open(ctx, DefaultSettings(), rules, list, nil, nil, ""); err != nil {
		t.Fatal(err)
	}
	if got := spools(); got != 0 {
		t.Fatalf("%d spools open after a restore, want 0", got)
	}
	e2, err := cp.Open(ctx, DefaultSettings(), rules, list, nil, nil, "")
	if err != nil {
		t.Fatal(err)
	}
	feed(t, e2, logins("u5", 3))
	if _, err := cp.Begin(e2); err != nil {
		t.Fatal(err)
	}
	if err := cp.Close(); err != nil {
		t.Fatal(err)
	}
	if got := spools(); got != 0 {
		t.Fatalf("%d spools open after Close, want 0", got)
	}
}
