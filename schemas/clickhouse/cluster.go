package clickhouse

import (
	"context"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// Target is where migrations apply: one server (Cluster empty), or every node of
// a ClickHouse cluster named in the servers' remote_servers, with macros {shard}
// and {replica} ({replica} unique in the cluster) and ZooKeeper (or Keeper).
type Target struct {
	Cluster  string
	Database string
	// Typed names the typed tables (ingest.types): on a cluster each is a
	// Distributed table over its local table, as the tables of Distributed are.
	Typed []string
}

// Distributed are the tables users query. On a cluster each is a Distributed
// table of that name over <name>_local, a ReplicatedMergeTree on every node; the
// writers insert into the local tables of one shard.
var Distributed = []string{"events", "dead_letters", "alerts", "dead_letter_replays"}

// LocalName is the table a writer inserts into for table: table itself on one
// server, its local table on a cluster when table is Distributed.
func (t Target) LocalName(table string) string {
	if t.Cluster != "" && (isDistributed(table) || slices.Contains(t.Typed, table)) {
		return table + "_local"
	}
	return table
}

func isDistributed(table string) bool { return slices.Contains(Distributed, table) }

var (
	createTable = regexp.MustCompile(`(?s)^CREATE TABLE IF NOT EXISTS (\w+)\s*\n(.*)$`)
	mergeTree   = regexp.MustCompile(`ENGINE = MergeTree\(\)`)
	createView  = regexp.MustCompile(`(?s)^CREATE MATERIALIZED VIEW IF NOT EXISTS (\w+) TO (\w+) AS(.*)$`)
	alterTable  = regexp.MustCompile(`(?s)^ALTER TABLE (\w+) (.*)$`)
	fromTable   = regexp.MustCompile(`\b(FROM|JOIN)(\s+)(\w+)\b`)
)

// ForCluster rewrites one migration statement for t's cluster: every statement
// runs ON CLUSTER; a MergeTree table becomes a ReplicatedMergeTree (per shard:
// /clickhouse/tables/{shard}/<db>.<table>) and, when users query it, a local table
// <name>_local with a Distributed table <name> over it; a materialized view writes
// to the local table; an ALTER of a Distributed table alters the local table and
// makes the Distributed one again over it. On one server (no cluster) stmt is
// returned as it is.
func (t Target) ForCluster(stmt string) ([]string, error) {
	if t.Cluster == "" {
		return []string{stmt}, nil
	}
	// A distributed DDL task runs on each node in its default database: every
	// name is qualified with t.Database, those in a view's query too.
	on := " ON CLUSTER " + quote(t.Cluster)
	db := func(table string) string { return quote(t.Database) + "." + table }
	if m := createTable.FindStringSubmatch(stmt); m != nil {
		name, rest := m[1], m[2]
		if !mergeTree.MatchString(rest) {
			// Null tables and others without data of their own: on every node.
			return []string{"CREATE TABLE IF NOT EXISTS " + db(name) + on + "\n" + rest}, nil
		}
		local := t.LocalName(name)
		rest = mergeTree.ReplaceAllLiteralString(rest, fmt.Sprintf("ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/%s.%s', '{replica}')", t.Database, local))
		out := []string{"CREATE TABLE IF NOT EXISTS " + db(local) + on + "\n" + rest}
		if local != name {
			out = append(out, t.distributed(name))
		}
		return out, nil
	}
	if m := createView.FindStringSubmatch(stmt); m != nil {
		query := fromTable.ReplaceAllString(m[3], "${1}${2}"+quote(t.Database)+".${3}")
		return []string{"CREATE MATERIALIZED VIEW IF NOT EXISTS " + db(m[1]) + on + " TO " + db(t.LocalName(m[2])) + " AS" + query}, nil
	}
	if m := alterTable.FindStringSubmatch(stmt); m != nil {
		name, rest := m[1], m[2]
		local := t.LocalName(name)
		out := []string{"ALTER TABLE " + db(local) + on + " " + rest}
		if local != name {
			// The Distributed table takes the local table's new structure by being
			// made again (it holds no data; 18.16 refuses an ALTER ON CLUSTER of a
			// table that is not replicated on a replicated cluster). Readers of it
			// meanwhile get "table doesn't exist" for a moment.
			out = append(out, "DROP TABLE IF EXISTS "+db(name)+on, t.distributed(name))
		}
		return out, nil
	}
	return nil, fmt.Errorf("no cluster form for %q: a migration on a cluster may create tables and materialized views and alter tables", firstLine(stmt))
}

// distributed creates the Distributed table name over its local table on every
// node. Reads only: writers insert into a shard's local tables (rand() is its
// sharding key for an insert that comes through it anyway).
func (t Target) distributed(name string) string {
	return fmt.Sprintf("CREATE TABLE IF NOT EXISTS %[1]s.%[2]s ON CLUSTER %[3]s AS %[1]s.%[4]s ENGINE = Distributed(%[3]s, %[1]s, %[4]s, rand())",
		quote(t.Database), name, quote(t.Cluster), t.LocalName(name))
}

// PlainEngine is the engine clause (from ENGINE on: engine, partition key, sort
// key) with which ms create table on one server: a table made AS table's local
// table with it has the same structure, partitions and keys, so that parts can
// move between the two (REPLACE PARTITION), but none of a replicated engine's
// ZooKeeper path. It fails when a migration alters the table's keys.
func PlainEngine(ms []Migration, table string) (string, error) {
	var engine string
	for _, m := range ms {
		for _, stmt := range m.Statements {
			if c := createTable.FindStringSubmatch(stmt); c != nil && c[1] == table {
				i := strings.Index(c[2], "ENGINE = ")
				if i < 0 {
					return "", fmt.Errorf("migration %d creates %s without an engine", m.Version, table)
				}
				engine = strings.TrimSpace(c[2][i:])
			}
			if a := alterTable.FindStringSubmatch(stmt); a != nil && a[1] == table && strings.Contains(strings.ToUpper(a[2]), " ORDER BY") {
				return "", fmt.Errorf("migration %d changes the keys of %s: its plain engine is no longer the one it was created with", m.Version, table)
			}
		}
	}
	if engine == "" {
		return "", fmt.Errorf("no migration creates %s", table)
	}
	return engine, nil
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// quote quotes an identifier for ClickHouse.
func quote(id string) string {
	return "`" + strings.ReplaceAll(id, "`", "\\`") + "`"
}

var createdName = regexp.MustCompile("^CREATE (?:TABLE|MATERIALIZED VIEW) IF NOT EXISTS (?:`[^`]*`\\.)?(\\w+)")

// Tables are the tables and views ms create on t, in order.
func (t Target) Tables(ms []Migration) ([]string, error) {
	out := []string{"schema_migrations"}
	for _, m := range ms {
		for _, stmt := range m.Statements {
			stmts, err := t.ForCluster(stmt)
			if err != nil {
				return nil, err
			}
			for _, s := range stmts {
				if n := createdName.FindStringSubmatch(s); n != nil && !slices.Contains(out, n[1]) {
					out = append(out, n[1])
				}
			}
		}
	}
	return out, nil
}

// CheckNodes checks that every node of t's cluster holds every table and view of
// ms in t.Database (drift: a node added later, or one that missed a distributed
// DDL task), reading each node's system.tables through remote(). A node that does
// not answer is not checked: it is named in unchecked (a worker starting while a
// replica is down must not fail for it).
func CheckNodes(ctx context.Context, conn driver.Conn, t Target, ms []Migration) (unchecked []string, err error) {
	want, err := t.Tables(ms)
	if err != nil {
		return nil, err
	}
	rows, err := conn.Query(ctx, "SELECT host_name, port FROM system.clusters WHERE cluster = ?", t.Cluster)
	if err != nil {
		return nil, fmt.Errorf("migrate: cluster %s: %w", t.Cluster, err)
	}
	var hosts []string
	for rows.Next() {
		var host string
		var port uint16
		if err := rows.Scan(&host, &port); err != nil {
			rows.Close()
			return nil, fmt.Errorf("migrate: cluster %s: %w", t.Cluster, err)
		}
		hosts = append(hosts, net.JoinHostPort(host, strconv.Itoa(int(port))))
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("migrate: cluster %s: %w", t.Cluster, err)
	}
	if len(hosts) == 0 {
		return nil, fmt.Errorf("migrate: cluster %s is not in this server's remote_servers (system.clusters)", t.Cluster)
	}
	var drift []string
	for _, host := range hosts {
		have, err := nodeTables(ctx, conn, host, t.Database)
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			unchecked = append(unchecked, fmt.Sprintf("%s (%v)", host, err))
			continue
		}
		var missing []string
		for _, name := range want {
			if !have[name] {
				missing = append(missing, name)
			}
		}
		if len(missing) > 0 {
			drift = append(drift, fmt.Sprintf("node %s lacks %s", host, strings.Join(missing, ", ")))
		}
	}
	if len(drift) > 0 {
		return unchecked, fmt.Errorf("migrate: cluster %s drifted: %s", t.Cluster, strings.Join(drift, "; "))
	}
	return unchecked, nil
}

// nodeTables are the tables of database db on the node at host, read through conn.
func nodeTables(ctx context.Context, conn driver.Conn, host, db string) (map[string]bool, error) {
	rows, err := conn.Query(ctx, fmt.Sprintf("SELECT name FROM remote('%s', system.tables) WHERE database = ?", host), db)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	have := map[string]bool{}
	for rows.Next() {
		var name string
		if err := rows.Scan(&name); err != nil {
			return nil, err
		}
		have[name] = true
	}
	return have, rows.Err()
}
