package sink

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/chdb/chdbtest"
	"github.com/sluicehq/sluice/services/kit/chtest"
)

func orderTable(t *testing.T) *TypedTable {
	t.Helper()
	types, err := events.LoadTypeSchemas()
	if err != nil {
		t.Fatal(err)
	}
	tables, err := NewTypedTables(TypedConfig{Types: []string{"order.created"}, Separator: "_"}, types)
	if err != nil {
		t.Fatal(err)
	}
	return tables[0]
}

func TestTypedTableFromSchema(t *testing.T) {
	tbl := orderTable(t)
	var cols []string
	for _, c := range tbl.Columns {
		cols = append(cols, c.Name+" "+c.Type)
	}
	want := "event_key String, event_id String, event_source String, event_time DateTime, event_time_ms UInt16, stream_seq UInt64, " +
		"amount Float64, currency Nullable(String), customer_country Nullable(String), customer_id Nullable(String), " +
		"items Nullable(Int64), order_id String, skus Array(String), user Nullable(String)"
	if got := strings.Join(cols, ", "); tbl.Name != "order_created" || got != want {
		t.Fatalf("table %s columns:\n%s\nwant\n%s", tbl.Name, got, want)
	}
	e := &events.Event{ID: "o1", Source: "shop", Type: "order.created", Key: "k1", Time: time.Date(2026, 1, 2, 3, 4, 5, 678e6, time.UTC),
		Data: json.RawMessage(`{"order_id":"o1","amount":12.5,"customer":{"country":"NL"},"items":9007199254740993,"skus":["a","b"]}`)}
	vals, err := tbl.Values(e, 42)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]any{}
	for i, c := range tbl.Columns {
		got[c.Name] = vals[i]
	}
	if got["order_id"] != "o1" || got["amount"] != 12.5 || *got["customer_country"].(*string) != "NL" || got["customer_id"].(*string) != nil ||
		*got["items"].(*int64) != 9007199254740993 || strings.Join(got["skus"].([]string), ",") != "a,b" || got["user"].(*string) != nil ||
		got["stream_seq"] != uint64(42) || got["event_key"] != "k1" || got["event_time_ms"] != uint16(678) {
		t.Fatalf("values %v", got)
	}
	for data, reason := range map[string]string{
		`{"order_id":"o1","amount":1,"items":1.5}`:         "property items: 1.5 is not an integer that fits Int64",
		`{"order_id":"o1","amount":1,"items":1e30}`:        "property items: 1e30 is not an integer that fits Int64",
		`{"order_id":"o1","amount":1,"items":1e999999999}`: "property items: 1e999999999 is not an integer that fits Int64",
		`{"order_id":"o1","amount":1,"items":3e2}`:         "",
		`{"amount":1}`: "property order_id: is missing",
		`{"order_id":"o1","amount":1,"skus":["a",2]}`:  "property skus: item 1: is a number, not a string",
		`{"order_id":"o1","amount":1,"skus":[null]}`:   "property skus: item 0 is null",
		`{"order_id":"o1","amount":1,"customer":"NL"}`: "", // not an object: its properties are NULL
	} {
		e.Data = json.RawMessage(data)
		_, err := tbl.Values(e, 1)
		if reason == "" && err != nil || reason != "" && (err == nil || !strings.Contains(err.Error(), reason)) {
			t.Errorf("%s: %v, want %q", data, err, reason)
		}
	}
	e.Data = nil
	if _, err := tbl.Values(e, 1); err == nil || !strings.Contains(err.Error(), "without data has no row in order_created") {
		t.Errorf("no data: %v", err)
	}
	// Schemas that cannot make a table, or make a column twice.
	for schema, reason := range map[string]string{
		`{"type":"string"}`: "has no properties",
		`{"type":"object","properties":{"a_b":{"type":"string"},"a":{"type":"object","properties":{"b":{"type":"integer"}}}}}`: "property a_b and property a.b both make column a_b",
		`{"type":"object","properties":{"stream_seq":{"type":"integer"}}}`:                                                     "property stream_seq and sluice's column both make column stream_seq",
	} {
		if _, err := NewTypedTable("x", []byte(schema), "_"); err == nil || !strings.Contains(err.Error(), reason) {
			t.Errorf("%s: %v, want %q", schema, err, reason)
		}
	}
	if _, err := NewTypedTables(TypedConfig{Types: []string{"no.such"}}, &events.TypeSchemas{}); err == nil || !strings.Contains(err.Error(), `"no.such" has no schema`) {
		t.Errorf("type without a schema: %v", err)
	}
}

