package sink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chdb/chdbtest"
	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

var testLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

// Replicas starting together migrate the same database at once: all succeed.
func TestMigrateConcurrently(t *testing.T) {
	srv := chtest.Start(t)
	s, _ := chtest.Database(t, srv)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Go(func() {
			conn, err := chconn.Open(ctx, s)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close()
			errs <- chmigrate.Migrate(ctx, conn, testLog)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

// The migrations apply once on ClickHouse 18.16, the tables hold what the sink
// writes, and a table that drifted is refused with the columns named.
func TestTablesOnClickHouse18(t *testing.T) {
	srv := chtest.Start(t)
	_, conn := chtest.Database(t, srv)
	ctx := context.Background()
	for range 2 {
		if err := chmigrate.Migrate(ctx, conn, testLog); err != nil {
			t.Fatal(err)
		}
	}
	ms, _ := chmigrate.Migrations()
	var recorded uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM schema_migrations").Scan(&recorded); err != nil {
		t.Fatal(err)
	}
	if recorded != uint64(len(ms)) {
		t.Fatalf("schema_migrations has %d rows, want %d (each migration once)", recorded, len(ms))
	}
	for _, tbl := range Tables() {
		if err := CheckColumns(ctx, conn, tbl); err != nil {
			t.Error(err)
		}
	}
	if err := conn.Exec(ctx, "ALTER TABLE events DROP COLUMN ua_os"); err != nil {
		t.Fatal(err)
	}
	if err := conn.Exec(ctx, "ALTER TABLE events MODIFY COLUMN geo_asn UInt64"); err != nil {
		t.Fatal(err)
	}
	err := CheckColumns(ctx, conn, EventsTable())
	if err == nil || !strings.Contains(err.Error(), "column ua_os is missing (want String)") || !strings.Contains(err.Error(), "column geo_asn is UInt64 (want UInt32)") {
		t.Fatalf("err = %v, want both drifted columns named", err)
	}
}

// A record inserted column by column (the pipeline's way) lands as the same row as
// inserted row by row (the sink's): every field in its own column.
func TestEventColumnsAsRows(t *testing.T) {
	ctx, conn := migrated(t)
	at := time.Unix(1_800_000_000, 0).UTC()
	rec := EventRecord{Key: "k", ID: "i", Source: "src", Type: "ty", Subject: "sub", SpecVersion: "1.0",
		DataContentType: "application/json", DataSchema: "schema", EventTime: at, EventTimeMs: 7, ReceivedAt: at.Add(time.Hour),
		ReceivedAtMs: 9, Data: `{"a":1}`, Extensions: `{"x":"y"}`, NATSSubject: "events.a", GeoCountry: "NL", GeoASOrg: "org",
		UABrowser: "Firefox", UAOS: "Linux", UADevice: "Other", Enrichment: `{"plan":"pro"}`, GeoASN: 64500, StreamSeq: 1}
	if err := Insert(ctx, conn, EventsTable(), [][]any{rec.values()}); err != nil {
		t.Fatal(err)
	}
	var cols EventColumns
	for range 2 { // the second time on reset columns
		cols.Reset()
		rec.StreamSeq++
		cols.Append(&rec)
		if err := InsertEvents(ctx, conn, &cols); err != nil {
			t.Fatal(err)
		}
	}
	var rows, distinct uint64
	var org string
	q := `SELECT count(), uniqExact(key, id, source, type, subject, specversion, datacontenttype, dataschema, event_time, event_time_ms,
		received_at, received_at_ms, data, extensions, nats_subject, geo_country, geo_asn, geo_as_org, ua_browser, ua_os, ua_device, enrichment),
		anyIf(geo_as_org, stream_seq = 3) FROM events`
	if err := conn.QueryRow(ctx, q).Scan(&rows, &distinct, &org); err != nil {
		t.Fatal(err)
	}
	if rows != 3 || distinct != 1 || org != "org" {
		t.Fatalf("%d rows, %d distinct, geo_as_org %q; want 3 rows, 1 distinct, org", rows, distinct, org)
	}
}

// An insert sent in several blocks stores every row, and the server squashes the
// blocks into one part: the table sees one insert, not one per block, whatever the
// server's own squashing thresholds (here the query's, at one row: a part a block).
func TestInsertEventsInBlocks(t *testing.T) {
	ctx, conn := migrated(t)
	var cols EventColumns
	for i := range 10 {
		cols.Append(&EventRecord{Key: fmt.Sprint("k", i), ID: fmt.Sprint(i), Data: "{}", StreamSeq: uint64(i + 1),
			EventTime: time.Unix(1_800_000_000, 0), ReceivedAt: time.Unix(1_800_000_000, 0)})
	}
	small := clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"min_insert_block_size_rows": 1}))
	if err := insertEvents(small, conn, &cols, 3, "", nil); err != nil {
		t.Fatal(err)
	}
	var rows, seqs, sum uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(stream_seq), sum(stream_seq) FROM events").Scan(&rows, &seqs, &sum); err != nil {
		t.Fatal(err)
	}
	if rows != 10 || seqs != 10 || sum != 55 {
		t.Fatalf("%d rows, %d sequences summing to %d; want 10, 10, 55", rows, seqs, sum)
	}
	var parts uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM system.parts WHERE database = currentDatabase() AND table = 'events' AND active").Scan(&parts); err != nil {
		t.Fatal(err)
	}
	if parts != 1 {
		t.Fatalf("%d parts after one insert of 4 blocks; want 1", parts)
	}
}

