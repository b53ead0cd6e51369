package partition_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/sluicehq/sluice/services/kit/partition"
)

// BenchmarkFilesRestore restores a checkpoint of 1 GiB (sixteen 64 MiB tables, as
// an LSM of about 25M keys on disk; SLUICE_BENCH_TABLES sets how many) from the
// object store of an embedded nats-server (file storage) onto an empty disk, and
// reports MB/s and the seconds a restore takes: the time to restore a partition is
// its size on disk over this rate.
func BenchmarkFilesRestore(b *testing.B) {
	tables := 16
	if v := os.Getenv("SLUICE_BENCH_TABLES"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			b.Fatalf("SLUICE_BENCH_TABLES: %v", err)
		}
		tables = n
	}
	ctx := context.Background()
	_, store, c := claimed(b, "bench_files")
	log := slog.New(slog.DiscardHandler)
	dir := b.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		b.Fatal(err)
	}
	var names []string
	buf := make([]byte, 64<<20)
	for i := range tables {
		_, _ = rand.Read(buf)
		name := fmt.Sprintf("%06d.sst", i)
		if err := os.WriteFile(filepath.Join(src, name), buf, 0o644); err != nil {
			b.Fatal(err)
		}
		names = append(names, name)
	}
	immutable := func(name string) bool { return strings.HasSuffix(name, ".sst") }
	files, err := partition.NewFiles(store, c, "bench", immutable, filepath.Join(dir, "cache-up"), log).Upload(ctx, src, names)
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(tables) << 26)
	b.ResetTimer()
	for i := range b.N {
		cache := filepath.Join(dir, fmt.Sprint("cache", i))
		if err := partition.NewFiles(store, c, "bench", immutable, cache, log).Restore(ctx, files, filepath.Join(dir, "db")); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		os.RemoveAll(cache)
		b.StartTimer()
	}
	b.ReportMetric(b.Elapsed().Seconds()/float64(b.N), "restore-s")
}
