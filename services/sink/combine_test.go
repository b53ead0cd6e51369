package sink

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
)

func keyedRows(prefix string, n int) *EventColumns {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("%s-%d", prefix, i)
	}
	return fenceRows(keys...)
}

// Four partitions insert at once through one Combiner, and a fifth writer still
// holds an earlier owner's fence of partition 1: inserts are combined, every
// current owner's row is stored once and none of the earlier owner's, whichever
// insert its rows went in.
func TestCombinerJoinsPartitions(t *testing.T) {
	ctx, conn := migrated(t)
	stale, _, err := NewFence(ctx, conn, 1, 5, "w0", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var fences []*Fence
	for p := range 4 {
		f, _, err := NewFence(ctx, conn, uint32(p), uint64(10+p), "w1", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		fences = append(fences, f)
	}
	joined := 0
	m := NewCombiner(1000, func() { joined++ })
	const batches, rows = 40, 5
	var wg sync.WaitGroup
	errs := make(chan error, 5*batches)
	for p, f := range append(fences, stale) {
		wg.Go(func() {
			for b := range batches {
				if err := m.Insert(ctx, conn, keyedRows(fmt.Sprintf("w%d-b%d", p, b), rows), f); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if m.Combined() == 0 || uint64(joined) != m.Combined() {
		t.Fatalf("%d combined inserts (onJoin %d); want some, each told", m.Combined(), joined)
	}
	var total, staleRows uint64
	if err := conn.QueryRow(ctx, "SELECT count(), countIf(key LIKE 'w4-%') FROM events").Scan(&total, &staleRows); err != nil {
		t.Fatal(err)
	}
	if total != 4*batches*rows || staleRows != 0 {
		t.Fatalf("events holds %d rows, %d of the earlier owner; want %d, none", total, staleRows, 4*batches*rows)
	}
	t.Logf("%d inserts asked for, %d combined", 5*batches, m.Combined())
}

// A combined insert that ClickHouse refuses for one partition's rows is done again
// part by part: the other partitions' rows are stored, and only the bad part's
// insert fails, with ClickHouse's error.
func TestCombinedDataErrorFailsOnlyItsPart(t *testing.T) {
	ctx, conn := migrated(t)
	// A second view on the fenced table that refuses the row "bad-1", pushed to
	// before events_fence (the server takes a table's views in name order), as a
	// refusal in the view or in events would be: nothing of the block is stored.
	if err := conn.Exec(ctx, "CREATE MATERIALIZED VIEW a_guard ENGINE = Null AS SELECT throwIf(id = 'bad-1') AS refused FROM "+fencedEvents); err != nil {
		t.Fatal(err)
	}
	var run []*request
	for p, prefix := range []string{"good", "bad", "fine"} {
		f, _, err := NewFence(ctx, conn, uint32(p), 1, "w1", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		run = append(run, &request{c: keyedRows(prefix, 3), f: f})
	}
	m := NewCombiner(1000, nil)
	errs := m.insertGroup(ctx, conn, &lane{}, run)
	if errs[0] != nil || errs[2] != nil || errs[1] == nil || !isDataError(errs[1]) {
		t.Fatalf("outcomes %v; want only the second refused for its data", errs)
	}
	var keys []string
	if err := conn.QueryRow(ctx, "SELECT groupArray(key) FROM (SELECT key FROM events ORDER BY key)").Scan(&keys); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(keys, " "); got != "fine-0 fine-1 fine-2 good-0 good-1 good-2" {
		t.Fatalf("events holds %q", got)
	}
}

// A partition's next owner (or its owner's next run) waits for a combined insert
// that holds the partition's rows and runs when it records its generation, as for
// the partition's own; not for one that holds only other partitions' rows.
func TestFenceWaitsForCombinedInsert(t *testing.T) {
	ctx, conn := migrated(t)
	var db string
	if err := conn.QueryRow(ctx, "SELECT currentDatabase()").Scan(&db); err != nil {
		t.Fatal(err)
	}
	// The patterns, against the ids of single and combined inserts.
	for _, c := range []struct {
		id      string
		waited  bool
		comment string
	}{
		{"sluice/" + db + "/p3/g5/17", true, "the partition's own, earlier generation"},
		{"sluice/" + db + "/p3/g7/17", true, "the same generation's: a run of the same claim before this one"},
		{"sluice/" + db + "/p1/g5/p3/g6/c2", true, "combined, with the partition"},
		{"sluice/" + db + "/p3/g6/p1/g5/c2", true, "combined, the partition first"},
		{"sluice/" + db + "/p1/g5/p3/g7/c2", true, "combined, with the same generation's"},
		{"sluice/" + db + "/p13/g5/p23/g5/c2", false, "combined, other partitions whose numbers end in 3"},
		{"sluice/" + db + "/p13/g5/17", false, "another partition"},
		{"sluice/" + db + "x/p3/g5/17", false, "another database"},
	} {
		var waited uint8
		if err := conn.QueryRow(ctx, "SELECT ? LIKE ?", c.id, runningLike(db, 3)).Scan(&waited); err != nil {
			t.Fatal(err)
		}
		if (waited == 1) != c.waited {
			t.Errorf("%s (%s): waited for %v, want %v", c.id, c.comment, waited == 1, c.waited)
		}
	}
	// A combined insert open in the server (a block sent, not its end).
	b, err := conn.PrepareBatch(keepInsertWhole(clickhouse.Context(ctx, clickhouse.WithQueryID("sluice/"+db+"/p0/g5/p1/g6/c1"))),
		"INSERT INTO "+fencedEvents+" (key, stream_seq, partition, gen)")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Append("open", uint64(1), uint32(1), uint64(6)); err != nil {
		t.Fatal(err)
	}
	if err := b.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, running, err := NewFence(ctx, conn, 2, 8, "w2", 300*time.Millisecond); err != nil || running != 0 {
		t.Fatalf("fencing partition 2: %d running, %v; want none", running, err)
	}
	if _, running, err := NewFence(ctx, conn, 1, 8, "w2", 300*time.Millisecond); err != nil || running != 1 {
		t.Fatalf("fencing partition 1: %d running, %v; want the combined insert", running, err)
	}
	if err := b.Send(); err != nil {
		t.Fatal(err)
	}
}
