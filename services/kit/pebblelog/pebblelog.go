// Package pebblelog writes what an embedded Pebble (github.com/cockroachdb/pebble)
// reports to slog, for the stores that keep state in one.
package pebblelog

import (
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// Logger is Pebble's Logger on slog: its information at debug level, its errors
// as errors; a fatal message (a broken invariant of Pebble's) panics.
type Logger struct{ Log *slog.Logger }

func (l Logger) Infof(format string, args ...any) { l.Log.Debug(fmt.Sprintf(format, args...)) }

func (l Logger) Errorf(format string, args ...any) { l.Log.Error(fmt.Sprintf(format, args...)) }

func (l Logger) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }

// BackgroundErrors returns a handler for Pebble's background errors (a flush or a
// compaction that failed, on a full disk say, which Pebble retries again and
// again) that logs msg with the error at most once a minute, with how many there
// were since the last one logged.
func BackgroundErrors(log *slog.Logger, msg string) func(error) {
	var mu sync.Mutex
	var last time.Time
	var since int
	return func(err error) {
		mu.Lock()
		defer mu.Unlock()
		since++
		if time.Since(last) < time.Minute {
			return
		}
		log.Error(msg, "err", err, "errors_since_last_logged", since)
		last, since = time.Now(), 0
	}
}