// The same DDL, the sink's column types, its INSERTs and its queries on current
// ClickHouse (26.5, in-process through chDB); the cluster's DDL parses there
// (checkClusterDDL, in this test's chDB session: a chDB session per test is one
// more library start in the test process).
func TestTablesOnCurrentClickHouse(t *testing.T) {
	q, try := chdbtest.SluiceSession(t)
	checkClusterDDL(t, try)
	version := q("SELECT version()")
	t.Logf("ClickHouse %s", version)
	// The settings that keep an insert whole are known here too, and take its values.
	for name, v := range wholeInsertSettings() {
		q(fmt.Sprintf("SET %s = %d", name, v))
		if got := q(fmt.Sprintf("SELECT value FROM system.settings WHERE name = '%s'", name)); got != fmt.Sprint(v) {
			t.Fatalf("setting %s is %q on ClickHouse %s, want %d", name, got, version, v)
		}
	}
	for _, tbl := range Tables() {
		got := map[string]string{}
		for line := range strings.SplitSeq(q("SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = '"+tbl.Name+"'"), "\n") {
			name, typ, _ := strings.Cut(line, "\t")
			got[name] = typ
		}
		names := make([]string, len(tbl.Columns))
		values := make([]string, len(tbl.Columns))
		for i, c := range tbl.Columns {
			if got[c.Name] != c.Type {
				t.Errorf("%s.%s is %q on %s, the sink writes %s", tbl.Name, c.Name, got[c.Name], version, c.Type)
			}
			names[i] = c.Name
			switch c.Type {
			case "String":
				values[i] = "'x'"
			case "DateTime":
				values[i] = "toDateTime('2026-11-21 10:00:00')"
			default:
				values[i] = "7"
			}
		}
		q("INSERT INTO " + tbl.Name + " (" + strings.Join(names, ", ") + ") VALUES (" + strings.Join(values, ", ") + ")")
		if got := q("SELECT stream_seq FROM " + tbl.Name + " WHERE stream_seq >= 1 AND stream_seq <= 9"); got != "7" {
			t.Errorf("replay check on %s = %q", tbl.Name, got)
		}
	}
	if got := q("SELECT count(), uniqExact(key) FROM events"); got != "1\t1" {
		t.Errorf("count, uniqExact = %q", got)
	}
}

func enrichedEvent(i int) []byte {
	e := events.Event{
		ID: fmt.Sprintf("e%d", i), Source: "test", Type: "t", SpecVersion: "1.0",
		Time: time.Date(2026, 11, 21, 10, 0, 0, i*int(time.Millisecond), time.UTC), Key: fmt.Sprintf("k%d", i),
		ReceivedAt: time.Now().UTC(), NATSSubject: "events.test.t", Data: json.RawMessage(`{"i":` + fmt.Sprint(i) + `}`),
	}
	b, _ := e.Marshal()
	return b
}

