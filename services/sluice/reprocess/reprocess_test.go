package reprocess_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/chdb/chdbtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/sluice/cli"
	"github.com/sluicehq/sluice/services/sluice/platform/platformtest"
	"github.com/sluicehq/sluice/streams"
)

const config = `enrich:
  reload_interval: 200ms
  tables:
    - name: plans
      file: %s
      key: id
  rules:
    - types: [page.view]
      lookups:
        - {table: plans, from: data.user, to: user}
rules:
  - name: pro-u3
    kind: match
    filter: type == "page.view" && enrichment.user_plan == "pro" && data.user == "u3"
`

// A bad deploy of an enrichment table, fixed and reprocessed: 3,000 page views of
// two months (and 100 repeats) are stored with the wrong plan; the table is fixed; `sluice replay`
// rebuilds them while 3,000 more page views of the same months are published and
// stored. Afterwards every event is in events once, each of the first 3,000 with
// the fixed plan, and no hold or table of the run is left. The rules run on the
// rebuilt events: a match rule on the fixed plan raises its alerts for the first
// 3,000 too, marked replay. A dry run before says what would change and changes
// nothing; a second run finds nothing to change and adds no alert.
func TestReplayAfterEnrichmentFix(t *testing.T) {
	dir := t.TempDir()
	plans := filepath.Join(dir, "plans.csv")
	writePlans := func(plan string) {
		t.Helper()
		var b strings.Builder
		b.WriteString("id,plan\n")
		for u := range 10 {
			fmt.Fprintf(&b, "u%d,%s\n", u, plan)
		}
		if err := os.WriteFile(plans, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	writePlans("free")
	cfgPath := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf(config, plans)), 0o644); err != nil {
		t.Fatal(err)
	}
	p := platformtest.Start(t, cfgPath, nil)
	nc, js := p.Connect(t)
	db := p.DB(t)
	ctx := context.Background()
	publish := func(id string, month int) {
		t.Helper()
		ev := map[string]any{"specversion": "1.0", "id": id, "source": "web", "type": "page.view",
			"time": time.Date(2026, time.Month(month), 10, 12, 0, 0, 0, time.UTC).Format(time.RFC3339), "data": map[string]any{"user": fmt.Sprintf("u%d", len(id)%10)}}
		b, _ := json.Marshal(ev)
		if err := nc.Publish("events.web.page.view", b); err != nil {
			t.Error(err)
		}
	}
	plansOf := func(prefix string) (rows, unique, pro uint64) {
		t.Helper()
		_ = db.QueryRow(ctx, "SELECT count(), uniqExact(key), countIf(visitParamExtractString(enrichment, 'user_plan') = 'pro') FROM events WHERE id LIKE ?", prefix+"%").Scan(&rows, &unique, &pro)
		return
	}
	const n = 3000
	for i := range n {
		publish(fmt.Sprintf("a-%d", i), 10+i%2) // October and November
	}
	// Repeats of the first hundred (dropped by dedup), read by the replay in a later
	// chunk than their firsts: no first occurrence either.
	for i := range 100 {
		publish(fmt.Sprintf("a-%d", i), 10+i%2)
	}
	poll.Until(t, 2*time.Minute, func() error {
		if rows, _, _ := plansOf("a-"); rows != n {
			return fmt.Errorf("%d of %d rows", rows, n)
		}
		return nil
	})
	stream, err := js.Stream(ctx, "EVENTS")
	if err != nil {
		t.Fatal(err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	lastA := info.State.LastSeq

	// The fix, and a probe that shows the pipeline has it.
	writePlans("pro")
	poll.Until(t, time.Minute, func() error {
		publish(fmt.Sprintf("probe-%d", time.Now().UnixNano()), 11)
		if _, _, pro := plansOf("probe-"); pro == 0 {
			return fmt.Errorf("no probe with the fixed plan yet")
		}
		return nil
	})

	env := map[string]string{"NATS_URL": p.NATSURL, "CLICKHOUSE_ADDR": p.ClickHouse.Addr, "CLICKHOUSE_DATABASE": p.ClickHouse.Database, "SLUICE_CONFIG": cfgPath}
	run := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := cli.Main(args, cli.IO{Env: func(k string) (string, bool) { v, ok := env[k]; return v, ok }, Stdout: &out, Stderr: &errOut})
		return code, out.String(), errOut.String()
	}
	// A range after the last message reads nothing.
	code, out, errOut := run("replay", "--from", time.Now().Add(time.Hour).Format(time.RFC3339), "--dry-run")
	if code != 0 || !strings.Contains(out, "read 0 message(s)") {
		t.Fatalf("a range in the future: exit %d\n%s%s", code, out, errOut)
	}
	code, out, errOut = run("replay", "--from", "1", "--to", fmt.Sprint(lastA), "--dry-run")
	if code != 0 || !strings.Contains(out, "month 202610: 1500 row(s) found, would replace 1500") || !strings.Contains(out, "month 202611: 1500 row(s) found, would replace 1500") {
		t.Fatalf("dry run: exit %d\n%s%s", code, out, errOut)
	}
	if _, _, pro := plansOf("a-"); pro != 0 {
		t.Fatalf("the dry run changed %d rows", pro)
	}
	// The ten events of user u3 (ids a-0 to a-9) match the rule with the fixed plan.
	if !strings.Contains(out, "the rules raised 10 alert change(s) on the range's stored events, not published (dry run)") {
		t.Fatalf("dry run, alerts:\n%s", out)
	}
	alertsOf := func(replay int) (n uint64) {
		t.Helper()
		_ = db.QueryRow(ctx, "SELECT count() FROM alerts WHERE rule = 'pro-u3' AND replay = ?", uint8(replay)).Scan(&n)
		return n
	}

	// Live events of the same months while the replay runs.
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range n {
			publish(fmt.Sprintf("b-%d", i), 10+i%2)
			if i%100 == 99 {
				time.Sleep(20 * time.Millisecond) // paces the producer over the replay
			}
		}
	})
	code, out, errOut = run("replay", "--from", "1", "--to", fmt.Sprint(lastA), "--chunk", "1000")
	wg.Wait()
	if code != 0 || !strings.Contains(out, "month 202610") || !strings.Contains(out, "month 202611") ||
		!strings.Contains(out, "the rules raised 10 alert change(s)") {
		t.Fatalf("replay: exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("replay:\n%s", out)
	poll.Until(t, 2*time.Minute, func() error {
		if rows, _, _ := plansOf("b-"); rows != n {
			return fmt.Errorf("%d of %d live rows", rows, n)
		}
		// The replay's ten, marked; the live events' ten (b-0 to b-9), not.
		if replayed, live := alertsOf(1), alertsOf(0); replayed != 10 || live != 10 {
			return fmt.Errorf("%d replayed and %d live alerts", replayed, live)
		}
		return nil
	})
	for _, prefix := range []string{"a-", "b-"} {
		if rows, unique, pro := plansOf(prefix); rows != n || unique != n || pro != n {
			t.Fatalf("%s events: %d rows, %d keys, %d with the fixed plan; want %d of each", prefix, rows, unique, pro, n)
		}
	}
	var total, keys, leftover, held uint64
	if err := db.QueryRow(ctx, "SELECT count(), uniqExact(key) FROM events").Scan(&total, &keys); err != nil {
		t.Fatal(err)
	}
	if total != keys {
		t.Fatalf("events: %d rows for %d keys", total, keys)
	}
	if err := db.QueryRow(ctx, "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE 'sluice\\_replay\\_%'").Scan(&leftover); err != nil {
		t.Fatal(err)
	}
	if err := db.QueryRow(ctx, "SELECT count() FROM (SELECT month FROM events_holds GROUP BY month, hold HAVING argMax(until, seq) > now())").Scan(&held); err != nil {
		t.Fatal(err)
	}
	var dead uint64
	if err := db.QueryRow(ctx, "SELECT count() FROM dead_letters").Scan(&dead); err != nil {
		t.Fatal(err)
	}
	if dead != 0 {
		t.Fatalf("%d dead letters; a held month's inserts must be retried, not dead-lettered", dead)
	}
	if leftover != 0 || held != 0 {
		t.Fatalf("after the replay: %d of its tables and %d holds left", leftover, held)
	}
	code, out, errOut = run("replay", "--from", "1", "--to", fmt.Sprint(lastA))
	if code != 0 || !strings.Contains(out, "month 202611: 1500 row(s) found, replaced 0") {
		t.Fatalf("second replay: exit %d\n%s%s", code, out, errOut)
	}
	// Its alerts are the first's, by id: ALERTS' duplicate window drops them (once
	// the sink has acked all of ALERTS, it has stored all there is).
	poll.Until(t, time.Minute, func() error { return natstest.Idle(ctx, js, streams.Alerts, "sink") })
	if replayed := alertsOf(1); replayed != 10 {
		t.Fatalf("%d replayed alerts after a second replay; want the first's 10", replayed)
	}
}

// The swap on current ClickHouse (26.5 through chDB): a shadow made AS events,
// filled and swapped in by REPLACE PARTITION, as a run does it.
func TestSwapOnCurrentClickHouse(t *testing.T) {
	q := chdbtest.Sluice(t)
	for _, k := range []string{"a", "b", "c"} {
		q("INSERT INTO events (key, enrichment, event_time, stream_seq) VALUES ('" + k + "', 'old', toDateTime('2026-11-21 10:00:00'), 1)")
	}
	q("CREATE TABLE sluice_replay_x_keys (key String) ENGINE = Memory")
	q("INSERT INTO sluice_replay_x_keys (key) VALUES ('b')")
	q("CREATE TABLE sluice_replay_x_shadow AS events")
	q("INSERT INTO sluice_replay_x_shadow SELECT * FROM events WHERE toYYYYMM(event_time) = 202611 AND key NOT IN (SELECT key FROM sluice_replay_x_keys)")
	q("INSERT INTO sluice_replay_x_shadow (key, enrichment, event_time, stream_seq) VALUES ('b', 'new', toDateTime('2026-11-21 10:00:00'), 1)")
	q("ALTER TABLE events REPLACE PARTITION 202611 FROM sluice_replay_x_shadow")
	if got := q("SELECT groupArray(concat(key, ':', enrichment)) FROM (SELECT key, enrichment FROM events ORDER BY key)"); got != "['a:old','b:new','c:old']" {
		t.Fatalf("events after the swap: %s", got)
	}
}
