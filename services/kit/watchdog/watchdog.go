// Package watchdog notices work that holds input and finishes none of it for a
// while (an insert or a publish that never returns, a step wedged): the pipeline's
// partitions and the split stages both report it on /readyz, in a gauge and in
// the log.
package watchdog

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"
)

// Dog counts the input a piece of work holds (read, not finished) and when it
// last finished some. Safe for concurrent use.
type Dog struct {
	held     atomic.Int64
	progress atomic.Int64 // Unix nanoseconds
}

// Read counts n inputs taken in.
func (d *Dog) Read(n int) { d.held.Add(int64(n)) }

// Done counts n inputs finished at now.
func (d *Dog) Done(n int, now time.Time) {
	d.held.Add(-int64(n))
	d.progress.Store(now.UnixNano())
}

// Watch checks every quarter of after until ctx ends. When the work holds input
// and finished none for after, it calls report with an error that says so (what
// names the work, "partition 3"; verb what finishing is, "stored"); when it moves
// again, report(nil). It counts from its own start, not from an earlier Done.
func (d *Dog) Watch(ctx context.Context, after time.Duration, what, verb string, report func(error)) {
	d.progress.Store(time.Now().UnixNano())
	tick := time.NewTicker(max(after/4, 10*time.Millisecond))
	defer tick.Stop()
	stalled := false
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			held, since := d.held.Load(), now.Sub(time.Unix(0, d.progress.Load()))
			switch {
			case held > 0 && since >= after && !stalled:
				stalled = true
				report(fmt.Errorf("%s holds %d messages and %s none for %s (stall_after %s)", what, held, verb, since.Round(time.Second), after))
			case stalled && (held == 0 || since < after):
				stalled = false
				report(nil)
			}
		}
	}
}
