package configfile

import (
	"context"
	"os"
	"time"
)

// Watch calls changed with the newly parsed file each time the file at path
// changes (by modification time or size), checking every period, until ctx is done.
// A file that does not parse is passed to failed and the watch goes on. Changes
// are counted from when Watch is called; NewWatcher fixes that point before the
// watching goroutine starts.
func Watch(ctx context.Context, path string, every time.Duration, changed func(*File), failed func(error)) {
	NewWatcher(path).Run(ctx, every, changed, failed)
}

// Watcher watches one file for changes made after NewWatcher.
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

// Run is Watch for the changes after NewWatcher.
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
