package configfile

import (
	"context"
	"time"

	"github.com/sluicehq/sluice/services/kit/filechange"
)

// Watcher watches one file for changes made after NewWatcher: Run calls changed
// with the newly parsed file each time it changed (by modification time or size)
// and is whole again (as it was at the check before, and unchanged while read:
// filechange), checking every period, until ctx is done; a file that does not
// parse (or is gone) is passed to failed, once for the same contents, and the
// watch goes on. NewWatcher, called before the goroutine that runs it starts, fixes
// from when changes count.
type Watcher struct {
	path  string
	files *filechange.Files
}

// NewWatcher notes the file at path as it is now: Run reports changes after this.
func NewWatcher(path string) *Watcher {
	return &Watcher{path: path, files: filechange.New(path)}
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
		_, err := w.files.Reload(func() (func(), error) {
			f, err := Load(w.path)
			if err != nil {
				return nil, err
			}
			return func() { changed(f) }, nil
		})
		if err != nil {
			failed(err)
		}
	}
}
