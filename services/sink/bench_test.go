package sink

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/telemetry"
)

// BenchmarkInsertEvents inserts batches of 100,000 event rows (the default MaxRows)
// into a real ClickHouse; rows/s is the sink's insert ceiling on this machine.
func BenchmarkInsertEvents(b *testing.B) {
	const rowsPerBatch = 100_000
	srv := chtest.Start(b)
	_, conn := chtest.Database(b, srv)
	ctx := context.Background()
	if err := chmigrate.Migrate(ctx, conn, testLog); err != nil {
		b.Fatal(err)
	}
	tbl := eventsTable()
	w := &writer{cfg: DefaultConfig(), table: tbl, ch: conn, m: newMetrics(prometheus.NewRegistry()), ready: &telemetry.Readiness{}, log: testLog}
	rows := make([][]any, rowsPerBatch)
	for i := range rows {
		row, err := eventRowOf(enrichedEvent(i), uint64(i+1))
		if err != nil {
			b.Fatal(err)
		}
		rows[i] = row.Values
	}
	b.ResetTimer()
	for range b.N {
		if err := w.insert(ctx, rows); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(rowsPerBatch*b.N)/b.Elapsed().Seconds(), "rows/s")
}
