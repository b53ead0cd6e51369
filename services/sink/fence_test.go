package sink

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/chdb/chdbtest"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/poll"
)

// migrated is a new database on a ClickHouse server of the test's own, with every
// migration applied.
func migrated(t testing.TB) (context.Context, driver.Conn) {
	t.Helper()
	_, conn := chtest.Database(t, chtest.Start(t))
	ctx := context.Background()
	if err := chmigrate.Migrate(ctx, conn, testLog); err != nil {
		t.Fatal(err)
	}
	return ctx, conn
}

func fenceRows(keys ...string) *EventColumns {
	var cols EventColumns
	for i, k := range keys {
		cols.Append(&EventRecord{Key: k, ID: k, Data: "{}", StreamSeq: uint64(i + 1),
			EventTime: time.Unix(1_800_000_000, 0), ReceivedAt: time.Unix(1_800_000_000, 0)})
	}
	return &cols
}

// An owner's inserts store rows until a later owner of the partition records its
// generation; from then on they store nothing, while the new owner's do, and
// another partition's owner is not affected. A generation older than the one
// recorded is refused with the reason.
func TestFenceDropsAnEarlierOwnersInserts(t *testing.T) {
	ctx, conn := migrated(t)
	old, _, err := NewFence(ctx, conn, 3, 10, "w1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	other, _, err := NewFence(ctx, conn, 4, 11, "w1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := InsertEventsFenced(ctx, conn, fenceRows("a1", "a2"), old); err != nil {
		t.Fatal(err)
	}
	next, _, err := NewFence(ctx, conn, 3, 12, "w2", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// The earlier owner's insert succeeds as far as it can tell, and stores nothing.
	if err := InsertEventsFenced(ctx, conn, fenceRows("late1", "late2"), old); err != nil {
		t.Fatal(err)
	}
	if err := InsertEventsFenced(ctx, conn, fenceRows("b1"), next); err != nil {
		t.Fatal(err)
	}
	if err := InsertEventsFenced(ctx, conn, fenceRows("c1"), other); err != nil {
		t.Fatal(err)
	}
	var keys []string
	if err := conn.QueryRow(ctx, "SELECT groupArray(key) FROM (SELECT key FROM events ORDER BY key)").Scan(&keys); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(keys, " "); got != "a1 a2 b1 c1" {
		t.Fatalf("events holds %q; want the rows of the newest generation of each partition: a1 a2 b1 c1", got)
	}
	_, _, err = NewFence(ctx, conn, 3, 11, "w3", time.Second)
	if err == nil || !strings.Contains(err.Error(), "records generation 12, newer than this claim's 11") {
		t.Fatalf("fencing with an older generation: %v; want the refusal naming both", err)
	}
}

// A fence waits for the inserts an earlier owner has running when it records its
// generation (one that has all its rows may be storing them), up to its settle
// time. An insert still waiting for its data when the generation was recorded
// stores nothing when it ends.
func TestFenceWaitsForRunningInserts(t *testing.T) {
	ctx, conn := migrated(t)
	old, _, err := NewFence(ctx, conn, 0, 5, "w1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// An insert that has sent a block and not its end: running in the server.
	open := func(key string) driver.Batch {
		b, err := conn.PrepareBatch(keepInsertWhole(old.Context(ctx)), "INSERT INTO "+fencedEvents+" (key, stream_seq, partition, gen)")
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Append(key, uint64(1), uint32(0), uint64(5)); err != nil {
			t.Fatal(err)
		}
		if err := b.Flush(); err != nil {
			t.Fatal(err)
		}
		return b
	}
	type result struct {
		running uint64
		err     error
	}
	fence := func(gen uint64, settle time.Duration) <-chan result {
		out := make(chan result, 1)
		go func() {
			_, running, err := NewFence(ctx, conn, 0, gen, "w2", settle)
			out <- result{running, err}
		}()
		return out
	}
	recorded := func(gen uint64) {
		t.Helper()
		poll.Until(t, time.Minute, func() error {
			var n uint64
			if err := conn.QueryRow(ctx, "SELECT count() FROM "+FenceTable+" WHERE gen = ?", gen).Scan(&n); err != nil {
				return err
			}
			if n != 1 {
				return fmt.Errorf("generation %d not recorded", gen)
			}
			return nil
		})
	}

	// Ended while the fence waits: the fence returns with none running.
	b := open("ended")
	fenced := fence(6, time.Minute)
	recorded(6)
	// Recorded, the fence still waits while the insert runs (it polls every 100 ms;
	// a second is ten polls that each saw the insert).
	select {
	case r := <-fenced:
		t.Fatalf("the fence returned (%+v) while an earlier owner's insert was running", r)
	case <-time.After(time.Second):
	}
	if err := b.Send(); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-fenced:
		if r.err != nil || r.running != 0 {
			t.Fatalf("fence after the insert ended: %+v; want none running", r)
		}
	case <-time.After(time.Minute):
		t.Fatal("the fence still waits after the insert ended")
	}

	// Still open after the settle time: the fence returns and says so.
	b = open("stalled")
	start := time.Now()
	r := <-fence(7, 500*time.Millisecond)
	if r.err != nil || r.running != 1 || time.Since(start) < 500*time.Millisecond {
		t.Fatalf("fence with an insert open past its settle time: %+v after %s; want 1 running after at least 500ms", r, time.Since(start))
	}
	if err := b.Send(); err != nil {
		t.Fatal(err)
	}
	var n uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM events").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 0 {
		t.Fatalf("events holds %d rows; the inserts open across a newer generation's fence must store none", n)
	}
}

// A typed table's rows go through a fence of their own (made by MigrateTyped):
// an earlier owner's stores nothing once a later one fenced the partition. A
// schema with more properties gets its own fenced table beside the first.
func TestTypedTableFence(t *testing.T) {
	ctx, conn := migrated(t)
	v1, err := NewTypedTable("shop.refund", []byte(`{"type":"object","properties":{"order_id":{"type":"string"}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	if err := MigrateTyped(ctx, conn, chmigrate.Target{}, v1); err != nil {
		t.Fatal(err)
	}
	row := func(tbl *TypedTable, key, data string, seq uint64) [][]any { return refundRow(t, tbl, key, data, seq) }
	old, _, err := NewFence(ctx, conn, 0, 10, "w1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := InsertTypedFenced(ctx, conn, v1, row(v1, "k1", `{"order_id":"o1"}`, 1), old); err != nil {
		t.Fatal(err)
	}
	next, _, err := NewFence(ctx, conn, 0, 12, "w2", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := InsertTypedFenced(ctx, conn, v1, row(v1, "late", `{"order_id":"o1"}`, 1), old); err != nil {
		t.Fatal(err)
	}
	if err := InsertTypedFenced(ctx, conn, v1, row(v1, "k2", `{"order_id":"o2"}`, 2), next); err != nil {
		t.Fatal(err)
	}
	v2, err := NewTypedTable("shop.refund", []byte(`{"type":"object","properties":{"order_id":{"type":"string"},"reason":{"type":"string"}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	if err := MigrateTyped(ctx, conn, chmigrate.Target{}, v2); err != nil {
		t.Fatal(err)
	}
	if err := InsertTypedFenced(ctx, conn, v2, row(v2, "k3", `{"order_id":"o3","reason":"r"}`, 3), next); err != nil {
		t.Fatal(err)
	}
	var keys []string
	if err := conn.QueryRow(ctx, "SELECT groupArray(k) FROM (SELECT concat(event_key, ':', ifNull(reason, '-')) AS k FROM shop_refund ORDER BY event_key)").Scan(&keys); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(keys, " "); got != "k1:- k2:- k3:r" {
		t.Fatalf("shop_refund holds %q; want k1:- k2:- k3:r (the late row dropped)", got)
	}
	var tables uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE 'shop\\_refund\\_fence%'").Scan(&tables); err != nil {
		t.Fatal(err)
	}
	if tables != 4 {
		t.Fatalf("%d fenced tables and views of shop_refund; want 4 (two schemas, each a table and a view)", tables)
	}
}

// An owner's fence on ClickHouse 18.16 (here) sends no insert_deduplication_token:
// the server does not know the setting and would refuse every insert that has it
// (which the test shows by sending it anyway). The token is the same for the same
// rows and owner, and differs for other rows, another generation or partition.
func TestDedupTokenByVersion(t *testing.T) {
	ctx, conn := migrated(t)
	f, _, err := NewFence(ctx, conn, 0, 7, "w1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	v, err := conn.ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	if f.tokens {
		t.Fatalf("a fence on ClickHouse %d.%d takes tokens; the setting arrived in 22.2", v.Version.Major, v.Version.Minor)
	}
	if err := InsertEventsFenced(ctx, conn, fenceRows("a1"), f); err != nil {
		t.Fatal(err)
	}
	forced := &Fence{Partition: f.Partition, Gen: f.Gen, prefix: f.prefix, tokens: true}
	if err := InsertEventsFenced(ctx, conn, fenceRows("a2"), forced); err == nil || !strings.Contains(err.Error(), "insert_deduplication_token") {
		t.Fatalf("an insert with the token on %d.%d: %v; want it refused for the setting", v.Version.Major, v.Version.Minor, err)
	}
	same, other := fenceRows("a", "b"), fenceRows("a", "c")
	g8 := &Fence{Partition: 0, Gen: 8, prefix: f.prefix}
	p1 := &Fence{Partition: 1, Gen: 7, prefix: "sluice/" + strings.Split(f.prefix, "/")[1] + "/p1/"}
	if f.token(same) != f.token(fenceRows("a", "b")) {
		t.Fatal("two tokens of the same rows differ")
	}
	for name, tok := range map[string]string{"other rows": f.token(other), "another generation": g8.token(same), "another partition": p1.token(same)} {
		if tok == f.token(same) {
			t.Fatalf("the token of %s is the same: %s", name, tok)
		}
	}
}

// The token on current ClickHouse (26.5 through chDB; its tables are not
// replicated, so events is given a window of insert hashes as a replicated table
// has): an insert through the fence's Null table and view sent again with the same
// token is stored once, though its view stamps another inserted_at; one with
// another token is stored.
func TestDedupTokenOnCurrentClickHouse(t *testing.T) {
	q := chdbtest.Sluice(t)
	q("ALTER TABLE events MODIFY SETTING non_replicated_deduplication_window = 100")
	q("INSERT INTO partition_fences (partition, gen, worker) VALUES (1, 10, 'w1')")
	f := &Fence{Partition: 1, Gen: 10, prefix: "sluice/sluice/p1/"}
	insert := func(key, token string) {
		q(fmt.Sprintf("INSERT INTO events_fenced (key, stream_seq, event_time, partition, gen) SETTINGS insert_deduplication_token = '%s', deduplicate_blocks_in_dependent_materialized_views = 1 VALUES ('%s', 1, toDateTime('2026-11-21 10:00:00'), 1, 10)", token, key))
	}
	insert("a", f.token(fenceRows("a")))
	q("SELECT sleep(1)") // the retry's inserted_at is another second
	insert("a", f.token(fenceRows("a")))
	insert("b", f.token(fenceRows("b")))
	if got := q("SELECT groupArray(key) FROM (SELECT key FROM events ORDER BY key)"); got != "['a','b']" {
		t.Fatalf("events holds %s; want ['a','b']", got)
	}
	if got := q("SELECT uniqExact(inserted_at) FROM events WHERE key = 'a'"); got != "1" {
		t.Fatalf("%s inserted_at values for a", got)
	}
}

// The fence on current ClickHouse (26.5 through chDB): the same DDL keeps only the
// newest generation's rows.
func TestFenceOnCurrentClickHouse(t *testing.T) {
	q, try := chdbtest.SluiceSession(t)
	insert := func(key string, partition, gen int) {
		q(fmt.Sprintf("INSERT INTO events_fenced (key, stream_seq, event_time, partition, gen) VALUES ('%s', 1, toDateTime('2026-11-21 10:00:00'), %d, %d)", key, partition, gen))
	}
	q("INSERT INTO partition_fences (partition, gen, worker) VALUES (1, 10, 'w1')")
	insert("a", 1, 10)
	q("INSERT INTO partition_fences (partition, gen, worker) VALUES (1, 12, 'w2')")
	insert("late", 1, 10)
	insert("b", 1, 12)
	insert("nofence", 2, 12)
	if got := q("SELECT groupArray(key) FROM (SELECT key FROM events ORDER BY key)"); got != "['a','b']" {
		t.Fatalf("events holds %s; want ['a','b']", got)
	}
	if got := q("SELECT count() FROM events WHERE inserted_at > toDateTime('2020-01-01 00:00:00')"); got != "2" {
		t.Fatalf("inserted_at set on %s rows; want 2", got)
	}
	// A typed table's fence.
	typed, err := NewTypedTable("shop.refund", []byte(`{"type":"object","properties":{"order_id":{"type":"string"}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	q(typed.CreateSQL())
	for _, stmt := range typed.FencedSQL() {
		q(stmt)
	}
	fenced, _ := typed.fencedNames()
	for _, r := range []struct {
		key string
		gen int
	}{{"late", 10}, {"k", 12}} {
		q(fmt.Sprintf("INSERT INTO %s (event_key, event_id, event_source, event_time, event_time_ms, stream_seq, order_id, partition, gen) VALUES ('%s', 'i', 's', toDateTime('2026-11-30 10:00:00'), 0, 1, 'o', 1, %d)", fenced, r.key, r.gen))
	}
	if got := q("SELECT groupArray(event_key) FROM shop_refund"); got != "['k']" {
		t.Fatalf("shop_refund holds %s; want ['k']", got)
	}
	// A held month refuses rows, with the reason; a released one takes them.
	q("INSERT INTO events_holds (month, hold, until, seq) SELECT 202611, 'h', now() + 60, 1")
	if _, err := try("INSERT INTO events_fenced (key, stream_seq, event_time, partition, gen) VALUES ('held', 1, toDateTime('2026-11-21 10:00:00'), 1, 12)"); err == nil || !strings.Contains(err.Error(), "held while sluice replay") {
		t.Fatalf("an insert into a held month: %v; want it refused with the reason", err)
	}
	q("INSERT INTO events_holds (month, hold, until, seq) SELECT 202611, 'h', toDateTime(0), 2")
	insert("released", 1, 12)
	if got := q("SELECT count() FROM events WHERE key IN ('held', 'released')"); got != "1" {
		t.Fatalf("%s rows of the held and released inserts; want 1", got)
	}
}

// A hold on a month makes fenced inserts of its rows fail (the writer retries
// them) and lets other months' through; it waits for an insert begun before it,
// which then fails too; released or expired, the month takes inserts again.
func TestHoldMonth(t *testing.T) {
	ctx, conn := migrated(t)
	f, _, err := NewFence(ctx, conn, 0, 1, "w1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	at := func(key string, month time.Month) *EventColumns {
		var cols EventColumns
		cols.Append(&EventRecord{Key: key, ID: key, Data: "{}", StreamSeq: 1,
			EventTime: time.Date(2026, month, 15, 0, 0, 0, 0, time.UTC), ReceivedAt: time.Now()})
		return &cols
	}
	insert := func(key string, month time.Month) error { return InsertEventsFenced(ctx, conn, at(key, month), f) }
	// An insert begun before the hold: it has sent a row and not its end.
	b, err := conn.PrepareBatch(keepInsertWhole(f.Context(ctx)), "INSERT INTO "+fencedEvents+" (key, stream_seq, event_time, partition, gen)")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Append("open", uint64(1), time.Date(2026, 11, 15, 0, 0, 0, 0, time.UTC), uint32(0), uint64(1)); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	held := make(chan *Hold, 1)
	go func() {
		h, err := HoldMonth(ctx, conn, 202611, "t1", time.Minute)
		if err != nil {
			t.Error(err)
		}
		held <- h
	}()
	select {
	case <-held:
		t.Fatal("the hold did not wait for the insert begun before it")
	case <-time.After(time.Second):
	}
	if err := b.Send(); err == nil || !strings.Contains(err.Error(), "held while sluice replay") {
		t.Fatalf("the insert that ended under the hold: %v; want it refused with the reason", err)
	}
	h := <-held
	if err := insert("nov", time.November); err == nil || !strings.Contains(err.Error(), "held while sluice replay") {
		t.Fatalf("an insert into the held month: %v; want it refused with the reason", err)
	}
	if err := insert("dec", time.December); err != nil {
		t.Fatalf("an insert into another month: %v", err)
	}
	if err := h.Release(ctx); err != nil {
		t.Fatal(err)
	}
	if err := insert("nov", time.November); err != nil {
		t.Fatalf("after the release: %v", err)
	}
	// A hold nobody renews ends by itself.
	if _, err := HoldMonth(ctx, conn, 202611, "t2", 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := insert("nov2", time.November); err == nil {
		t.Fatal("an insert under a fresh hold succeeded")
	}
	poll.Until(t, time.Minute, func() error { return insert("nov2", time.November) })
	var keys []string
	if err := conn.QueryRow(ctx, "SELECT groupArray(key) FROM (SELECT key FROM events ORDER BY key)").Scan(&keys); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(keys, " "); got != "dec nov nov2" {
		t.Fatalf("events holds %q; want dec nov nov2", got)
	}
}

// One replay at a time: a hold is refused, and leaves nothing held, while another
// run's is in force (of any month); once that one ends, it is taken.
func TestOneHoldAtATime(t *testing.T) {
	ctx, conn := migrated(t)
	a, err := HoldMonth(ctx, conn, 202611, "run-a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := HoldMonth(ctx, conn, 202612, "run-b", time.Minute); err == nil || !strings.Contains(err.Error(), "another sluice replay holds month 202611 (hold run-a)") {
		t.Fatalf("a hold while another run holds a month: %v", err)
	}
	held, err := HeldMonths(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(held) != "[202611]" {
		t.Fatalf("held after the refused hold: %v; want only run-a's 202611", held)
	}
	if err := a.Release(ctx); err != nil {
		t.Fatal(err)
	}
	b, err := HoldMonth(ctx, conn, 202612, "run-b", time.Minute)
	if err != nil {
		t.Fatalf("a hold once the other ended: %v", err)
	}
	if err := b.Release(ctx); err != nil {
		t.Fatal(err)
	}
}

// A held month's refusal is retried whole, not taken for rows at fault.
func TestHeldMonthIsNoDataError(t *testing.T) {
	ctx, conn := migrated(t)
	f, _, err := NewFence(ctx, conn, 0, 1, "w1", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	h, err := HoldMonth(ctx, conn, 202611, "t", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = h.Release(ctx) }()
	var cols EventColumns
	cols.Append(&EventRecord{Key: "k", ID: "k", Data: "{}", StreamSeq: 1, EventTime: time.Date(2026, 11, 15, 0, 0, 0, 0, time.UTC), ReceivedAt: time.Now()})
	err = InsertEventsFenced(ctx, conn, &cols, f)
	if err == nil || isDataError(err) {
		t.Fatalf("insert into a held month: %v (data error: %v); want an error that is not the data's", err, isDataError(err))
	}
}

// refundRow is the row of tbl (a shop.refund typed table) for an event of key and
// data at stream sequence seq.
func refundRow(t *testing.T, tbl *TypedTable, key, data string, seq uint64) [][]any {
	t.Helper()
	vals, err := tbl.Values(&events.Event{ID: key, Source: "shop", Type: "shop.refund", Key: key, Time: time.Unix(1_764_000_000, 0), Data: json.RawMessage(data)}, seq)
	if err != nil {
		t.Fatal(err)
	}
	return [][]any{vals}
}
