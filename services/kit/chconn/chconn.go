// Package chconn opens ClickHouse connections with the shared settings, creating the
// database when it is missing and choosing settings by server version.
package chconn

import (
	"context"
	"errors"
	"fmt"
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

func dial(s settings.ClickHouse, db string) (driver.Conn, error) {
	conn, err := clickhouse.Open(&clickhouse.Options{
		Addr:         []string{s.Addr},
		Protocol:     clickhouse.Native,
		Auth:         clickhouse.Auth{Database: db, Username: s.User, Password: s.Password},
		DialTimeout:  5 * time.Second,
		ReadTimeout:  60 * time.Second,
		MaxOpenConns: 8,
		MaxIdleConns: 4,
	})
	if err != nil {
		return nil, fmt.Errorf("clickhouse at %s: %w", s.Addr, err)
	}
	return conn, nil
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
