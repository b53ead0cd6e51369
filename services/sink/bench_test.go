package sink

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// BenchmarkInsertEvents inserts batches of 100,000 event rows (the default MaxRows)
// into a real ClickHouse; rows/s is the sink's insert ceiling on this machine.
func BenchmarkInsertEvents(b *testing.B) {
	const rowsPerBatch = 100_000
	ctx, conn := migrated(b)
	tbl := EventsTable()
	w := &writer{cfg: DefaultConfig(), table: tbl, into: tbl, ch: conn, m: newMetrics(prometheus.NewRegistry()), ready: &telemetry.Readiness{}, log: testLog}
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
		if err := w.insert(ctx, rows, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(rowsPerBatch*b.N)/b.Elapsed().Seconds(), "rows/s")
}

// BenchmarkSinkDrain fills ENRICHED with 300,000 events, then measures the sink
// alone draining them into ClickHouse (rows/s), and then the publish-to-row latency
// (p50, p99) while events arrive at half that rate for 10 s. NATS runs embedded in
// the benchmark's process, ClickHouse as its own server.
func BenchmarkSinkDrain(b *testing.B) {
	const total = 300_000
	for range b.N {
		b.StopTimer()
		ns := natstest.Run(b)
		srv := chtest.Start(b)
		_, conn := chtest.Database(b, srv)
		nc, js := ns.Connect(b)
		ctx := context.Background()
		if err := service.ApplyTopology(ctx, nc, 1); err != nil {
			b.Fatal(err)
		}
		payloads := make([][]byte, 1000)
		for i := range payloads {
			payloads[i] = enrichedEvent(i)
		}
		for i := range total {
			if _, err := js.PublishAsync("enriched.bench.t", payloads[i%len(payloads)]); err != nil {
				b.Fatal(err)
			}
			if i%10_000 == 9_999 {
				<-js.PublishAsyncComplete()
			}
		}
		<-js.PublishAsyncComplete()
		idle := func() error { return natstest.Idle(ctx, js, streams.Enriched, "sink") }
		reg := prometheus.NewRegistry()
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		b.StartTimer()
		start := time.Now()
		go func() {
			done <- Run(runCtx, DefaultConfig(), Deps{NATS: nc, ClickHouse: conn, Logger: testLog, Registerer: reg, Ready: &telemetry.Readiness{}})
		}()
		poll.Until(b, 5*time.Minute, idle)
		drain := time.Since(start)
		b.StopTimer()
		rate := float64(total) / drain.Seconds()
		b.ReportMetric(rate, "rows/s")

		// Latency at half the measured rate, on a fresh histogram.
		latencyReg := prometheus.NewRegistry()
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		runCtx, cancel = context.WithCancel(ctx)
		go func() {
			done <- Run(runCtx, DefaultConfig(), Deps{NATS: nc, ClickHouse: conn, Logger: testLog, Registerer: latencyReg, Ready: &telemetry.Readiness{}})
		}()
		perTick := int(rate / 2 / 100) // 100 ticks a second
		tick := time.NewTicker(10 * time.Millisecond)
		for n := 0; n < 1000; n++ {
			<-tick.C
			for i := range perTick {
				if _, err := js.PublishAsync("enriched.bench.t", payloads[i%len(payloads)]); err != nil {
					b.Fatal(err)
				}
			}
		}
		tick.Stop()
		<-js.PublishAsyncComplete()
		poll.Until(b, 5*time.Minute, idle)
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		h := newMetrics(latencyReg).e2e.WithLabelValues("events").(prometheus.Histogram)
		b.ReportMetric(quantile(b, h, 0.50)*1000, "p50-ms")
		b.ReportMetric(quantile(b, h, 0.99)*1000, "p99-ms")
		b.ReportMetric(0, "ns/op")
	}
}

// quantile estimates q from a histogram's buckets by linear interpolation.
func quantile(b *testing.B, h prometheus.Histogram, q float64) float64 {
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		b.Fatal(err)
	}
	hist := m.GetHistogram()
	want := q * float64(hist.GetSampleCount())
	lowerBound, lowerCount := 0.0, 0.0
	for _, bk := range hist.GetBucket() {
		c := float64(bk.GetCumulativeCount())
		if c >= want {
			if c == lowerCount {
				return bk.GetUpperBound()
			}
			return lowerBound + (bk.GetUpperBound()-lowerBound)*(want-lowerCount)/(c-lowerCount)
		}
		lowerBound, lowerCount = bk.GetUpperBound(), c
	}
	return lowerBound
}

// BenchmarkInsertFenced inserts batches of 500, 2,000 and 5,000 event rows (the
// pipeline's batches at half load) into events directly and through a
// partition's fence (events_fenced and its view); ms/insert is what each costs,
// and the difference what the fence adds.
func BenchmarkInsertFenced(b *testing.B) {
	ctx, conn := migrated(b)
	f, _, err := NewFence(ctx, conn, 0, 1, "bench", time.Second)
	if err != nil {
		b.Fatal(err)
	}
	for _, rows := range []int{500, 2_000, 5_000} {
		var cols EventColumns
		for i := range rows {
			e, err := events.Unmarshal(enrichedEvent(i))
			if err != nil {
				b.Fatal(err)
			}
			rec, err := EventRecordOf(e, uint64(i+1))
			if err != nil {
				b.Fatal(err)
			}
			cols.Append(&rec)
		}
		for _, bc := range []struct {
			name   string
			insert func() error
		}{
			{"direct", func() error { return InsertEvents(ctx, conn, &cols) }},
			{"fenced", func() error { return InsertEventsFenced(ctx, conn, &cols, f) }},
		} {
			b.Run(fmt.Sprint(bc.name, "-", rows), func(b *testing.B) {
				for b.Loop() {
					if err := bc.insert(); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/1e3/float64(b.N), "ms/insert")
			})
		}
	}
}
