package status

import (
	"strings"
	"testing"

	"github.com/sluicehq/sluice/services/kit/chdb/chdbtest"
	"github.com/sluicehq/sluice/services/sink"
)

// The queries status runs, on current ClickHouse (26.5, in-process through chDB),
// against the tables the migrations make (TestCollect runs them on 18.16).
func TestQueriesOnCurrentClickHouse(t *testing.T) {
	q := chdbtest.Sluice(t)
	q(`INSERT INTO dead_letters (stage, reason, received_at, stream_seq) VALUES
 ('pipeline', 'bad', now(), 1), ('pipeline', 'bad', now(), 2), ('sink', 'worse', now(), 3), ('pipeline', 'old', now() - 7200, 4)`)
	q(`INSERT INTO alerts (fingerprint, rule, status, starts_at, stream_seq) VALUES
 ('a', 'r1', 'firing', now(), 1), ('a', 'r1', 'resolved', now(), 2), ('b', 'r1', 'firing', now(), 3), ('c', 'r2', 'firing', now(), 4)`)
	if got := q(lastInsertQuery + "dead_letters"); !strings.HasPrefix(got, "4\t") {
		t.Fatalf("last insert: %q", got)
	}
	if got, want := q(deadLettersQuery), "pipeline\tbad\t2\nsink\tworse\t1"; got != want {
		t.Fatalf("dead letters:\n%s\nwant\n%s", got, want)
	}
	if got, want := q(firingQuery), "r1\t1\nr2\t1"; got != want {
		t.Fatalf("firing:\n%s\nwant\n%s", got, want)
	}
	// Two holds of one month and one released: one month held.
	q(`INSERT INTO events_holds (month, hold, until, seq) VALUES
 (202611, 'a', now() + 60, 1), (202611, 'b', now() + 60, 1), (202610, 'c', now() + 60, 1), (202610, 'c', toDateTime(0), 2)`)
	if got := q(sink.HeldMonthsQuery); got != "[202611]" {
		t.Fatalf("held: %s, want [202611]", got)
	}
	// One part per insert and partition (merges stopped, so that none joins them):
	// three inserts of alerts, the most for one partition.
	q("SYSTEM STOP MERGES alerts")
	q(`INSERT INTO alerts (fingerprint, rule, status, starts_at, stream_seq) VALUES ('d', 'r2', 'firing', now(), 5)`)
	q(`INSERT INTO alerts (fingerprint, rule, status, starts_at, stream_seq) VALUES ('e', 'r2', 'firing', now(), 6)`)
	if got := strings.Split(q(mostPartsQuery), "\t"); len(got) != 3 || got[0] != "alerts" || got[2] != "3" {
		t.Fatalf("most parts: %q, want alerts' partition with 3", got)
	}
}
