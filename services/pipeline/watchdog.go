package pipeline

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"
)

// watchdog notices a partition that holds input but stores none of it for
// cfg.StallAfter (an insert or a publish that never returns, a step wedged): it says
// so on /readyz (check "partition <p> progress"), in sluice_pipeline_stalled and in
// the log, and clears all three when the partition moves again.
type watchdog struct {
	// held counts messages read and not yet stored; progress is when a batch was
	// last stored (or the run began), in Unix nanoseconds.
	held     atomic.Int64
	progress atomic.Int64
}

func (w *watchdog) read(n int) { w.held.Add(int64(n)) }

func (w *watchdog) stored(n int, now time.Time) {
	w.held.Add(-int64(n))
	w.progress.Store(now.UnixNano())
}

// watch checks every quarter of cfg.StallAfter until ctx ends.
func (r *run) watch(ctx context.Context) {
	after := r.cfg.StallAfter
	check := fmt.Sprintf("partition %d progress", r.in.id)
	defer r.ready.Set(check, nil)
	gauge := r.m.stalled.WithLabelValues(r.in.label)
	gauge.Set(0)
	r.dog.progress.Store(time.Now().UnixNano())
	tick := time.NewTicker(max(after/4, 10*time.Millisecond))
	defer tick.Stop()
	stalled := false
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			held, since := r.dog.held.Load(), now.Sub(time.Unix(0, r.dog.progress.Load()))
			switch {
			case held > 0 && since >= after && !stalled:
				stalled = true
				err := fmt.Errorf("partition %d holds %d messages and stored none for %s (stall_after %s)", r.in.id, held, since.Round(time.Second), after)
				r.ready.Set(check, err)
				gauge.Set(1)
				r.log.Error("partition stalled", "partition", r.in.id, "held", held, "since", since.Round(time.Second))
			case stalled && (held == 0 || since < after):
				stalled = false
				r.ready.Set(check, nil)
				gauge.Set(0)
				r.log.Info("partition moves again", "partition", r.in.id)
			}
		}
	}
}
