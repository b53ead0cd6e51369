package pipeline

import (
	"context"
	"fmt"
)

// watch reports the partition stalled — holding input, storing none of it for
// cfg.StallAfter (an insert or a publish that never returns, a step wedged) — on
// /readyz (check "partition <p> progress"), in sluice_pipeline_stalled, in the
// log and in the pipeline's bucket (Stall, for sluice status), and clears them
// when it moves again; until ctx ends. With cfg.StallRestart it also hands the
// report to the run, which ends and starts again.
func (r *run) watch(ctx context.Context) {
	check := fmt.Sprintf("partition %d progress", r.in.id)
	defer r.ready.Set(check, nil)
	// A record left by an earlier run (or a worker killed while stalled) is not
	// this run's.
	r.reportStall(ctx, nil)
	gauge := r.m.stalled.WithLabelValues(r.in.label)
	gauge.Set(0)
	r.dog.Watch(ctx, r.cfg.StallAfter, fmt.Sprintf("partition %d", r.in.id), "stored", func(err error) {
		r.ready.Set(check, err)
		r.reportStall(ctx, err)
		if err != nil {
			gauge.Set(1)
			r.log.Error("partition stalled", "partition", r.in.id, "err", err, "restart", r.cfg.StallRestart)
			if r.cfg.StallRestart {
				select {
				case r.stalled <- err:
				default:
				}
			}
			return
		}
		gauge.Set(0)
		r.log.Info("partition moves again", "partition", r.in.id)
	})
}