// A sink that inserted a batch and died before acking it: JetStream redelivers the
// batch, the sink recognises the rows already in the table and acks them without a
// second insert. Every event ends in the table exactly once.
func TestExactlyOnceAfterCrashBetweenInsertAndAck(t *testing.T) {
	_, nc, js, conn := setup(t)
	ctx := context.Background()
	if err := chmigrate.Migrate(ctx, conn, testLog); err != nil {
		t.Fatal(err)
	}
	// A short ack wait so the "dead" sink's batch comes back quickly.
	topo, _ := streams.Load()
	cc, _ := topo.Consumer(streams.Enriched, "sink")
	cc.AckWait = time.Second
	if _, err := js.CreateOrUpdateConsumer(ctx, streams.Enriched, *cc); err != nil {
		t.Fatal(err)
	}
	const total, crashed = 1000, 400
	for i := range total {
		if _, err := js.Publish(ctx, "enriched.test.t", enrichedEvent(i)); err != nil {
			t.Fatal(err)
		}
	}
	// The first sink: takes a batch, inserts it, and dies before the acks.
	cons, err := js.Consumer(ctx, streams.Enriched, "sink")
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.FetchNoWait(crashed)
	if err != nil {
		t.Fatal(err)
	}
	m := newMetrics(prometheus.NewRegistry())
	events := EventsTable()
	first := &writer{cfg: DefaultConfig(), table: events, into: events, js: js, ch: conn, m: m, ready: &telemetry.Readiness{}, log: testLog}
	var rows [][]any
	for msg := range batch.Messages() {
		row, err := first.table.Row(msg, seqOf(t, msg))
		if err != nil {
			t.Fatal(err)
		}
		rows = append(rows, row.Values)
	}
	if len(rows) != crashed {
		t.Fatalf("fetched %d, want %d", len(rows), crashed)
	}
	if err := first.insert(ctx, rows, nil); err != nil {
		t.Fatal(err)
	}
	// The restarted sink.
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	reg := prometheus.NewRegistry()
	done := make(chan error, 1)
	go func() {
		done <- Run(runCtx, DefaultConfig(), Deps{NATS: nc, ClickHouse: conn, Logger: testLog, Registerer: reg, Ready: &telemetry.Readiness{}})
	}()
	poll.Until(t, time.Minute, func() error { return natstest.Idle(ctx, js, streams.Enriched, "sink") })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var count, unique uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(key) FROM events").Scan(&count, &unique); err != nil {
		t.Fatal(err)
	}
	if count != total || unique != total {
		t.Fatalf("count()=%d uniqExact(key)=%d, want %d each", count, unique, total)
	}
	replays := testutil.ToFloat64(newMetrics(reg).replays.WithLabelValues("events"))
	if replays != crashed {
		t.Fatalf("replays recognised = %v, want %d", replays, crashed)
	}
}