// A typed table is created from its schema, gains the columns of new properties,
// and refuses a property whose type changed, naming it; rows go in and read back
// with plain SQL. On ClickHouse 18.16 here, and on current ClickHouse through chDB.
func TestTypedTableMigrations(t *testing.T) {
	srv := chtest.Start(t)
	_, conn := chtest.Database(t, srv)
	ctx := context.Background()
	v1, err := NewTypedTable("shop.refund", []byte(`{"type":"object","required":["order_id"],"properties":{"order_id":{"type":"string"},"amount":{"type":"number"}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	if err := MigrateTyped(ctx, conn, chmigrate.Target{}, v1); err != nil {
		t.Fatal(err)
	}
	e := &events.Event{ID: "r1", Source: "shop", Type: "shop.refund", Key: "k1", Time: time.Unix(1_764_000_000, 0), Data: json.RawMessage(`{"order_id":"o1","amount":3.5}`)}
	vals, err := v1.Values(e, 7)
	if err != nil {
		t.Fatal(err)
	}
	if err := Insert(ctx, conn, v1.Table, [][]any{vals}); err != nil {
		t.Fatal(err)
	}
	v2, err := NewTypedTable("shop.refund", []byte(`{"type":"object","required":["order_id"],"properties":{"order_id":{"type":"string"},"amount":{"type":"number"},"reason":{"type":"string"},"tags":{"type":"array","items":{"type":"integer"}}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	if err := MigrateTyped(ctx, conn, chmigrate.Target{}, v2); err != nil {
		t.Fatal(err)
	}
	e.Key, e.Data = "k2", json.RawMessage(`{"order_id":"o2","amount":1.5,"reason":"late","tags":[1,2]}`)
	if vals, err = v2.Values(e, 8); err != nil {
		t.Fatal(err)
	}
	if err := Insert(ctx, conn, v2.Table, [][]any{vals}); err != nil {
		t.Fatal(err)
	}
	var (
		n      uint64
		sum    float64
		reason string
		tags   uint64
	)
	if err := conn.QueryRow(ctx, "SELECT count(), sum(amount), max(ifNull(reason, '')), sum(length(tags)) FROM shop_refund").Scan(&n, &sum, &reason, &tags); err != nil {
		t.Fatal(err)
	}
	if n != 2 || sum != 5 || reason != "late" || tags != 2 {
		t.Fatalf("count %d, sum %v, reason %q, tags %d", n, sum, reason, tags)
	}
	found, err := Present(ctx, conn, v2.Name, v2.Identity, 1, 9)
	if err != nil || len(found[7]) != 1 || found[7][0] != "k1" || found[8][0] != "k2" {
		t.Fatalf("replay check: %v %v", found, err)
	}
	v3, err := NewTypedTable("shop.refund", []byte(`{"type":"object","properties":{"order_id":{"type":"string"},"amount":{"type":"string"}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	err = MigrateTyped(ctx, conn, chmigrate.Target{}, v3)
	for _, want := range []string{"property amount is Nullable(Float64) in the table and Nullable(String) in the schema", "property order_id is String in the table and Nullable(String)"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("changed types: %v, want it to say %q", err, want)
		}
	}

	// The same DDL and query on current ClickHouse.
	q := chdbtest.Sluice(t)
	for _, stmt := range []string{
		"CREATE DATABASE IF NOT EXISTS typed", "USE typed", orderTable(t).CreateSQL(), v1.CreateSQL(),
		"ALTER TABLE shop_refund ADD COLUMN `reason` Nullable(String)", "ALTER TABLE shop_refund ADD COLUMN `tags` Array(Int64)",
		"INSERT INTO shop_refund (event_key, event_id, event_source, event_time, event_time_ms, stream_seq, amount, order_id, reason, tags) VALUES ('k', 'r', 's', toDateTime('2026-11-30 10:00:00'), 5, 9, 2.5, 'o', NULL, [1,2,3])",
	} {
		q(stmt)
	}
	if out := q("SELECT order_id, sum(amount), sum(length(tags)) FROM shop_refund GROUP BY order_id"); out != "o\t2.5\t3" {
		t.Fatalf("current ClickHouse: %q", out)
	}
}

func BenchmarkTypedValues(b *testing.B) {
	tbl, err := NewTypedTable("page.view", []byte(`{"type":"object","required":["user","session","path"],"properties":{"user":{"type":"string"},"session":{"type":"string"},"path":{"type":"string"},"referrer":{"type":"string"},"ip":{"type":"string"},"ua":{"type":"string"},"duration_ms":{"type":"integer"}}}`), "_")
	if err != nil {
		b.Fatal(err)
	}
	e := &events.Event{ID: "pv-1", Source: "web", Type: "page.view", Key: "k", Time: time.Now(),
		Data: json.RawMessage(`{"duration_ms":1234,"ip":"203.0.113.7","path":"/products/17","referrer":"https://search.example.com/?q=item+7","session":"s-1234","ua":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36","user":"u1234"}`)}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := tbl.Values(e, 1); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkTypedInsert(b *testing.B) {
	tbl, err := NewTypedTable("page.view", []byte(`{"type":"object","required":["user","session","path"],"properties":{"user":{"type":"string"},"session":{"type":"string"},"path":{"type":"string"},"referrer":{"type":"string"},"ip":{"type":"string"},"ua":{"type":"string"},"duration_ms":{"type":"integer"}}}`), "_")
	if err != nil {
		b.Fatal(err)
	}
	_, conn := chtest.Database(b, chtest.Start(b))
	ctx := context.Background()
	if err := MigrateTyped(ctx, conn, chmigrate.Target{}, tbl); err != nil {
		b.Fatal(err)
	}
	e := &events.Event{ID: "pv-1", Source: "web", Type: "page.view", Key: "k", Time: time.Now(),
		Data: json.RawMessage(`{"duration_ms":1234,"ip":"203.0.113.7","path":"/products/17","referrer":"https://search.example.com/?q=item+7","session":"s-1234","ua":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36","user":"u1234"}`)}
	rows := make([][]any, 20_000)
	for i := range rows {
		if rows[i], err = tbl.Values(e, uint64(i)); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := Insert(ctx, conn, tbl.Table, rows); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*len(rows)), "µs/row")
}
