package pipeline

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/kit/telemetry"
)

type metrics struct {
	rows       prometheus.Counter
	replays    prometheus.Counter
	duplicates prometheus.Counter
	dead       *prometheus.CounterVec
	events     *prometheus.CounterVec
	// types and reasons bound the labels events and dead take from input.
	types, reasons   *telemetry.LabelCap
	errors           *prometheus.CounterVec
	insert           prometheus.Histogram
	e2e              prometheus.Histogram
	lag              *prometheus.GaugeVec
	snapshot         prometheus.Histogram
	snapshotSeq      *prometheus.GaugeVec
	alerts           *prometheus.CounterVec
	late             *prometheus.CounterVec
	reloads          *prometheus.CounterVec
	exprErrors       prometheus.Counter
	republishSkipped prometheus.Counter
	nonStandard      prometheus.Counter
	typedRows        *prometheus.CounterVec
	stalled          *prometheus.GaugeVec
	stallRestarts    *prometheus.CounterVec
	savedAt          *prometheus.GaugeVec
	keys, keysBytes  *prometheus.GaugeVec
	combined         prometheus.Counter
	parts            prometheus.Counter
	inflight         prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	return &metrics{
		nonStandard: dedup.NewNonStandardCounter(reg),
		savedAt: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_pipeline_state_saved_timestamp_seconds", Help: "When the partition's state was last saved (Unix seconds), by partition.",
		}, []string{"partition"})),
		keys: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_pipeline_dedup_keys", Help: "Dedup keys held at the last state save, by partition.",
		}, []string{"partition"})),
		keysBytes: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_pipeline_dedup_state_bytes", Help: "The dedup keys' size at the last state save, by partition: memory (dedup.store: memory) or local disk (disk).",
		}, []string{"partition"})),
		stalled: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_pipeline_stalled", Help: "1 while a partition holds input and stored none of it for PIPELINE_STALL_AFTER (the watchdog), by partition.",
		}, []string{"partition"})),
		stallRestarts: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_pipeline_stall_restarts_total", Help: "Runs of a partition ended and started again because it stalled (PIPELINE_STALL_RESTART), by partition.",
		}, []string{"partition"})),
		typedRows: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_pipeline_typed_rows_inserted_total", Help: "Rows inserted into typed tables, by table.",
		}, []string{"table"})),
		inflight: telemetry.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_pipeline_events_in_flight", Help: "Events the worker's partitions hold read and not yet stored, together (at most 2 × PIPELINE_BATCH_MAX_ROWS).",
		})),
		combined: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_pipeline_inserts_combined_total", Help: "Events inserts that held the rows of more than one partition's batch (sink.Combiner).",
		})),
		parts: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_pipeline_batch_parts_total", Help: "Parts of batches prepared and decided while the batch still filled (an insert before it running), before it was cut.",
		})),
		rows: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_pipeline_rows_inserted_total", Help: "Rows inserted into the events table.",
		})),
		replays: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_pipeline_replays_recognised_total", Help: "Rows found in the events table already after a restart, not inserted again.",
		})),
		duplicates: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_pipeline_duplicates_total", Help: "Repeats dropped: their key was held in the dedup window.",
		})),
		dead: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_pipeline_dead_letters_total", Help: "Input sent to the DLQ, by reason: its first clause (up to the first colon); the first 32 distinct, later ones as other.",
		}, []string{"reason"})),
		events: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_pipeline_events_total", Help: "Events by type (the first 100 distinct, later ones as other; none: no type read) and outcome: stored (inserted), repeat (dropped by dedup), dead_letter.",
		}, []string{"type", "outcome"})),
		types:   &telemetry.LabelCap{Max: 100},
		reasons: &telemetry.LabelCap{Max: 32},
		errors: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_pipeline_clickhouse_errors_total", Help: "Failed ClickHouse operations, by op (insert, check), each retried.",
		}, []string{"op"})),
		insert: telemetry.Register(reg, prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_pipeline_insert_seconds", Help: "Time an insert took.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		})),
		e2e: telemetry.Register(reg, prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_pipeline_publish_to_row_seconds", Help: "From the event's publish to EVENTS to the end of the insert that holds its row.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 18),
		})),
		lag: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_pipeline_lag", Help: "Input messages after the last one read, by partition this worker owns.",
		}, []string{"partition"})),
		snapshot: telemetry.Register(reg, prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "sluice_pipeline_snapshot_seconds", Help: "Time a state snapshot took to store.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		})),
		snapshotSeq: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_pipeline_snapshot_sequence", Help: "The input stream's sequence of the last state snapshot, by partition.",
		}, []string{"partition"})),
		alerts: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_pipeline_alert_changes_total", Help: "Alert changes published, by rule and status (firing, resolved).",
		}, []string{"rule", "status"})),
		late: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_pipeline_late_events_total", Help: "Events that arrived after a window holding them was evaluated, by rule.",
		}, []string{"rule"})),
		reloads: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_pipeline_rule_reloads_total", Help: "Reloads of the rules, by result (ok, failed: rules that failed are left out).",
		}, []string{"result"})),
		exprErrors: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_pipeline_expression_errors_total", Help: "Filter, group_by or value expressions that failed on an event.",
		})),
		republishSkipped: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_pipeline_republish_skipped_total", Help: "Alert changes recomputed after a restart that were already published.",
		})),
	}
}

// Outcomes of sluice_pipeline_events_total.
const (
	outcomeStored = "stored"
	outcomeRepeat = "repeat"
	outcomeDead   = "dead_letter"
)

// event counts n events of type typ with outcome.
func (m *metrics) event(typ, outcome string, n int) {
	m.events.WithLabelValues(m.types.Value(typ), outcome).Add(float64(n))
}

// deadLetter counts a dead letter of type typ with reason.
func (m *metrics) deadLetter(typ, reason string) {
	m.dead.WithLabelValues(m.reasons.Value(telemetry.ReasonClass(reason))).Inc()
	m.event(typ, outcomeDead, 1)
}

// forget drops a partition's gauges once this worker no longer runs it: another
// worker reports it now, and a stale value here would read as stuck.
func (m *metrics) forget(partition string) {
	for _, g := range []*prometheus.GaugeVec{m.lag, m.snapshotSeq, m.savedAt, m.stalled, m.keys, m.keysBytes} {
		g.DeleteLabelValues(partition)
	}
}

// typeOf is the event type of d, "" when it has none (invalid input).
func typeOf(d *dedup.Decision) string {
	if d.Event == nil {
		return ""
	}
	return d.Event.Type
}