// A message that cannot be a row goes to the DLQ with the reason, and the rest of
// its batch lands.
func TestBadRowGoesToDLQ(t *testing.T) {
	_, nc, js, conn := setup(t)
	ctx := context.Background()
	for i := range 10 {
		if _, err := js.Publish(ctx, "enriched.test.t", enrichedEvent(i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := js.Publish(ctx, "enriched.test.t", []byte(`{"id": 1}`)); err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- Run(runCtx, DefaultConfig(), Deps{NATS: nc, ClickHouse: conn, Logger: testLog, Registerer: prometheus.NewRegistry(), Ready: &telemetry.Readiness{}})
	}()
	poll.Until(t, time.Minute, func() error {
		var events, dead uint64
		if err := conn.QueryRow(ctx, "SELECT (SELECT count() FROM events), (SELECT count() FROM dead_letters)").Scan(&events, &dead); err != nil {
			return err
		}
		if events != 10 || dead != 1 {
			return fmt.Errorf("events %d, dead letters %d", events, dead)
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var reason, stage string
	if err := conn.QueryRow(ctx, "SELECT reason, stage FROM dead_letters").Scan(&reason, &stage); err != nil {
		t.Fatal(err)
	}
	if stage != "sink" || !strings.Contains(reason, "cannot be a row of events") {
		t.Fatalf("dead letter stage %q reason %q", stage, reason)
	}
}

func seqOf(t *testing.T, msg jetstream.Msg) uint64 {
	t.Helper()
	md, err := msg.Metadata()
	if err != nil {
		t.Fatal(err)
	}
	return md.Sequence.Stream
}

// A row ClickHouse refuses (here a materialized column that throws on it) goes to
// the DLQ with ClickHouse's error, and the rest of its batch lands, once.
func TestRowRefusedByClickHouseIsIsolated(t *testing.T) {
	_, nc, js, conn := setup(t)
	ctx := context.Background()
	if err := chmigrate.Migrate(ctx, conn, testLog); err != nil {
		t.Fatal(err)
	}
	if err := conn.Exec(ctx, "ALTER TABLE events ADD COLUMN guard UInt8 MATERIALIZED throwIf(id = 'e500')"); err != nil {
		t.Fatal(err)
	}
	const total = 1000
	if err := natstest.PublishAll(ctx, js, "enriched.test.t", 0, total, enrichedEvent); err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	reg := prometheus.NewRegistry()
	go func() {
		done <- Run(runCtx, DefaultConfig(), Deps{NATS: nc, ClickHouse: conn, Logger: testLog, Registerer: reg, Ready: &telemetry.Readiness{}})
	}()
	poll.Until(t, time.Minute, func() error {
		var events, dead uint64
		if err := conn.QueryRow(ctx, "SELECT (SELECT count() FROM events), (SELECT count() FROM dead_letters)").Scan(&events, &dead); err != nil {
			return err
		}
		if events != total-1 || dead != 1 {
			return fmt.Errorf("events %d, dead letters %d", events, dead)
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var unique uint64
	if err := conn.QueryRow(ctx, "SELECT uniqExact(key) FROM events").Scan(&unique); err != nil {
		t.Fatal(err)
	}
	if unique != total-1 {
		t.Fatalf("uniqExact(key) = %d, want %d", unique, total-1)
	}
	var reason, payload string
	if err := conn.QueryRow(ctx, "SELECT reason, payload FROM dead_letters").Scan(&reason, &payload); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(reason, "ClickHouse refused the row for events") || !strings.Contains(reason, "throwIf") || !strings.Contains(payload, `"id":"e500"`) {
		t.Fatalf("dead letter reason %q payload %.60q", reason, payload)
	}
}

// ClickHouse stops mid-stream: the sink stops acking, reports not ready, and when
// ClickHouse is back it drains the backlog by itself; every event lands once.
func TestClickHouseOutage(t *testing.T) {
	srv, nc, js, conn := setup(t)
	ctx := context.Background()
	publish := func(from, to int) {
		t.Helper()
		if err := natstest.PublishAll(ctx, js, "enriched.test.t", from, to, enrichedEvent); err != nil {
			t.Fatal(err)
		}
	}
	publish(0, 20_000)
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	ready := &telemetry.Readiness{}
	reg := prometheus.NewRegistry()
	go func() {
		done <- Run(runCtx, DefaultConfig(), Deps{NATS: nc, ClickHouse: conn, Logger: testLog, Registerer: reg, Ready: ready})
	}()
	count := func() (uint64, error) {
		var n uint64
		err := conn.QueryRow(ctx, "SELECT count() FROM events").Scan(&n)
		return n, err
	}
	poll.Until(t, time.Minute, func() error {
		if n, err := count(); err != nil || n == 0 {
			return fmt.Errorf("%d rows, %v", n, err)
		}
		return nil
	})
	dir := srv.Dir
	_, portText, _ := net.SplitHostPort(srv.Addr)
	port, _ := strconv.Atoi(portText)
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	publish(20_000, 40_000)
	poll.Until(t, time.Minute, func() error {
		if ready.Check() == nil {
			return errors.New("still ready while ClickHouse is down")
		}
		return nil
	})
	cons, err := js.Consumer(ctx, streams.Enriched, "sink")
	if err != nil {
		t.Fatal(err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.NumAckPending > info.Config.MaxAckPending {
		t.Fatalf("%d unacked, over MaxAckPending %d", info.NumAckPending, info.Config.MaxAckPending)
	}
	srv2, err := chserver.Start(ctx, dir, port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv2.Stop() })
	poll.Until(t, 2*time.Minute, func() error {
		n, err := count()
		if err != nil || n < 40_000 {
			return fmt.Errorf("%d rows, %v (ready: %v)", n, err, ready.Check())
		}
		return ready.Check()
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	var n, unique uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(key) FROM events").Scan(&n, &unique); err != nil {
		t.Fatal(err)
	}
	if n != 40_000 || unique != 40_000 {
		t.Fatalf("count()=%d uniqExact(key)=%d, want 40000", n, unique)
	}
	if got := testutil.ToFloat64(newMetrics(reg).errors.WithLabelValues("events", "connection")); got == 0 {
		t.Fatal("no connection errors counted during the outage")
	}
}

// setup starts an embedded JetStream server with the topology applied and a
// clickhouse-server with a fresh database.
func setup(t *testing.T) (*chserver.Server, *nats.Conn, jetstream.JetStream, driver.Conn) {
	t.Helper()
	ns := natstest.Run(t)
	srv := chtest.Start(t)
	_, conn := chtest.Database(t, srv)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	return srv, nc, js, conn
}
