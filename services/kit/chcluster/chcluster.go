// Package chcluster runs a ClickHouse cluster for tests: a standalone ZooKeeper
// (Debian's zookeeper package) and shards × replicas clickhouse-server processes
// on loopback ports, each with its own data dir, in one cluster of remote_servers
// with internal replication, macros {shard} and {replica}, and distributed DDL.
package chcluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/testnet"
)

// Name is the cluster's name in remote_servers (CLICKHOUSE_CLUSTER).
const Name = "sluice"

// Cluster is a running ClickHouse cluster.
type Cluster struct {
	ZK *ZooKeeper
	// Nodes[shard][replica].
	Nodes [][]*Node
}

// Node is one server of the cluster.
type Node struct {
	*chserver.Server
	Shard, Replica int
	dir            string
	port           int
	extra          string
}

// Start runs ZooKeeper and shards × replicas servers; they stop when t ends. A
// missing zookeeper or clickhouse-server fails t with the install hint.
func Start(t testing.TB, shards, replicas int) *Cluster {
	t.Helper()
	ctx := context.Background()
	if _, err := chserver.Binary(); err != nil {
		t.Fatal(err)
	}
	zk, err := StartZooKeeper(ctx, t.TempDir(), testnet.FreePort(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(zk.Stop)
	c := &Cluster{ZK: zk}
	ports := make([][]int, shards)
	var remote strings.Builder
	for s := range shards {
		remote.WriteString("<shard><internal_replication>true</internal_replication>")
		for range replicas {
			p := testnet.FreePort(t)
			ports[s] = append(ports[s], p)
			fmt.Fprintf(&remote, "<replica><host>127.0.0.1</host><port>%d</port></replica>", p)
		}
		remote.WriteString("</shard>")
	}
	_, zkPort, _ := net.SplitHostPort(zk.Addr)
	for s := range shards {
		var row []*Node
		for r := range replicas {
			extra := fmt.Sprintf(`  <interserver_http_host>127.0.0.1</interserver_http_host>
  <interserver_http_port>%d</interserver_http_port>
  <zookeeper><node><host>127.0.0.1</host><port>%s</port></node><session_timeout_ms>5000</session_timeout_ms></zookeeper>
  <remote_servers><%[3]s>%[4]s</%[3]s></remote_servers>
  <macros><shard>%02[5]d</shard><replica>s%02[6]d-r%02[7]d</replica></macros>
  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>`,
				testnet.FreePort(t), zkPort, Name, remote.String(), s+1, s+1, r+1)
			n := &Node{Shard: s, Replica: r, dir: filepath.Join(t.TempDir(), "s"+strconv.Itoa(s)+"r"+strconv.Itoa(r)), port: ports[s][r], extra: extra}
			if err := os.MkdirAll(n.dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if n.Server, err = chserver.StartWith(ctx, n.dir, n.port, extra); err != nil {
				t.Fatalf("clickhouse shard %d replica %d: %v", s, r, err)
			}
			t.Cleanup(func() { _ = n.Stop() })
			row = append(row, n)
		}
		c.Nodes = append(c.Nodes, row)
	}
	return c
}

// Start starts a node stopped or killed before, on its port and data.
func (n *Node) Start(ctx context.Context) error {
	srv, err := chserver.StartWith(ctx, n.dir, n.port, n.extra)
	if err != nil {
		return fmt.Errorf("clickhouse shard %d replica %d: %w", n.Shard, n.Replica, err)
	}
	n.Server = srv
	return nil
}

// Addrs are every node's address, shard by shard.
func (c *Cluster) Addrs() []string {
	var out []string
	for _, row := range c.Nodes {
		for _, n := range row {
			out = append(out, n.Addr)
		}
	}
	return out
}
