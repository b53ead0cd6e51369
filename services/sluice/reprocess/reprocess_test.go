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

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chcluster"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chdb/chdbtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/settings"
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
	replayAfterFix(t, func(cfgPath string) (*platformtest.Platform, []driver.Conn) {
		p := platformtest.Start(t, cfgPath, nil)
		return p, []driver.Conn{p.DB(t)}
	})
}

// The same on a ClickHouse cluster of 2 shards × 2 replicas (18.16, ZooKeeper):
// the pipeline's 4 partitions write to both shards; the replay swaps each month
// on each shard, while live events of the months go on being inserted. Read
// through the Distributed table the outcome is the one server's; no node keeps a
// table or a hold of the run.
func TestReplayOnCluster(t *testing.T) {
	replayAfterFix(t, onCluster(t, chcluster.Start(t, 2, 2)))
}

// A replay on a cluster needs every replica of a shard it swaps: with one down,
// it stops at that shard's hold with an error that says so and leaves every
// event once (the shards before it swapped, the others not); with the replica
// back, the next run swaps the rest.
func TestReplayNeedsEveryReplica(t *testing.T) {
	c := chcluster.Start(t, 2, 2)
	f := newFixture(t, onCluster(t, c))
	const n = 400
	for i := range n {
		f.publish(fmt.Sprintf("a-%d", i), 11)
	}
	poll.Until(t, 2*time.Minute, func() error {
		if rows, _, _ := f.plansOf("a-"); rows != n {
			return fmt.Errorf("%d of %d rows", rows, n)
		}
		return nil
	})
	f.fix()
	down := c.Nodes[1][1]
	if err := down.Kill(); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := f.run("replay", "--from", "1", "--hold-ttl", "6s")
	if code == 0 || !strings.Contains(errOut, "shard 2") || !strings.Contains(errOut, "replica 2 of the shard did not fetch the hold") {
		t.Fatalf("replay with a replica down: exit %d\n%s%s", code, out, errOut)
	}
	if rows, unique, pro := f.plansOf("a-"); rows != n || unique != n || pro == 0 || pro == n {
		t.Fatalf("after the failed replay: %d rows, %d keys, %d fixed; want %d rows and keys, the first shard's fixed", rows, unique, pro, n)
	}
	if err := down.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = f.run("replay", "--from", "1")
	if code != 0 {
		t.Fatalf("replay with every replica up: exit %d\n%s%s", code, out, errOut)
	}
	poll.Until(t, time.Minute, func() error {
		if rows, unique, pro := f.plansOf("a-"); rows != n || unique != n || pro != n {
			return fmt.Errorf("%d rows, %d keys, %d fixed; want %d of each", rows, unique, pro, n)
		}
		return nil
	})
}

// onCluster starts the platform writing to cluster c; its nodes are each of c's
// servers.
func onCluster(t *testing.T, c *chcluster.Cluster) func(cfgPath string) (*platformtest.Platform, []driver.Conn) {
	return func(cfgPath string) (*platformtest.Platform, []driver.Conn) {
		p := platformtest.StartOn(t, cfgPath, nil, settings.ClickHouse{Addr: c.Nodes[0][0].Addr, Database: "sluice", User: "default", Cluster: chcluster.Name}, 4)
		p.DB(t) // the migrations applied
		var nodes []driver.Conn
		for _, row := range c.Nodes {
			for _, n := range row {
				conn, err := chconn.Open(context.Background(), settings.ClickHouse{Addr: n.Addr, Database: "sluice", User: "default"})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { _ = conn.Close() })
				nodes = append(nodes, conn)
			}
		}
		return p, nodes
	}
}

// fixture is a platform with the config above, its plans table, and `sluice`
// run against it.
type fixture struct {
	t     *testing.T
	plans string
	p     *platformtest.Platform
	nc    *nats.Conn
	js    jetstream.JetStream
	db    driver.Conn   // the platform's ClickHouse, read as users do
	nodes []driver.Conn // every ClickHouse server, db's first
	env   map[string]string
}

