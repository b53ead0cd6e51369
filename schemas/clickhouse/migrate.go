// Package clickhouse holds sluice's ClickHouse DDL as ordered migrations and applies
// them: each file in migrations/ once, recorded in the schema_migrations table.
package clickhouse

import (
	"context"
	"crypto/sha256"
	"database/sql"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

//go:embed migrations/*.sql
var files embed.FS

// Migration is one DDL file.
type Migration struct {
	Version    uint32
	Name       string
	Statements []string
	Checksum   string
}

// Migrations returns the embedded migrations in order.
func Migrations() ([]Migration, error) {
	sub, err := fs.Sub(files, "migrations")
	if err != nil {
		return nil, err
	}
	return Load(sub)
}

// Load reads NNNN_name.sql files from fsys, in version order.
func Load(fsys fs.FS) ([]Migration, error) {
	names, err := fs.Glob(fsys, "*.sql")
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	out := make([]Migration, 0, len(names))
	seen := map[uint32]string{}
	for _, name := range names {
		num, _, ok := strings.Cut(path.Base(name), "_")
		v, err := strconv.ParseUint(num, 10, 32)
		if !ok || err != nil {
			return nil, fmt.Errorf("migration %s: name must start with a number and '_' (0001_name.sql)", name)
		}
		if prev, dup := seen[uint32(v)]; dup {
			return nil, fmt.Errorf("migration %s: version %d already used by %s", name, v, prev)
		}
		seen[uint32(v)] = name
		b, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, err
		}
		sum := sha256.Sum256(b)
		m := Migration{Version: uint32(v), Name: name, Statements: SplitStatements(string(b)), Checksum: hex.EncodeToString(sum[:])}
		if len(m.Statements) == 0 {
			return nil, fmt.Errorf("migration %s: no statements", name)
		}
		out = append(out, m)
	}
	return out, nil
}

// SplitStatements splits SQL text on semicolons that end a line, dropping comment
// lines. The DDL files keep to that shape.
func SplitStatements(sql string) []string {
	var (
		out []string
		cur strings.Builder
	)
	for line := range strings.SplitSeq(sql, "\n") {
		trimmed := strings.TrimSpace(line)
		if trimmed == "" || strings.HasPrefix(trimmed, "--") {
			continue
		}
		cur.WriteString(line)
		cur.WriteByte('\n')
		if strings.HasSuffix(trimmed, ";") {
			stmt := strings.TrimSuffix(strings.TrimSpace(cur.String()), ";")
			out = append(out, stmt)
			cur.Reset()
		}
	}
	if rest := strings.TrimSpace(cur.String()); rest != "" {
		out = append(out, rest)
	}
	return out
}

const createMigrationsTable = `CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime DEFAULT now()
)
ENGINE = MergeTree()
ORDER BY version`

// columnExists reports an ADD COLUMN refused because the column is there:
// DUPLICATE_COLUMN (15) on current ClickHouse, ILLEGAL_COLUMN (44) "already exists"
// on 18.16.
func columnExists(ex *clickhouse.Exception, stmt string) bool {
	if !strings.Contains(strings.ToUpper(stmt), "ADD COLUMN") {
		return false
	}
	return ex.Code == 15 || (ex.Code == 44 && strings.Contains(ex.Message, "already exists"))
}

// Migrate applies every embedded migration that schema_migrations does not list, in
// order, on conn (whose default database is the target). It is meant to run from one
// process at a time (`sluice migrate`, or `sluice up` before its stages). Services
// starting together each apply it and end with the schema wanted (CREATE statements
// use IF NOT EXISTS, and an ADD COLUMN, which has no IF NOT EXISTS on 18.16, that
// finds its column added is taken as done), but each records the migrations it
// applied, and on a cluster their concurrent ALTER ... ON CLUSTER of one table can
// stall past the read timeout (seen on 18.16).
func Migrate(ctx context.Context, conn driver.Conn, log *slog.Logger) error {
	return MigrateTo(ctx, conn, Target{}, log)
}

// MigrateTo is Migrate on t: on a cluster every statement runs ON CLUSTER (see
// Target.ForCluster), schema_migrations is one replicated table for the whole
// cluster (each migration recorded once), and every node that answers is then
// checked to hold every table (CheckNodes). A migration still to apply needs
// every node up (a distributed DDL task waits for each).
func MigrateTo(ctx context.Context, conn driver.Conn, t Target, log *slog.Logger) error {
	ms, err := Migrations()
	if err != nil {
		return err
	}
	if err := Apply(ctx, conn, t, ms, log); err != nil {
		return err
	}
	if t.Cluster != "" {
		unchecked, err := CheckNodes(ctx, conn, t, ms)
		for _, node := range unchecked {
			log.Warn("a node of the cluster did not answer; its tables are not checked", "cluster", t.Cluster, "node", node)
		}
		return err
	}
	return nil
}

