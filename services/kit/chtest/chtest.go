// Package chtest starts a real clickhouse-server for tests. A test that needs
// ClickHouse fails, with the install hint, when the server is not installed.
package chtest

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/settings"
)

// Start runs clickhouse-server with a temporary data dir on a free port; it stops
// when t ends.
func Start(t testing.TB) *chserver.Server {
	t.Helper()
	srv, err := chserver.Start(context.Background(), t.TempDir(), 0)
	if err != nil {
		t.Fatalf("clickhouse: %v", err)
	}
	t.Cleanup(func() { _ = srv.Stop() })
	return srv
}

var dbSeq atomic.Int64

// Database returns settings for a fresh database on srv and a connection to it.
func Database(t testing.TB, srv *chserver.Server) (settings.ClickHouse, driver.Conn) {
	t.Helper()
	s := settings.ClickHouse{Addr: srv.Addr, Database: fmt.Sprintf("test_%d", dbSeq.Add(1)), User: "default"}
	conn, err := chconn.Open(context.Background(), s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return s, conn
}
