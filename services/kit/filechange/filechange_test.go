package filechange

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// loader reads a file with Reload and keeps what it committed.
type loader struct {
	f      *Files
	path   string
	loaded string
	reads  int
}

func (l *loader) reload() (bool, error) {
	return l.f.Reload(func() (func(), error) {
		l.reads++
		b, err := os.ReadFile(l.path)
		if err != nil {
			return nil, err
		}
		if strings.Contains(string(b), "broken") {
			return nil, errors.New("broken")
		}
		return func() { l.loaded = string(b) }, nil
	})
}

// write writes body to path with a modification time of its own (a file system's
// clock may not tell two quick writes apart; the size alone may not either).
func write(t *testing.T, path, body string, at time.Time) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, at, at); err != nil {
		t.Fatal(err)
	}
}

// A change is read at the second check that finds the file as it was: a file still
// being written (changed between two checks) is not read; one read is enough for
// the same contents, even when they do not load; a missing file is a change too.
func TestReloadOnceSettled(t *testing.T) {
	path := filepath.Join(t.TempDir(), "t.csv")
	at := time.Unix(1_800_000_000, 0)
	write(t, path, "a\n1\n", at)
	l := &loader{f: New(path), path: path}
	check := func(step string, wantOK bool, wantErr bool, wantLoaded string) {
		t.Helper()
		ok, err := l.reload()
		if ok != wantOK || (err != nil) != wantErr || l.loaded != wantLoaded {
			t.Fatalf("%s: reloaded %v, err %v, loaded %q; want %v, an error %v, %q", step, ok, err, l.loaded, wantOK, wantErr, wantLoaded)
		}
	}
	check("unchanged", false, false, "")
	write(t, path, "a\n1\n2\n", at.Add(time.Second)) // half of it
	check("changed", false, false, "")
	write(t, path, "a\n1\n2\n3\n", at.Add(2*time.Second)) // the rest
	check("changed again", false, false, "")
	if l.reads != 0 {
		t.Fatalf("read %d times while the file was written", l.reads)
	}
	check("settled", true, false, "a\n1\n2\n3\n")
	check("unchanged after", false, false, "a\n1\n2\n3\n")
	write(t, path, "broken", at.Add(3*time.Second))
	check("broken, changed", false, false, "a\n1\n2\n3\n")
	check("broken, settled", false, true, "a\n1\n2\n3\n")
	reads := l.reads
	check("broken, again", false, false, "a\n1\n2\n3\n")
	if l.reads != reads {
		t.Fatal("the same broken contents read again")
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	check("removed", false, false, "a\n1\n2\n3\n")
	check("removed, settled", false, true, "a\n1\n2\n3\n")
	check("removed, again", false, false, "a\n1\n2\n3\n")
	write(t, path, "a\n9\n", at.Add(4*time.Second))
	check("back", false, false, "a\n1\n2\n3\n")
	check("back, settled", true, false, "a\n9\n")
}

// A file that changes while it is read is not committed; it is read again once it
// settles.
func TestChangedWhileRead(t *testing.T) {
	path := filepath.Join(t.TempDir(), "t.csv")
	at := time.Unix(1_800_000_000, 0)
	write(t, path, "a\n1\n", at)
	f := New(path)
	write(t, path, "a\n1\n2\n", at.Add(time.Second))
	if ok, _ := f.Reload(nil); ok {
		t.Fatal("read at the first check of a change")
	}
	committed := false
	ok, err := f.Reload(func() (func(), error) {
		write(t, path, "a\n1\n2\n3\n", at.Add(2*time.Second)) // the writer goes on meanwhile
		return func() { committed = true }, nil
	})
	if ok || err != nil || committed {
		t.Fatalf("reloaded %v (%v), committed %v: what was read while the file changed was kept", ok, err, committed)
	}
	ok, err = f.Reload(func() (func(), error) { return func() { committed = true }, nil })
	if !ok || err != nil || !committed {
		t.Fatalf("after it settled: reloaded %v (%v), committed %v", ok, err, committed)
	}
}

// A file renamed over the one read, with the same size and modification time (a
// file system with coarse times, a copy that keeps times), is a change: it was not
// seen before the inode was compared.
func TestRenamedOverSameTimeAndSize(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "t.csv")
	at := time.Unix(1_800_000_000, 0)
	write(t, path, "a\n1\n", at)
	l := &loader{f: New(path), path: path}
	next := filepath.Join(dir, "t.csv.new")
	write(t, next, "a\n2\n", at)
	if err := os.Rename(next, path); err != nil {
		t.Fatal(err)
	}
	if ok, err := l.reload(); ok || err != nil {
		t.Fatalf("first check after the rename: %v %v", ok, err)
	}
	if ok, err := l.reload(); !ok || err != nil || l.loaded != "a\n2\n" {
		t.Fatalf("settled: reloaded %v, %v, loaded %q; want the renamed file", ok, err, l.loaded)
	}
}
