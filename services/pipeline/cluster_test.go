package pipeline

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/chcluster"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
)

// Two workers on four partitions write to a ClickHouse cluster of 2 shards × 2
// replicas (18.16, ZooKeeper): each partition's rows go to the local tables of its
// shard, and the first replica of the second shard is SIGKILLed while they insert (its
// inserts fail over to the other replica) and started again; then ZooKeeper is
// stopped for 30 s (replicated tables go read-only) and started again. Read through the
// Distributed table every unique event is there once, and each shard's replicas
// end up holding the same rows.
func TestClusterShards(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	c := chcluster.Start(t, 2, 2)
	s := settings.ClickHouse{Addr: c.Nodes[1][1].Addr, Database: "sluice", User: "default", Cluster: chcluster.Name}
	reader, err := chconn.Open(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Close()
	shards, err := chconn.OpenShards(ctx, reader, s)
	if err != nil {
		t.Fatal(err)
	}
	defer shards.Close()
	if shards.Count() != 2 || len(shards.Replicas(1)) != 2 {
		t.Fatalf("%d shards, %d replicas of shard 1; want 2 and 2", shards.Count(), len(shards.Replicas(1)))
	}
	f := &fixture{nc: nc, js: js, ch: reader, shards: shards}
	worker := func(name string) Config {
		cfg, _ := configFrom(t, name, "")
		cfg.Partitions, cfg.LeaseTTL, cfg.InsertTimeout = 4, 2*time.Second, 10*time.Second
		return cfg
	}
	u1, i1, _ := f.input(t, 1, 1000)
	f.start(t, worker("a"))
	f.start(t, worker("b"))
	f.waitFor(t, u1, i1, 0)
	u2, i2, _ := f.input(t, 1001, 3000)
	victim := c.Nodes[1][0]
	poll.Until(t, time.Minute, func() error {
		rows, _, err := f.counts()
		if err != nil {
			return err
		}
		if rows <= uint64(u1) {
			return fmt.Errorf("%d rows: the second input is not being inserted yet", rows)
		}
		return nil
	})
	if err := victim.Kill(); err != nil {
		t.Fatal(err)
	}
	u3, i3, _ := f.input(t, 4001, 1000)
	if err := victim.Start(ctx); err != nil {
		t.Fatal(err)
	}
	f.waitFor(t, u1+u2+u3, i1+i2+i3, 0)
	// ZooKeeper stopped: replicated tables take no inserts (read-only); the
	// workers retry, and go on once it is back.
	c.ZK.Stop()
	zkStopped := time.Now()
	u4, i4, _ := f.input(t, 5001, 1000)
	poll.Until(t, time.Minute, func() error {
		var readonly uint8
		if err := reader.QueryRow(ctx, "SELECT max(is_readonly) FROM system.replicas WHERE database = 'sluice'").Scan(&readonly); err != nil {
			return err
		}
		if readonly != 1 {
			return fmt.Errorf("no replica read-only yet")
		}
		return nil
	})
	time.Sleep(time.Until(zkStopped.Add(30 * time.Second))) // the fault's length: 30 s without ZooKeeper
	if c.ZK, err = c.ZK.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	u1, i1 = u1+u4, i1+i4
	f.waitFor(t, u1+u2+u3, i1+i2+i3, 0)
	// Every replica has every part of its shard: counts per replica, and the
	// whole through the Distributed table.
	perShard := make([]uint64, len(c.Nodes))
	for sh, row := range c.Nodes {
		for r, n := range row {
			conn, err := chconn.Open(ctx, settings.ClickHouse{Addr: n.Addr, Database: "sluice", User: "default"})
			if err != nil {
				t.Fatal(err)
			}
			var rows, keys uint64
			poll.Until(t, time.Minute, func() error {
				if err := conn.Exec(ctx, "SYSTEM SYNC REPLICA events_local"); err != nil {
					return err
				}
				return conn.QueryRow(ctx, "SELECT count(), uniqExact(key) FROM events_local").Scan(&rows, &keys)
			})
			conn.Close()
			if rows != keys || rows == 0 {
				t.Fatalf("shard %d replica %d: %d rows, %d keys", sh, r, rows, keys)
			}
			if r > 0 && rows != perShard[sh] {
				t.Fatalf("shard %d: replica %d holds %d rows, replica 0 %d", sh, r, rows, perShard[sh])
			}
			perShard[sh] = rows
		}
	}
	if perShard[0]+perShard[1] != uint64(u1+u2+u3) {
		t.Fatalf("shards hold %v rows, want %d in all", perShard, u1+u2+u3)
	}
	f.check(t, u1+u2+u3, i1+i2+i3, 0)
}
