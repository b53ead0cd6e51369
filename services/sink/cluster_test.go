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
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- Run(runCtx, DefaultConfig(), Deps{NATS: nc, ClickHouse: conn, Shards: shards, Logger: testLog, Registerer: prometheus.NewRegistry(), Ready: &telemetry.Readiness{}})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
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
	var local uint64
	if err := conn.QueryRow(ctx, "SELECT count() FROM events_local").Scan(&local); err != nil || local != 0 {
		t.Fatalf("shard 2 holds %d events (%v), want none: the sink writes to the first shard", local, err)
	}
}
