package alert

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
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
	return errorsJoin(err, w.Close())
}

func errorsJoin(a, b error) error {
	if a != nil {
		return a
	}
	return b
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

// checkCheckpoints fails t unless an engine restarted from its checkpoints gives
// the alerts (values and annotations too) of an uninterrupted run: about 24
// checkpoints are captured (so compactions run: deltas merged, bases rewritten),
// and the run restarts twice from a checkpoint taken some events
// before it stopped (the events since then read again, as a stage does), with
// the groups in memory and with all but two on disk.
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
	for _, s := range []Settings{{Store: StoreMemory}, {Store: StoreDisk, HotGroups: 2}} {
		store := dirFiles{t.TempDir()}
		groups := t.TempDir()
		open := func(list []Segment) (*Checkpoints, *Engine) {
			cp := NewCheckpoints(store, filepath.Join(t.TempDir(), "segments"), log)
			e, err := cp.Open(ctx, s, rules, list, nil, nil, groups, log)
			if err != nil {
				t.Fatal(err)
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
				outs, i = outs[:from], from
			}
			got, _ := e.Observe(envs[i])
			outs = append(outs, alertsJSON(t, got))
			if i%every == every-1 {
				c, err := cp.Capture(e)
				if err != nil {
					t.Fatal(err)
				}
				list, err := c.Upload(ctx)
				if err != nil {
					t.Fatal(err)
				}
				c.Saved(ctx)
				saved[i+1] = list
				if s.Store == StoreMemory {
					// The state restored is the state captured.
					_, restored := open(list)
					if got, want := dumpState(t, restored), dumpState(t, e); !maps.Equal(got, want) {
						t.Fatalf("the state restored from a checkpoint after %d events differs from the one captured:\n%v\n%v", i+1, got, want)
					}
				}
			}
		}
		got := slices.Concat(outs...)
		got = append(got, alertsJSON(t, e.Idle(time.Hour))...)
		if err := errorsJoin(e.Err(), e.Close()); err != nil {
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
