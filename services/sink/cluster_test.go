package sink

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chcluster"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/telemetry"
)

// clusterNode opens database db on a node of the cluster.
func clusterNode(t *testing.T, n *chcluster.Node, db string) driver.Conn {
	t.Helper()
	conn, err := chconn.Open(context.Background(), settings.ClickHouse{Addr: n.Addr, Database: db, User: "default"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// Migrations on a 2 × 2 cluster (ClickHouse 18.16, ZooKeeper): every node holds
// every table; migrations are recorded once for the cluster, and a second run from
// another node applies nothing; rows inserted into one shard's local table reach
// its other replica and are read through the Distributed table from any node; a
// node missing a table is reported as drift.
func TestMigrateCluster(t *testing.T) {
	c := chcluster.Start(t, 2, 2)
	ctx := context.Background()
	target := chmigrate.Target{Cluster: chcluster.Name, Database: "sluice"}
	first := clusterNode(t, c.Nodes[0][0], "sluice")
	if err := chmigrate.MigrateTo(ctx, first, target, testLog); err != nil {
		t.Fatal(err)
	}
	ms, err := chmigrate.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	last := clusterNode(t, c.Nodes[1][1], "sluice")
	if err := chmigrate.MigrateTo(ctx, last, target, testLog); err != nil {
		t.Fatal(err)
	}
	conns := map[[2]int]driver.Conn{}
	for s, row := range c.Nodes {
		for r, n := range row {
			conn := clusterNode(t, n, "sluice")
			conns[[2]int{s, r}] = conn
			if err := conn.Exec(ctx, "SYSTEM SYNC REPLICA schema_migrations"); err != nil {
				t.Fatal(err)
			}
			var recorded, engines uint64
			if err := conn.QueryRow(ctx, "SELECT count() FROM schema_migrations").Scan(&recorded); err != nil {
				t.Fatal(err)
			}
			if recorded != uint64(len(ms)) {
				t.Fatalf("node %s: %d migrations recorded, want %d (once each)", n.Addr, recorded, len(ms))
			}
			if err := conn.QueryRow(ctx, "SELECT count() FROM system.tables WHERE database = 'sluice' AND name = 'events_local' AND engine = 'ReplicatedMergeTree'").Scan(&engines); err != nil || engines != 1 {
				t.Fatalf("node %s: events_local ReplicatedMergeTree %d (%v)", n.Addr, engines, err)
			}
		}
	}
	// Rows written to each shard's local table, on its first replica.
	for s := range c.Nodes {
		keys := []string{"a", "b", "c"}
		if s == 1 {
			keys = []string{"d", "e"}
		}
		if err := insertEvents(ctx, conns[[2]int{s, 0}], fenceRows(keys...), insertBlockRows, target.LocalName("events"), nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, conn := range conns {
		if err := conn.Exec(ctx, "SYSTEM SYNC REPLICA events_local"); err != nil {
			t.Fatal(err)
		}
	}
	for key, conn := range conns {
		var local, all uint64
		if err := conn.QueryRow(ctx, "SELECT (SELECT count() FROM events_local), (SELECT count() FROM events)").Scan(&local, &all); err != nil {
			t.Fatal(err)
		}
		if want := []uint64{3, 2}[key[0]]; local != want || all != 5 {
			t.Fatalf("shard %d replica %d: %d local rows (want %d), %d through events (want 5)", key[0], key[1], local, want, all)
		}
	}
	// A node down: migrations already applied need nothing of it; it is not
	// checked (a worker starting meanwhile must not fail for it).
	if err := c.Nodes[1][1].Stop(); err != nil {
		t.Fatal(err)
	}
	if err := chmigrate.MigrateTo(ctx, first, target, testLog); err != nil {
		t.Fatalf("with a node down: %v", err)
	}
	if err := c.Nodes[1][1].Start(ctx); err != nil {
		t.Fatal(err)
	}
	// The setting must match the database: no cluster on a cluster's database, a
	// cluster on one server's.
	if err := chmigrate.Migrate(ctx, first, testLog); err == nil || !strings.Contains(err.Error(), "set CLICKHOUSE_CLUSTER") {
		t.Fatalf("one server's migrations on a cluster's database: %v", err)
	}
	single := clusterNode(t, c.Nodes[0][0], "single")
	if err := chmigrate.Migrate(ctx, single, testLog); err != nil {
		t.Fatal(err)
	}
	if err := chmigrate.MigrateTo(ctx, single, chmigrate.Target{Cluster: chcluster.Name, Database: "single"}, testLog); err == nil || !strings.Contains(err.Error(), "set up for one server") {
		t.Fatalf("a cluster's migrations on one server's database: %v", err)
	}
	// Drift: a node that lost a table.
	if err := conns[[2]int{1, 0}].Exec(ctx, "DROP TABLE dead_letter_replays"); err != nil {
		t.Fatal(err)
	}
	err = chmigrate.MigrateTo(ctx, first, target, testLog)
	if err == nil || !strings.Contains(err.Error(), "node "+c.Nodes[1][0].Addr+" lacks dead_letter_replays") {
		t.Fatalf("a node without dead_letter_replays: %v", err)
	}
}

// checkClusterDDL checks that the cluster's DDL parses on current ClickHouse
// (chDB 26.5, through try; TestTablesOnCurrentClickHouse). chDB cannot run it: it
// has no ZooKeeper or Keeper for ReplicatedMergeTree and no remote_servers for ON
// CLUSTER and Distributed; TestMigrateCluster runs it on 18.16.
func checkClusterDDL(t *testing.T, try func(string) (string, error)) {
	t.Helper()
	ms, err := chmigrate.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := try("EXPLAIN AST CREATE TABLE x ON CLUSTER c (a String) ENGINE = ReplicatedMergeTree("); err == nil {
		t.Fatal("EXPLAIN AST took a broken statement: it checks nothing")
	}
	target := chmigrate.Target{Cluster: chcluster.Name, Database: "sluice"}
	n := 0
	for _, m := range ms {
		for _, stmt := range m.Statements {
			stmts, err := target.ForCluster(stmt)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range stmts {
				if _, err := try("EXPLAIN AST " + s); err != nil {
					t.Fatalf("%s: current ClickHouse does not parse\n%s\n%v", m.Name, s, err)
				}
				n++
			}
		}
	}
	if n <= len(ms) {
		t.Fatalf("%d statements for %d migrations", n, len(ms))
	}
	// A typed table's: created, a column added, its fence.
	tt := orderTable(t)
	target.Typed = []string{tt.Name}
	for _, stmt := range append([]string{tt.CreateSQL(), "ALTER TABLE " + tt.Name + " ADD COLUMN `extra` Nullable(String)"}, tt.FencedSQL()...) {
		stmts, err := target.ForCluster(stmt)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range stmts {
			if _, err := try("EXPLAIN AST " + s); err != nil {
				t.Fatalf("typed table %s: current ClickHouse does not parse\n%s\n%v", tt.Name, s, err)
			}
		}
	}
}

// Typed tables on a 2 × 2 cluster: MigrateTyped makes <name>_local (replicated)
// and the Distributed <name> and the fence on every node; rows inserted through
// each shard's fence reach its other replica and read through <name> from any
// node; a later owner's fence stops an earlier one's rows; a schema that gains a
// property adds its column on every node, the Distributed table too.
func TestTypedOnCluster(t *testing.T) {
	c := chcluster.Start(t, 2, 2)
	ctx := context.Background()
	v1, err := NewTypedTable("shop.refund", []byte(`{"type":"object","properties":{"order_id":{"type":"string"}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	target := chmigrate.Target{Cluster: chcluster.Name, Database: "sluice", Typed: []string{v1.Name}}
	first := clusterNode(t, c.Nodes[0][0], "sluice")
	if err := chmigrate.MigrateTo(ctx, first, target, testLog); err != nil {
		t.Fatal(err)
	}
	if err := MigrateTyped(ctx, first, target, v1); err != nil {
		t.Fatal(err)
	}
	// Again from another node: nothing to do.
	if err := MigrateTyped(ctx, clusterNode(t, c.Nodes[1][1], "sluice"), target, v1); err != nil {
		t.Fatal(err)
	}
	row := func(tbl *TypedTable, key, data string, seq uint64) [][]any { return refundRow(t, tbl, key, data, seq) }
	// Partition s on shard s, written on its first replica; on shard 1 a later
	// owner fences the partition and the earlier one's row is dropped.
	for s := range c.Nodes {
		conn := clusterNode(t, c.Nodes[s][0], "sluice")
		f, _, err := NewFence(ctx, conn, uint32(s), 10, "w1", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if err := InsertTypedFenced(ctx, conn, v1, row(v1, fmt.Sprint("k", s), `{"order_id":"o"}`, uint64(s+1)), f); err != nil {
			t.Fatal(err)
		}
		if s == 1 {
			if _, _, err := NewFence(ctx, conn, uint32(s), 11, "w2", time.Second); err != nil {
				t.Fatal(err)
			}
			if err := InsertTypedFenced(ctx, conn, v1, row(v1, "late", `{"order_id":"o"}`, 9), f); err != nil {
				t.Fatal(err)
			}
		}
	}
	v2, err := NewTypedTable("shop.refund", []byte(`{"type":"object","properties":{"order_id":{"type":"string"},"reason":{"type":"string"}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	if err := MigrateTyped(ctx, first, target, v2); err != nil {
		t.Fatal(err)
	}
	conn := clusterNode(t, c.Nodes[0][1], "sluice")
	f, _, err := NewFence(ctx, conn, 0, 12, "w3", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := InsertTypedFenced(ctx, conn, v2, row(v2, "k2", `{"order_id":"o","reason":"r"}`, 3), f); err != nil {
		t.Fatal(err)
	}
	for s, nodes := range c.Nodes {
		for r, n := range nodes {
			conn := clusterNode(t, n, "sluice")
			if err := conn.Exec(ctx, "SYSTEM SYNC REPLICA shop_refund_local"); err != nil {
				t.Fatal(err)
			}
			var engines []string
			if err := conn.QueryRow(ctx, "SELECT groupArray(engine) FROM (SELECT engine FROM system.tables WHERE database = 'sluice' AND name IN ('shop_refund', 'shop_refund_local') ORDER BY name)").Scan(&engines); err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(engines, " "); got != "Distributed ReplicatedMergeTree" {
				t.Fatalf("shard %d replica %d: shop_refund and shop_refund_local are %q", s, r, got)
			}
			var keys []string
			if err := conn.QueryRow(ctx, "SELECT groupArray(k) FROM (SELECT concat(event_key, ':', ifNull(reason, '-')) AS k FROM shop_refund ORDER BY event_key)").Scan(&keys); err != nil {
				t.Fatal(err)
			}
			if got := strings.Join(keys, " "); got != "k0:- k1:- k2:r" {
				t.Fatalf("shard %d replica %d: shop_refund reads %q; want k0:- k1:- k2:r (the fenced row dropped)", s, r, got)
			}
		}
	}
}

// The sink on a cluster writes its tables' local tables on the first shard (the
// good events and the dead letter it makes of a bad one), each once, read through
// the Distributed tables; the other shard holds none of them.
func TestSinkOnCluster(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	c := chcluster.Start(t, 2, 2)
	s := settings.ClickHouse{Addr: c.Nodes[1][0].Addr, Database: "sluice", User: "default", Cluster: chcluster.Name}
	conn := clusterNode(t, c.Nodes[1][0], "sluice")
	shards, err := chconn.OpenShards(ctx, conn, s)
	if err != nil {
		t.Fatal(err)
	}
	defer shards.Close()
	for i := range 10 {
		if _, err := js.Publish(ctx, "enriched.test.t", enrichedEvent(i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := js.Publish(ctx, "enriched.test.t", []byte(`{"id": 1}`)); err != nil {
		t.Fatal(err)
	}
	// The events of type t also fill a typed table, test_i.
	typed, err := NewTypedTable("t", []byte(`{"type":"object","properties":{"i":{"type":"integer"}}}`), "_")
	if err != nil {
		t.Fatal(err)
	}
	typed.Name = "test_i"
	cfg := DefaultConfig()
	cfg.Typed = []*TypedTable{typed}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- Run(runCtx, cfg, Deps{NATS: nc, ClickHouse: conn, Shards: shards, Logger: testLog, Registerer: prometheus.NewRegistry(), Ready: &telemetry.Readiness{}})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	poll.Until(t, time.Minute, func() error {
		var events, dead, typedRows uint64
		var sum int64
		if err := conn.QueryRow(ctx, "SELECT (SELECT count() FROM events), (SELECT count() FROM dead_letters), (SELECT count() FROM test_i), (SELECT sum(i) FROM test_i)").Scan(&events, &dead, &typedRows, &sum); err != nil {
			return err
		}
		if events != 10 || dead != 1 || typedRows != 10 || sum != 45 {
			return fmt.Errorf("events %d, dead letters %d, test_i %d rows of sum(i) %d", events, dead, typedRows, sum)
		}
		return nil
	})
	var local, localTyped uint64
	if err := conn.QueryRow(ctx, "SELECT (SELECT count() FROM events_local), (SELECT count() FROM test_i_local)").Scan(&local, &localTyped); err != nil || local != 0 || localTyped != 0 {
		t.Fatalf("shard 2 holds %d events and %d rows of test_i (%v), want none: the sink writes to the first shard", local, localTyped, err)
	}
}
