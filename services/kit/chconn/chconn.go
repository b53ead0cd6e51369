// Package chconn opens ClickHouse connections with the shared settings, creating the
// database when it is missing and choosing settings by server version.
package chconn

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/sluicehq/sluice/services/kit/settings"
)

// Open connects over the native protocol to s.Database, creating it if it does not
// exist, and checks the connection.
func Open(ctx context.Context, s settings.ClickHouse) (driver.Conn, error) {
	conn, err := dial(s, s.Database)
	if err != nil {
		return nil, err
	}
	err = conn.Ping(ctx)
	if err == nil {
		return conn, nil
	}
	conn.Close()
	var ex *clickhouse.Exception
	if !errors.As(err, &ex) || ex.Code != 81 { // UNKNOWN_DATABASE
		if strings.Contains(err.Error(), "handshake") {
			// Something answered, and not in ClickHouse's native protocol.
			return nil, fmt.Errorf("clickhouse at %s: %w (is it ClickHouse's native protocol port, 9000 by default? Its HTTP port, 8123, is not)", s.Addr, err)
		}
		return nil, fmt.Errorf("clickhouse at %s: %w", s.Addr, err)
	}
	boot, err := dial(s, "default")
	if err != nil {
		return nil, err
	}
	err = boot.Exec(ctx, "CREATE DATABASE IF NOT EXISTS "+quoteIdent(s.Database))
	boot.Close()
	if err != nil {
		return nil, fmt.Errorf("clickhouse at %s: create database %s: %w", s.Addr, s.Database, err)
	}
	conn, err = dial(s, s.Database)
	if err != nil {
		return nil, err
	}
	if err := conn.Ping(ctx); err != nil {
		conn.Close()
		return nil, fmt.Errorf("clickhouse at %s: %w", s.Addr, err)
	}
	return conn, nil
}

// Wait opens s as Open does, waiting while ClickHouse cannot be reached (not started
// yet, restarting, its host name not resolving yet): report gets each failure (for
// readiness; nil once connected), the log says it, and it tries again after a pause
// growing to 5 s. An error ClickHouse itself answered (a wrong password, no
// permission) is returned at once, as is ctx's end: waiting mends neither.
func Wait(ctx context.Context, s settings.ClickHouse, report func(error), log *slog.Logger) (driver.Conn, error) {
	pause := 250 * time.Millisecond
	for {
		conn, err := Open(ctx, s)
		if err == nil {
			report(nil)
			return conn, nil
		}
		var ex *clickhouse.Exception
		if errors.As(err, &ex) {
			return nil, err
		}
		report(err)
		log.Warn("ClickHouse cannot be reached yet; waiting", "addr", s.Addr, "retry_in", pause, "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("clickhouse at %s: %w (while waiting: %v)", s.Addr, ctx.Err(), err)
		case <-time.After(pause):
		}
		pause = min(2*pause, 5*time.Second)
	}
}

func dial(s settings.ClickHouse, db string) (driver.Conn, error) {
	s.Database = db
	return dialAddrs(s, []string{s.Addr})
}

func quoteIdent(s string) string { return "`" + escapeBackticks(s) + "`" }

func escapeBackticks(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		if s[i] == '`' || s[i] == '\\' {
			out = append(out, '\\')
		}
		out = append(out, s[i])
	}
	return string(out)
}