// newFixture writes the config (every user on the free plan) and runs the
// platform with start.
func newFixture(t *testing.T, start func(cfgPath string) (*platformtest.Platform, []driver.Conn)) *fixture {
	dir := t.TempDir()
	f := &fixture{t: t, plans: filepath.Join(dir, "plans.csv")}
	f.writePlans("free")
	cfgPath := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte(fmt.Sprintf(config, f.plans)), 0o644); err != nil {
		t.Fatal(err)
	}
	f.p, f.nodes = start(cfgPath)
	f.db = f.nodes[0]
	f.nc, f.js = f.p.Connect(t)
	f.env = map[string]string{"NATS_URL": f.p.NATSURL, "CLICKHOUSE_ADDR": f.p.ClickHouse.Addr, "CLICKHOUSE_DATABASE": f.p.ClickHouse.Database, "SLUICE_CONFIG": cfgPath}
	if f.p.ClickHouse.Cluster != "" {
		f.env["CLICKHOUSE_CLUSTER"] = f.p.ClickHouse.Cluster
	}
	return f
}

func (f *fixture) writePlans(plan string) {
	f.t.Helper()
	var b strings.Builder
	b.WriteString("id,plan\n")
	for u := range 10 {
		fmt.Fprintf(&b, "u%d,%s\n", u, plan)
	}
	if err := os.WriteFile(f.plans, []byte(b.String()), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

// publish publishes a page view of id in month of 2026 (user u<len(id)%10>).
func (f *fixture) publish(id string, month int) {
	f.t.Helper()
	ev := map[string]any{"specversion": "1.0", "id": id, "source": "web", "type": "page.view",
		"time": time.Date(2026, time.Month(month), 10, 12, 0, 0, 0, time.UTC).Format(time.RFC3339), "data": map[string]any{"user": fmt.Sprintf("u%d", len(id)%10)}}
	b, _ := json.Marshal(ev)
	if err := f.nc.Publish("events.web.page.view", b); err != nil {
		f.t.Error(err)
	}
}

// plansOf counts the rows of the events whose id begins with prefix, their keys,
// and those with the pro plan.
func (f *fixture) plansOf(prefix string) (rows, unique, pro uint64) {
	f.t.Helper()
	_ = f.db.QueryRow(context.Background(), "SELECT count(), uniqExact(key), countIf(visitParamExtractString(enrichment, 'user_plan') = 'pro') FROM events WHERE id LIKE ?", prefix+"%").Scan(&rows, &unique, &pro)
	return
}

// fix puts every user on the pro plan, and waits for a probe event that shows the
// pipeline has it.
func (f *fixture) fix() {
	f.writePlans("pro")
	poll.Until(f.t, time.Minute, func() error {
		f.publish(fmt.Sprintf("probe-%d", time.Now().UnixNano()), 11)
		if _, _, pro := f.plansOf("probe-"); pro == 0 {
			return fmt.Errorf("no probe with the fixed plan yet")
		}
		return nil
	})
}

// run runs `sluice args...` against the platform.
func (f *fixture) run(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := cli.Main(args, cli.IO{Env: func(k string) (string, bool) { v, ok := f.env[k]; return v, ok }, Stdout: &out, Stderr: &errOut})
	return code, out.String(), errOut.String()
}

// replayAfterFix runs the scenario on the platform start runs.
func replayAfterFix(t *testing.T, start func(cfgPath string) (*platformtest.Platform, []driver.Conn)) {
	f := newFixture(t, start)
	publish, plansOf, run, db, nodes, js := f.publish, f.plansOf, f.run, f.db, f.nodes, f.js
	ctx := context.Background()
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
	f.fix()

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
	t.Logf("replay:\n%s%s", out, errOut)
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
	// (On a cluster a replica may still be fetching the swap's parts: read until
	// the one the Distributed table reads has them.)
	poll.Until(t, time.Minute, func() error {
		for _, prefix := range []string{"a-", "b-"} {
			if rows, unique, pro := plansOf(prefix); rows != n || unique != n || pro != n {
				return fmt.Errorf("%s events: %d rows, %d keys, %d with the fixed plan; want %d of each", prefix, rows, unique, pro, n)
			}
		}
		return nil
	})
	var total, keys uint64
	if err := db.QueryRow(ctx, "SELECT count(), uniqExact(key) FROM events").Scan(&total, &keys); err != nil {
		t.Fatal(err)
	}
	if total != keys {
		t.Fatalf("events: %d rows for %d keys", total, keys)
	}
	var dead uint64
	if err := db.QueryRow(ctx, "SELECT count() FROM dead_letters").Scan(&dead); err != nil {
		t.Fatal(err)
	}
	if dead != 0 {
		t.Fatalf("%d dead letters; a held month's inserts must be retried, not dead-lettered", dead)
	}
	for i, node := range nodes {
		var leftover, held uint64
		if err := node.QueryRow(ctx, "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name LIKE 'sluice\\_replay\\_%'").Scan(&leftover); err != nil {
			t.Fatal(err)
		}
		// A cluster's holds are its shard's: every replica fetched the release.
		poll.Until(t, time.Minute, func() error {
			if err := node.QueryRow(ctx, "SELECT count() FROM (SELECT month FROM events_holds GROUP BY month, hold HAVING argMax(until, seq) > now())").Scan(&held); err != nil {
				return err
			}
			if held != 0 {
				return fmt.Errorf("node %d: %d holds", i, held)
			}
			return nil
		})
		if leftover != 0 {
			t.Fatalf("after the replay: node %d keeps %d of its tables", i, leftover)
		}
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
// filled and swapped in by REPLACE PARTITION, as a run does it on one server; then
// again with a shadow of the engine a run gives it on a cluster (made AS the local
// table with the plain engine of the migrations).
func TestSwapOnCurrentClickHouse(t *testing.T) {
	q := chdbtest.Sluice(t)
	ms, err := chmigrate.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	plain, err := chmigrate.PlainEngine(ms, "events")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(plain, "ENGINE = MergeTree()") || !strings.Contains(plain, "PARTITION BY toYYYYMM(event_time)") {
		t.Fatalf("the plain engine of events: %q", plain)
	}
	for _, k := range []string{"a", "b", "c"} {
		q("INSERT INTO events (key, enrichment, event_time, stream_seq) VALUES ('" + k + "', 'old', toDateTime('2026-11-21 10:00:00'), 1)")
	}
	for i, engine := range []string{"", plain} {
		key, value := []string{"b", "c"}[i], []string{"new", "newer"}[i]
		x := fmt.Sprintf("sluice_replay_x%d_", i)
		q("CREATE TABLE " + x + "keys (key String) ENGINE = Memory")
		q("INSERT INTO " + x + "keys (key) VALUES ('" + key + "')")
		q("CREATE TABLE " + x + "shadow AS events " + engine)
		q("INSERT INTO " + x + "shadow SELECT * FROM events WHERE toYYYYMM(event_time) = 202611 AND key NOT IN (SELECT key FROM " + x + "keys)")
		q("INSERT INTO " + x + "shadow (key, enrichment, event_time, stream_seq) VALUES ('" + key + "', '" + value + "', toDateTime('2026-11-21 10:00:00'), 1)")
		// replacePartition's statements.
		q("SYSTEM STOP MERGES events")
		if n := q("SELECT count() FROM system.merges WHERE database = currentDatabase() AND table = 'events'"); n != "0" {
			t.Fatalf("%s merges of events running after SYSTEM STOP MERGES", n)
		}
		q("ALTER TABLE events REPLACE PARTITION 202611 FROM " + x + "shadow")
		q("SYSTEM START MERGES events")
	}
	if got := q("SELECT groupArray(concat(key, ':', enrichment)) FROM (SELECT key, enrichment FROM events ORDER BY key)"); got != "['a:old','b:new','c:newer']" {
		t.Fatalf("events after the swaps: %s", got)
	}
}
