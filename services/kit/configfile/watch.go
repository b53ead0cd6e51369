package configfile

import (
	"context"
	"os"
	"time"
)

// Watch calls changed with the newly parsed file each time the file at path
// changes (by modification time or size), checking every period, until ctx is done.
// A file that does not parse is passed to failed and the watch goes on.
func Watch(ctx context.Context, path string, every time.Duration, changed func(*File), failed func(error)) {
	last, _ := os.Stat(path)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		info, err := os.Stat(path)
		if err != nil || (last != nil && info.ModTime().Equal(last.ModTime()) && info.Size() == last.Size()) {
			continue
		}
		last = info
		f, err := Load(path)
		if err != nil {
			failed(err)
			continue
		}
		changed(f)
	}
}
