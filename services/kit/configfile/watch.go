package configfile

import (
	"context"
	"os"
	"time"
)

// Watcher watches one file for changes made after NewWatcher: Run calls changed
// with the newly parsed file each time it changes (by modification time or size),
// checking every period, until ctx is done; a file that does not parse is passed
// to failed and the watch goes on. NewWatcher, called before the goroutine that
// runs it starts, fixes from when changes count.
type Watcher struct {
	path string
	last os.FileInfo
}

// NewWatcher notes the file at path as it is now: Run reports changes after this.
func NewWatcher(path string) *Watcher {
	last, _ := os.Stat(path)
	return &Watcher{path: path, last: last}
}

// Path is the file watched.
func (w *Watcher) Path() string { return w.path }

// Run watches until ctx is done.
func (w *Watcher) Run(ctx context.Context, every time.Duration, changed func(*File), failed func(error)) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		info, err := os.Stat(w.path)
		if err != nil || (w.last != nil && info.ModTime().Equal(w.last.ModTime()) && info.Size() == w.last.Size()) {
			continue
		}
		w.last = info
		f, err := Load(w.path)
		if err != nil {
			failed(err)
			continue
		}
		changed(f)
	}
}