// Apply applies the migrations ms that are not yet recorded, on t.
func Apply(ctx context.Context, conn driver.Conn, t Target, ms []Migration, log *slog.Logger) error {
	// schema_migrations' engine tells whether the database was set up for one
	// server or a cluster (empty: not set up yet).
	engineOf := func() (string, error) {
		var engine string
		err := conn.QueryRow(ctx, "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = 'schema_migrations'").Scan(&engine)
		if errors.Is(err, sql.ErrNoRows) {
			return "", nil
		}
		if err != nil {
			return "", fmt.Errorf("migrate: read schema_migrations: %w", err)
		}
		return engine, nil
	}
	engine, err := engineOf()
	if err != nil {
		return err
	}
	if engine == "" {
		// Created once. On a cluster a distributed DDL task waits for every node,
		// so a database set up already does not ask again (a worker starting while
		// a replica is down must not wait for it).
		create := createMigrationsTable
		if t.Cluster != "" {
			if err := conn.Exec(ctx, "CREATE DATABASE IF NOT EXISTS "+quote(t.Database)+" ON CLUSTER "+quote(t.Cluster)); err != nil {
				return fmt.Errorf("migrate: create database %s on cluster %s: %w", t.Database, t.Cluster, err)
			}
			// One table for the cluster: every node a replica of it.
			create = strings.Replace(create, "schema_migrations\n", quote(t.Database)+".schema_migrations ON CLUSTER "+quote(t.Cluster)+"\n", 1)
			create = strings.Replace(create, "ENGINE = MergeTree()", fmt.Sprintf("ENGINE = ReplicatedMergeTree('/clickhouse/tables/all/%s.schema_migrations', '{replica}')", t.Database), 1)
		}
		if err := conn.Exec(ctx, create); err != nil {
			return fmt.Errorf("migrate: create schema_migrations: %w", err)
		}
		if engine, err = engineOf(); err != nil {
			return err
		}
	}
	// A database set up for one server and a cluster's take different tables:
	// writing with the other setting would miss them (or insert through
	// Distributed tables).
	switch replicated := strings.HasPrefix(engine, "Replicated"); {
	case t.Cluster != "" && !replicated:
		return fmt.Errorf("migrate: the database was set up for one server (schema_migrations is %s), not for cluster %s: unset CLICKHOUSE_CLUSTER, or set the cluster up in a new database", engine, t.Cluster)
	case t.Cluster == "" && replicated:
		return fmt.Errorf("migrate: the database was set up on a ClickHouse cluster (schema_migrations is %s): set CLICKHOUSE_CLUSTER to its cluster's name", engine)
	}
	applied, err := Applied(ctx, conn)
	if err != nil {
		return err
	}
	for _, m := range ms {
		if sum, ok := applied[m.Version]; ok {
			if sum != m.Checksum {
				log.Warn("applied migration differs from the file; not re-applying", "migration", m.Name)
			}
			continue
		}
		for i, stmt := range m.Statements {
			stmts, err := t.ForCluster(stmt)
			if err != nil {
				return fmt.Errorf("migrate %s: statement %d: %w", m.Name, i+1, err)
			}
			for _, stmt := range stmts {
				if err := conn.Exec(ctx, stmt); err != nil {
					var ex *clickhouse.Exception
					if errors.As(err, &ex) && columnExists(ex, stmt) {
						// Another replica is applying the same migration (ADD COLUMN has no IF
						// NOT EXISTS on 18.16): the column is there, as wanted.
						log.Info("column already added", "migration", m.Name, "statement", i+1)
						continue
					}
					return fmt.Errorf("migrate %s: statement %d: %w", m.Name, i+1, err)
				}
			}
		}
		if err := record(ctx, conn, m); err != nil {
			return fmt.Errorf("migrate %s: record: %w", m.Name, err)
		}
		log.Info("applied migration", "migration", m.Name)
	}
	return nil
}

// record inserts m into schema_migrations. A batch, not INSERT ... VALUES with
// parameters, because ClickHouse 18.16 waits for a data block after such an INSERT
// over the native protocol.
func record(ctx context.Context, conn driver.Conn, m Migration) error {
	b, err := conn.PrepareBatch(ctx, "INSERT INTO schema_migrations (version, name, checksum)")
	if err != nil {
		return err
	}
	if err := b.Append(m.Version, m.Name, m.Checksum); err != nil {
		_ = b.Abort()
		return err
	}
	return b.Send()
}

// Applied returns the recorded migrations' checksums by version.
func Applied(ctx context.Context, conn driver.Conn) (map[uint32]string, error) {
	rows, err := conn.Query(ctx, "SELECT version, checksum FROM schema_migrations")
	if err != nil {
		return nil, fmt.Errorf("migrate: read schema_migrations: %w", err)
	}
	defer rows.Close()
	out := map[uint32]string{}
	for rows.Next() {
		var (
			v   uint32
			sum string
		)
		if err := rows.Scan(&v, &sum); err != nil {
			return nil, fmt.Errorf("migrate: read schema_migrations: %w", err)
		}
		out[v] = sum
	}
	return out, rows.Err()
}
