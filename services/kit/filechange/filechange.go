// Package filechange tells when files that are read again on a change (lookup
// tables, geo tables, the config file) have changed and are whole again: a file is
// read only once it is as it was at the check before (its modification time, size
// and inode), and what was read is kept only if the file did not change while it was
// read. So a file being copied or written in place is not read half-way: a CSV cut
// at a line's end would load as a smaller table without an error.
package filechange

import (
	"errors"
	"io/fs"
	"os"
	"slices"
	"time"
)

// stamp is what a change is told by: modification time, size and inode (a file
// renamed over another is told even with the same time and size, as on a file
// system with coarse times), or that the file is missing.
type stamp struct {
	mod     time.Time
	size    int64
	inode   uint64
	missing bool
	// err is a failed stat other than a missing file.
	err string
}

func stampOf(path string) stamp {
	info, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return stamp{missing: true}
	case err != nil:
		return stamp{err: err.Error()}
	}
	return stamp{mod: info.ModTime(), size: info.Size(), inode: inode(info)}
}

// Files are files read together (one table from several files counts as one).
type Files struct {
	paths []string
	// handled is the files as they were when last read (or found unreadable).
	handled []stamp
	// pending is a change seen at the last check, not read yet.
	pending []stamp
}

// New notes paths as they are now: Reload reads them when they change after this.
// Whoever reads them first reads them after New.
func New(paths ...string) *Files {
	f := &Files{paths: paths}
	f.handled = f.stamps()
	return f
}

func (f *Files) stamps() []stamp {
	out := make([]stamp, len(f.paths))
	for i, p := range f.paths {
		out[i] = stampOf(p)
	}
	return out
}

// Reload calls read when the files changed since they were last read and have not
// changed since the check before this one; when they did not change while read
// ran, it calls the commit read returned (if no error) and reports whether it did.
// read's error is returned once for the same contents of the files: until they
// change again they are not read again. Call it from one goroutine at a time, at a
// steady interval.
func (f *Files) Reload(read func() (commit func(), err error)) (bool, error) {
	now := f.stamps()
	if slices.Equal(now, f.handled) {
		f.pending = nil
		return false, nil
	}
	if !slices.Equal(now, f.pending) {
		// Changed since the last check: perhaps still being written.
		f.pending = now
		return false, nil
	}
	commit, err := read()
	if after := f.stamps(); !slices.Equal(after, now) {
		// Written while read: read again once it settles.
		f.pending = after
		return false, nil
	}
	f.handled, f.pending = now, nil
	if err != nil {
		return false, err
	}
	commit()
	return true, nil
}
