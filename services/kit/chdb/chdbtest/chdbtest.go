// Package chdbtest opens current ClickHouse in-process (chDB) for a test, with
// sluice's tables.
package chdbtest

import (
	"os"
	"strings"
	"testing"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chdb"
)

// Sluice opens a chDB session for t (failing with the install hint when libchdb.so
// is missing), makes database sluice with every migration applied, and returns a
// query function: sql's TSV result, trimmed, failing t on an error.
func Sluice(t testing.TB) func(sql string) string {
	t.Helper()
	q, _ := SluiceSession(t)
	return q
}

// SluiceSession is Sluice, with also a query function that returns the error (for
// statements a test expects to fail).
func SluiceSession(t testing.TB) (q func(sql string) string, try func(sql string) (string, error)) {
	t.Helper()
	wd, _ := os.Getwd()
	lib, err := chdb.Find(wd)
	if err != nil {
		t.Fatal(err)
	}
	s, err := chdb.Open(lib, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	try = func(sql string) (string, error) {
		out, err := s.Query(sql, "TSV")
		return strings.TrimSpace(out), err
	}
	q = func(sql string) string {
		t.Helper()
		out, err := try(sql)
		if err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
		return out
	}
	q("CREATE DATABASE IF NOT EXISTS sluice")
	q("USE sluice")
	ms, err := chmigrate.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		for _, stmt := range m.Statements {
			q(stmt)
		}
	}
	return q, try
}
