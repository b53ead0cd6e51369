package chconn

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/sluicehq/sluice/services/kit/settings"
)

// Shards are where a writer's rows go: one server, or the shards of a cluster
// (settings.ClickHouse.Cluster), each reached through a connection that fails
// over among the shard's replicas in their order.
type Shards struct {
	// Cluster is the cluster's name; empty for one server.
	Cluster string
	shards  []driver.Conn
	// replicas[shard] has one connection per replica, for what each must be
	// asked itself (the fence's wait).
	replicas [][]driver.Conn
	owned    []driver.Conn
}

// OneServer is the Shards of one server: conn for everything.
func OneServer(conn driver.Conn) *Shards {
	return &Shards{shards: []driver.Conn{conn}}
}

// OpenShards reads s.Cluster's shards and replicas from system.clusters through
// conn (a node of the cluster) and connects to them; without a cluster it is
// OneServer(conn). Close closes what it opened.
func OpenShards(ctx context.Context, conn driver.Conn, s settings.ClickHouse) (*Shards, error) {
	if s.Cluster == "" {
		return OneServer(conn), nil
	}
	rows, err := conn.Query(ctx, "SELECT shard_num, host_name, port FROM system.clusters WHERE cluster = ? ORDER BY shard_num, replica_num", s.Cluster)
	if err != nil {
		return nil, fmt.Errorf("clickhouse cluster %s: %w", s.Cluster, err)
	}
	var addrs [][]string
	for rows.Next() {
		var shard uint32
		var host string
		var port uint16
		if err := rows.Scan(&shard, &host, &port); err != nil {
			rows.Close()
			return nil, fmt.Errorf("clickhouse cluster %s: %w", s.Cluster, err)
		}
		for len(addrs) < int(shard) {
			addrs = append(addrs, nil)
		}
		addrs[shard-1] = append(addrs[shard-1], net.JoinHostPort(host, strconv.Itoa(int(port))))
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("clickhouse cluster %s: %w", s.Cluster, err)
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("clickhouse cluster %s is not in the remote_servers of the server at %s (system.clusters)", s.Cluster, s.Addr)
	}
	sh := &Shards{Cluster: s.Cluster}
	for i, replicas := range addrs {
		if len(replicas) == 0 {
			sh.Close()
			return nil, fmt.Errorf("clickhouse cluster %s: shard %d has no replicas", s.Cluster, i+1)
		}
		c, err := dialAddrs(s, replicas)
		if err != nil {
			sh.Close()
			return nil, err
		}
		sh.owned = append(sh.owned, c)
		sh.shards = append(sh.shards, c)
		var each []driver.Conn
		for _, addr := range replicas {
			c, err := dialAddrs(s, []string{addr})
			if err != nil {
				sh.Close()
				return nil, err
			}
			sh.owned = append(sh.owned, c)
			each = append(each, c)
		}
		sh.replicas = append(sh.replicas, each)
	}
	return sh, nil
}

// Count is how many shards there are.
func (s *Shards) Count() int { return len(s.shards) }

// Shard is the shard partition's rows go to: partition modulo the shards.
func (s *Shards) Shard(partition int) int { return partition % len(s.shards) }

// For is the connection to partition's shard: the first of its replicas that
// answers.
func (s *Shards) For(partition int) driver.Conn { return s.shards[s.Shard(partition)] }

// Replicas are a connection to each replica of partition's shard, in order; nil
// on one server.
func (s *Shards) Replicas(partition int) []driver.Conn {
	if s.replicas == nil {
		return nil
	}
	return s.replicas[s.Shard(partition)]
}

// Close closes the connections OpenShards opened.
func (s *Shards) Close() {
	for _, c := range s.owned {
		c.Close()
	}
	s.owned = nil
}

// dialAddrs connects to s.Database at addrs, trying them in order.
func dialAddrs(s settings.ClickHouse, addrs []string) (driver.Conn, error) {
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr:             addrs,
		ConnOpenStrategy: clickhouse.ConnOpenInOrder,
		Protocol:         clickhouse.Native,
		Auth:             clickhouse.Auth{Database: s.Database, Username: s.User, Password: s.Password},
		DialTimeout:      5 * time.Second,
		ReadTimeout:      60 * time.Second,
		MaxOpenConns:     8,
		MaxIdleConns:     4,
	})
	if err != nil {
		return nil, fmt.Errorf("clickhouse at %v: %w", addrs, err)
	}
	return conn, nil
}
