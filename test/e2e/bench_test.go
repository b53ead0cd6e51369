package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/test/oracle"
)

// BenchmarkPipeline pre-publishes 200,000 events of about 430 bytes (structured
// CloudEvents, 5% repeats) to EVENTS, then starts every stage in this process and
// measures from start until the last unique event is a row in ClickHouse.
func BenchmarkPipeline(b *testing.B) {
	const total = 200_000
	for range b.N {
		b.StopTimer()
		p := startPipelineStopped(b)
		js := p.js
		ctx := context.Background()
		unique := 0
		futures := make([]jetstream.PubAckFuture, 0, total)
		for i := range total {
			n := i
			if i%20 == 19 {
				n = i - 1 // 5% repeats
			} else {
				unique++
			}
			f, err := js.PublishAsync("events.web.pageview", benchEvent(n))
			if err != nil {
				b.Fatal(err)
			}
			futures = append(futures, f)
		}
		for _, f := range futures {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				b.Fatal(err)
			}
		}
		b.StartTimer()
		start := time.Now()
		p.start()
		err := oracle.WaitFor(ctx, 10*time.Minute, func() error {
			c, err := oracle.ReadCounts(ctx, p.ch)
			if err != nil {
				return err
			}
			if c.Events < uint64(unique) {
				return fmt.Errorf("%d/%d rows", c.Events, unique)
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
		elapsed := time.Since(start)
		b.StopTimer()
		b.ReportMetric(float64(total)/elapsed.Seconds(), "events/s")
		b.ReportMetric(0, "ns/op")
		p.stop()
	}
}

// benchEvent is event i, its time in the past (an event more than ingest.max_future
// ahead of its arrival is dead-lettered).
func benchEvent(i int) []byte {
	e := map[string]any{
		"specversion": "1.0", "id": "pv-" + strconv.Itoa(i), "source": "web", "type": "page.view",
		"time":            time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(i) * time.Millisecond).Format(time.RFC3339Nano),
		"datacontenttype": "application/json",
		"data": map[string]any{
			"user": "u" + strconv.Itoa(i%5000), "session": "s-" + strconv.Itoa(i%20000),
			"path": "/products/" + strconv.Itoa(i%997), "referrer": "https://search.example.com/?q=item+" + strconv.Itoa(i%101),
			"ip": "203.0.113." + strconv.Itoa(i%254+1), "ua": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
			"duration_ms": i % 3000,
		},
	}
	b, _ := json.Marshal(e)
	return b
}
