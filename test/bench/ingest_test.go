package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/poll"
)

// pageViewSchema types the benchmark events' data, for the typed-table case.
const pageViewSchema = `{
  "type": "object",
  "required": ["user", "session", "path"],
  "properties": {
    "user": {"type": "string"}, "session": {"type": "string"}, "path": {"type": "string"},
    "referrer": {"type": "string"}, "ip": {"type": "string"}, "ua": {"type": "string"},
    "duration_ms": {"type": "integer"}
  }
}`

// ingestCases are BenchmarkIngest's cases: SLUICE_CONFIG (%s: the schema
// directory), the subject, and how the events are published.
var ingestCases = []struct {
	name, config, subject string
	// batch publishes this many events per message (NDJSON); 0 publishes CloudEvents.
	batch int
}{
	{name: "cloudevents", subject: "events.web.pageview"},
	{name: "cloudevents+schema", subject: "events.web.pageview", config: `
ingest:
  schemas: %s
`},
	{name: "cloudevents+schema+typed-table", subject: "events.web.pageview", config: `
typed_tables:
  types: [page.view]
ingest:
  schemas: %s
`},
	{name: "raw", subject: "events.raw.pageview", batch: 1, config: rawMapping},
	{name: "raw-ndjson-100", subject: "events.raw.pageview", batch: 100, config: rawMapping},
}

const rawMapping = `
ingest:
  mappings:
    - subjects: events.raw.>
      envelope: raw
      batch: ndjson
      id: {field: id}
      type: {value: page.view}
      source: {value: web}
      time: {field: at}
`

// rawEvent is event(i)'s data as a producer's own JSON: id and time inside.
func rawEvent(i int) []byte {
	var ce map[string]any
	_ = json.Unmarshal(event(i), &ce)
	data := ce["data"].(map[string]any)
	data["id"], data["at"] = ce["id"], ce["time"]
	b, _ := json.Marshal(data)
	return b
}

// BenchmarkIngest measures what ingest mappings and typed tables cost: one pipeline
// process (one partition, no enrichment, no rules) and the sink for dead letters,
// against a nats-server process and ClickHouse, draining BENCH_INGEST_EVENTS
// (200,000) pre-published events (5% repeats) as CloudEvents, as CloudEvents whose
// type has a schema (their data validated), the same with a typed table for the
// type, as raw JSON one per message, and as raw JSON in NDJSON batches of 100. It reports events/s from the first event consumed to the
// last row, and the pipeline's and ClickHouse's CPU per 1,000 events.
func BenchmarkIngest(b *testing.B) {
	total := 200_000
	if v, err := strconv.Atoi(os.Getenv("BENCH_INGEST_EVENTS")); err == nil && v > 0 {
		total = v
	}
	dir := b.TempDir()
	build(b, dir, map[string]string{"nats-server": binaries["nats-server"], "pipeline": binaries["pipeline"], "sink": binaries["sink"]})
	schemas := filepath.Join(dir, "types")
	if err := os.MkdirAll(schemas, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(schemas, "page.view.json"), []byte(pageViewSchema), 0o644); err != nil {
		b.Fatal(err)
	}
	for _, c := range ingestCases {
		b.Run(c.name, func(b *testing.B) {
			cfgPath := filepath.Join(dir, c.name+".yaml")
			cfg := c.config
			if strings.Contains(cfg, "%s") {
				cfg = fmt.Sprintf(cfg, schemas)
			}
			if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
				b.Fatal(err)
			}
			for range b.N {
				benchIngest(b, dir, cfgPath, c.subject, c.batch, total, strings.Contains(c.name, "typed"))
			}
		})
	}
}

func benchIngest(b *testing.B, dir, cfgPath, subject string, batch, total int, typed bool) {
	natsProc, url, nc, js := startNATS(b, dir, false)
	defer nc.Close()
	ctx := context.Background()
	ch := chtest.Start(b)
	chs, conn := chtest.Database(b, ch)
	if batch == 0 {
		prepublish(b, js, subject, total)
	} else {
		prepublishRaw(b, js, subject, batch, total)
	}
	unique := uint64(total - total/20)
	env := []string{"NATS_URL=" + url, "CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_CONFIG=" + cfgPath,
		"METRICS_ADDR=", "LOG_LEVEL=warn", "SLUICE_APPLY_TOPOLOGY=false"}
	start(b, "sink", filepath.Join(dir, "sink"), append(env, "SINK_TABLES=dead_letters,alerts"))
	b.ResetTimer()
	before := usageOf(ch.Pid())
	began := time.Now()
	consumed := firstConsumed(b, ctx, js, began)
	p := start(b, "pipeline", filepath.Join(dir, "pipeline"), env)
	poll.Until(b, 30*time.Minute, func() error {
		if n := count(ctx, conn, "events"); n < unique {
			return fmt.Errorf("%d/%d rows", n, unique)
		}
		if typed {
			if n := count(ctx, conn, "page_view"); n < unique {
				return fmt.Errorf("%d/%d typed rows", n, unique)
			}
		}
		return nil
	})
	first := <-consumed
	elapsed := time.Since(first)
	b.StopTimer()
	if n := count(ctx, conn, "dead_letters"); n != 0 {
		b.Fatalf("%d dead letters", n)
	}
	b.ReportMetric(float64(total)/elapsed.Seconds(), "events/s")
	after := usageOf(ch.Pid(), p.cmd.Process.Pid, natsProc.cmd.Process.Pid)
	perK := func(cpu float64) float64 { return cpu / float64(total) * 1e6 }
	b.ReportMetric(perK(after.since(usage{cpu: map[int]float64{}}, p.cmd.Process.Pid)), "pipeline-cpu-ms/1k")
	b.ReportMetric(perK(after.since(before, ch.Pid())), "clickhouse-cpu-ms/1k")
	b.ReportMetric(0, "ns/op")
}

// prepublishRaw publishes total raw events (5% repeats), perMsg a message as NDJSON.
func prepublishRaw(b *testing.B, js jetstream.JetStream, subject string, perMsg, total int) {
	var lines []byte
	pending := 0
	for i := range total {
		lines = append(append(lines, rawEvent(i)...), '\n')
		if (i+1)%perMsg != 0 && i != total-1 {
			continue
		}
		if _, err := js.PublishAsync(subject, lines); err != nil {
			b.Fatal(err)
		}
		lines = nil
		if pending++; pending == 2000 {
			<-js.PublishAsyncComplete()
			pending = 0
		}
	}
	<-js.PublishAsyncComplete()
}
