package chcluster

import (
	"context"
	"testing"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/settings"
)

// The cluster is one: every node lists all four in system.clusters and reaches
// ZooKeeper.
func TestStart(t *testing.T) {
	c := Start(t, 2, 2)
	for _, addr := range c.Addrs() {
		conn, err := chconn.Open(context.Background(), settings.ClickHouse{Addr: addr, Database: "default", User: "default"})
		if err != nil {
			t.Fatal(err)
		}
		var hosts, zk uint64
		if err := conn.QueryRow(context.Background(), "SELECT (SELECT count() FROM system.clusters WHERE cluster = 'sluice'), (SELECT count() FROM system.zookeeper WHERE path = '/')").Scan(&hosts, &zk); err != nil {
			t.Fatalf("%s: %v", addr, err)
		}
		conn.Close()
		if hosts != 4 || zk == 0 {
			t.Fatalf("%s: %d hosts in cluster sluice, %d ZooKeeper nodes at /", addr, hosts, zk)
		}
	}
}
