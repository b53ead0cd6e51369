package partition_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/partition"
)

// Incremental checkpoints: an immutable file is uploaded once however many
// checkpoints name it, the others with each; a restore writes the checkpoint's
// files back (immutable ones linked from the local cache when there); objects no
// kept checkpoint names are deleted, those of a later generation never.
func TestFiles(t *testing.T) {
	ctx := context.Background()
	_, store, c := claimed(t, "test_files")
	log := slog.New(slog.DiscardHandler)
	objects := func() []string { return objectNames(t, store) }
	immutable := func(name string) bool { return strings.HasSuffix(name, ".sst") }
	write := func(dir string, files map[string]string) []string {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		var names []string
		for name, body := range files {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
			names = append(names, name)
		}
		slices.Sort(names)
		return names
	}
	// An object of a later generation (a successor's) is never deleted.
	successor := "keys.0.999.abc.1.000001.sst"
	if _, err := store.PutString(ctx, successor, "theirs"); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	files := partition.NewFiles(store, c, "keys", immutable, filepath.Join(root, "cache"), log)
	dir1 := filepath.Join(root, "c1")
	cp1, err := files.Upload(ctx, dir1, write(dir1, map[string]string{"000001.sst": "one", "MANIFEST-1": "m1"}))
	if err != nil {
		t.Fatal(err)
	}
	files.Keep(ctx, cp1)
	dir2 := filepath.Join(root, "c2")
	cp2, err := files.Upload(ctx, dir2, write(dir2, map[string]string{"000001.sst": "one", "000002.sst": "two", "MANIFEST-1": "m2"}))
	if err != nil {
		t.Fatal(err)
	}
	files.Keep(ctx, cp2)
	if cp2[0] != cp1[0] {
		t.Fatalf("000001.sst uploaded again: %v, then %v", cp1[0], cp2[0])
	}
	if got := len(objects()); got != 5 { // 000001, 000002, two MANIFESTs, the successor's
		t.Fatalf("%d objects after two checkpoints, want 5: %v", got, objects())
	}
	// The third: 000001 compacted away; the first checkpoint's files go, but for
	// what the second names.
	dir3 := filepath.Join(root, "c3")
	cp3, err := files.Upload(ctx, dir3, write(dir3, map[string]string{"000002.sst": "two", "000003.sst": "three", "MANIFEST-1": "m3"}))
	if err != nil {
		t.Fatal(err)
	}
	files.Keep(ctx, cp3)
	want := []string{}
	for _, cp := range [][]partition.File{cp2, cp3} {
		for _, f := range cp {
			if !slices.Contains(want, f.Object) {
				want = append(want, f.Object)
			}
		}
	}
	want = append(want, successor)
	slices.Sort(want)
	if got := objects(); !slices.Equal(got, want) {
		t.Fatalf("objects %v, want %v", got, want)
	}
	// Open reads an immutable file from this machine's copy, downloading it again
	// when the copy is gone or damaged.
	cached := filepath.Join(root, "cache", cp3[1].Object)
	for _, damage := range []string{"none", "gone", "damaged"} {
		switch damage {
		case "gone":
			if err := os.Remove(cached); err != nil {
				t.Fatal(err)
			}
		case "damaged":
			if err := os.WriteFile(cached, []byte("THREE"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		r, err := files.Open(ctx, cp3[1])
		if err != nil {
			t.Fatalf("open with the local copy %s: %v", damage, err)
		}
		b, err := io.ReadAll(r)
		r.Close()
		if err != nil || string(b) != "three" {
			t.Fatalf("open with the local copy %s: read %q (%v)", damage, b, err)
		}
	}
	// Restore on another machine (an empty cache: everything downloaded), then on
	// this one, whose cache the uploads filled: immutable files linked from it, but
	// one damaged there, which is downloaded again.
	for _, round := range []string{"another machine", "this machine"} {
		dir, cache := filepath.Join(root, "restored"), filepath.Join(root, "cache")
		if round == "another machine" {
			cache = filepath.Join(root, "other-cache")
		} else if err := os.WriteFile(filepath.Join(cache, cp3[1].Object), []byte("THREE"), 0o644); err != nil {
			t.Fatal(err)
		}
		next := partition.NewFiles(store, c, "keys", immutable, cache, log)
		if err := next.Restore(ctx, cp3, dir); err != nil {
			t.Fatalf("%s: %v", round, err)
		}
		for name, body := range map[string]string{"000002.sst": "two", "000003.sst": "three", "MANIFEST-1": "m3"} {
			if b, err := os.ReadFile(filepath.Join(dir, name)); err != nil || string(b) != body {
				t.Fatalf("%s: %s restored as %q (%v), want %q", round, name, b, err, body)
			}
		}
		for _, f := range cp3[:2] {
			a, _ := os.Stat(filepath.Join(dir, f.Name))
			b, _ := os.Stat(filepath.Join(cache, f.Object))
			if a == nil || b == nil || !os.SameFile(a, b) {
				t.Fatalf("%s: %s is not linked from the cache", round, f.Name)
			}
		}
		// A restored immutable file is not uploaded again.
		cp, err := next.Upload(ctx, dir, []string{"000002.sst", "000003.sst", "MANIFEST-1"})
		if err != nil {
			t.Fatal(err)
		}
		if cp[0] != cp3[0] || cp[1] != cp3[1] || cp[2] == cp3[2] {
			t.Fatalf("%s: after a restore, uploaded %v; the checkpoint was %v", round, cp, cp3)
		}
	}
}

// Shared files (the split alert stage's replicas, each saving the one state):
// a writer deletes its own objects only, never those a live writer's checkpoints
// name; a checkpoint restored from another writer is not continued (its files
// are uploaded anew); the objects of a writer that wrote nothing for stale go;
// and a writer whose checkpoints were not kept for half of stale uploads its
// files again (the others may have taken it for ended).
func TestSharedFiles(t *testing.T) {
	ctx := context.Background()
	_, store, _ := claimed(t, "test_shared_files")
	log := slog.New(slog.DiscardHandler)
	const stale = time.Second
	root := t.TempDir()
	all := func(string) bool { return true }
	newWriter := func(name string) (*partition.Files, string) {
		return partition.NewSharedFiles(store, "groups", all, filepath.Join(root, name+"-cache"), stale, log), filepath.Join(root, name)
	}
	write := func(dir, name, body string) {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	save := func(f *partition.Files, dir string, names ...string) []partition.File {
		t.Helper()
		cp, err := f.Upload(ctx, dir, names)
		if err != nil {
			t.Fatal(err)
		}
		f.Keep(ctx, cp)
		return cp
	}
	objectsOf := func(cps ...[]partition.File) []string {
		var out []string
		for _, cp := range cps {
			for _, f := range cp {
				if !slices.Contains(out, f.Object) {
					out = append(out, f.Object)
				}
			}
		}
		slices.Sort(out)
		return out
	}
	a, dirA := newWriter("a")
	b, dirB := newWriter("b")
	write(dirA, "base", "a")
	write(dirB, "base", "b")
	var lastA, lastB [][]partition.File
	// bLast is taken before b's last save starts: no earlier than the objects'
	// times, so that a deletion before stale after them shows as one before stale
	// after bLast.
	var bLast time.Time
	for i := range 3 {
		delta := fmt.Sprint("delta", i)
		write(dirA, delta, "a"+delta)
		lastA = append(lastA, save(a, dirA, "base", delta))
		write(dirB, delta, "b"+delta)
		bLast = time.Now()
		lastB = append(lastB, save(b, dirB, "base", delta))
	}
	// Each keeps its last two checkpoints, the other's untouched.
	want := objectsOf(lastA[1], lastA[2], lastB[1], lastB[2])
	if got := objectNames(t, store); !slices.Equal(got, want) {
		t.Fatalf("objects %v, want %v", got, want)
	}
	// A third writer restores a's checkpoint and does not continue it.
	c, dirC := newWriter("c")
	if c.Continues() {
		t.Fatal("shared files continue a restored checkpoint")
	}
	if err := c.Restore(ctx, lastA[2], dirC); err != nil {
		t.Fatal(err)
	}
	if body, err := os.ReadFile(filepath.Join(dirC, "delta2")); err != nil || string(body) != "adelta2" {
		t.Fatalf("restored delta2: %q, %v", body, err)
	}
	cpC := save(c, dirC, "base")
	if cpC[0].Object == lastA[2][0].Object {
		t.Fatalf("the restored base was not uploaded anew: %v", cpC)
	}
	want = objectsOf(lastA[1], lastA[2], lastB[1], lastB[2], cpC)
	if got := objectNames(t, store); !slices.Equal(got, want) {
		t.Fatalf("after c's first save, objects %v, want %v", got, want)
	}
	// b and c write nothing more: a deletes their objects once their newest is
	// stale older than a's, not before.
	deadline := time.Now().Add(30 * time.Second)
	for i := 3; ; i++ {
		delta := fmt.Sprint("delta", i) // a new file each save, as segments are
		write(dirA, delta, "a"+delta)
		lastA = append(lastA, save(a, dirA, "base", delta))
		got := objectNames(t, store)
		if slices.Equal(got, objectsOf(lastA[len(lastA)-2:]...)) {
			break
		}
		for _, o := range objectsOf(lastB[1], lastB[2]) {
			if !slices.Contains(got, o) {
				if since := time.Since(bLast); since < stale {
					t.Fatalf("b's object %s deleted %v after its last save, stale is %v", o, since, stale)
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("objects %v %v after b's and c's last saves, want a's only", got, time.Since(bLast))
		}
	}
	// a saves nothing for half of stale (as while its saves fail): its next
	// upload writes its files again.
	before := save(a, dirA, "base")
	time.Sleep(stale/2 + 100*time.Millisecond) // the time that passes is what is tested
	after, err := a.Upload(ctx, dirA, []string{"base"})
	if err != nil {
		t.Fatal(err)
	}
	if after[0].Object == before[0].Object {
		t.Fatalf("a's base not uploaded again after %v without a kept checkpoint: %v", stale/2, after)
	}
}
