// Package pebbletest damages a Pebble store's files for tests of what a corrupt
// file does.
package pebbletest

import (
	"os"
	"path/filepath"
	"testing"
)

// CorruptTables flips bytes in the first half of every table (*.sst) in dir, past
// its first 100 bytes, in place (hard links to them see it too); it fails t when dir
// holds no table.
func CorruptTables(t testing.TB, dir string) {
	t.Helper()
	tables, err := filepath.Glob(filepath.Join(dir, "*.sst"))
	if err != nil || len(tables) == 0 {
		t.Fatalf("no table to corrupt in %s (%v)", dir, err)
	}
	for _, path := range tables {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for i := 100; i < len(b)/2; i++ {
			b[i] ^= 0x5a
		}
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
