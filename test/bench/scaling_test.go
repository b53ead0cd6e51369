package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/procstat"
)

// scalingConfig is benchConfig without alert rules (the scaling of the partitions
// themselves is measured; rules across partitions add the RULES hop).
const scalingConfig = `
enrich:
  tables:
    - {name: users, kv: bench_users, default: {plan: unknown}}
  rules:
    - types: [page.view]
      lookups: [{table: users, from: data.user, to: user}]
      derived: [{name: day, bucket: 24h}]
`

// cpuCgroupRoot is where cgroup v1 mounts the cpu controller.
const cpuCgroupRoot = "/sys/fs/cgroup/cpu"

// BenchmarkScaling runs N pipeline workers sharing P partitions, each worker held to
// the same CPU share by its own cgroup (cpu.cfs_quota_us; BENCH_WORKER_CPU cores,
// 0.1 by default: at 0.4 four workers would need more than a 2-core machine has
// left once nats-server and ClickHouse take their share, and the figure would
// measure the machine, not the workers), nats-server, ClickHouse and the sink
// outside the quotas. It pre-publishes BENCH_SCALING_EVENTS (1,000,000) events (5%
// repeats, the users lookup) and reports events/s from the first event consumed to
// the last row, and the workers' CPU per 1,000 events: all of it
// (workers-cpu-ms/1k), and since the first event was consumed
// (workers-run-cpu-ms/1k), what a worker spent before that being its start-up
// (worker-startup-cpu-ms, the mean of the workers'); the memory a worker was given
// fresh by the kernel, page by page (worker-faulted-MiB, the mean of the workers':
// its heap growing to its working size, each page a fault costing CPU, a one-off a
// short run divides among few events, which is why the run is this long); and how
// finely the work was cut (rows/insert; events/envelope with P > 1). "p1" and "p4"
// with one worker and no quota measure the keying step's cost (P = 1 reads EVENTS
// directly; P = 4 copies it into PARTITIONS first). The workers=N cases use P = 4, or
// BENCH_SCALING_PARTITIONS. BENCH_SERVICE_ENV adds settings to the services'
// environment.
func BenchmarkScaling(b *testing.B) {
	for _, c := range []struct {
		name                string
		workers, partitions int
		quota               bool
	}{
		{"p1-unlimited", 1, 1, false},
		{"p4-unlimited", 1, 4, false},
		{"workers=1", 1, 4, true},
		{"workers=2", 2, 4, true},
		{"workers=4", 4, 4, true},
	} {
		if v, err := strconv.Atoi(os.Getenv("BENCH_SCALING_PARTITIONS")); err == nil && v > 1 && c.quota {
			c.partitions = v
		}
		b.Run(c.name, func(b *testing.B) { benchScaling(b, c.workers, c.partitions, c.quota) })
	}
}

func benchScaling(b *testing.B, workers, partitions int, quota bool) {
	total := 1_000_000
	if v, err := strconv.Atoi(os.Getenv("BENCH_SCALING_EVENTS")); err == nil && v > 0 {
		total = v
	}
	cores := 0.1
	if v, err := strconv.ParseFloat(os.Getenv("BENCH_WORKER_CPU"), 64); err == nil && v > 0 {
		cores = v
	}
	if quota {
		if _, err := os.Stat(filepath.Join(cpuCgroupRoot, "cpu.cfs_quota_us")); err != nil {
			b.Fatalf("the scaling benchmark needs cgroup v1's cpu controller at %s (as root): %v", cpuCgroupRoot, err)
		}
	}
	dir := b.TempDir()
	build(b, dir, map[string]string{"nats-server": binaries["nats-server"], "pipeline": binaries["pipeline"], "sink": binaries["sink"]})
	cfgPath := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte(scalingConfig), 0o644); err != nil {
		b.Fatal(err)
	}
	for range b.N {
		natsProc, url, nc, js := startNATS(b, dir, false)
		ctx := context.Background()
		ch := chtest.Start(b)
		chs, conn := chtest.Database(b, ch)
		prepublish(b, js, "events.web.pageview", total)
		unique := total - total/20
		env := []string{"NATS_URL=" + url, "CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_CONFIG=" + cfgPath,
			"METRICS_ADDR=", "LOG_LEVEL=warn", "SLUICE_APPLY_TOPOLOGY=false", "SLUICE_PARTITIONS=" + strconv.Itoa(partitions)}
		env = append(env, strings.Fields(os.Getenv("BENCH_SERVICE_ENV"))...)
		start(b, "sink", filepath.Join(dir, "sink"), append(env, "SINK_TABLES=dead_letters,alerts"))
		b.ResetTimer()
		before := usageOf(natsProc.cmd.Process.Pid, ch.Pid())
		insertsBefore := insertQueries(b, ctx, conn)
		began := time.Now()
		consumed := firstConsumed(b, ctx, js, began)
		var pids []int
		for w := range workers {
			p := start(b, fmt.Sprintf("pipeline-%d", w), filepath.Join(dir, "pipeline"), append(env, fmt.Sprintf("PIPELINE_REPLICA=w%d", w)))
			pids = append(pids, p.cmd.Process.Pid)
			if quota {
				limit(b, fmt.Sprintf("sluice-bench-w%d", w), cores, p.cmd.Process.Pid)
			}
		}
		// The workers' CPU when the first event was consumed: their start-up
		// (connecting, loading the lookup, claiming), a cost a worker pays once and a
		// short run divides among few events.
		first := <-consumed
		atFirst := usageOf(pids...)
		poll.Until(b, 30*time.Minute, func() error {
			if n := count(ctx, conn, "events"); n < uint64(unique) {
				return fmt.Errorf("%d/%d rows", n, unique)
			}
			return nil
		})
		elapsed := time.Since(first)
		b.StopTimer()
		b.ReportMetric(float64(total)/elapsed.Seconds(), "events/s")
		b.ReportMetric(float64(first.Sub(began).Milliseconds()), "startup-ms")
		after := usageOf(append([]int{natsProc.cmd.Process.Pid, ch.Pid()}, pids...)...)
		perK := func(cpu float64) float64 { return cpu / float64(total) * 1e6 }
		b.ReportMetric(perK(after.since(usage{cpu: map[int]float64{}}, pids...)), "workers-cpu-ms/1k")
		b.ReportMetric(perK(after.since(atFirst, pids...)), "workers-run-cpu-ms/1k")
		b.ReportMetric(atFirst.since(usage{cpu: map[int]float64{}}, pids...)*1000/float64(workers), "worker-startup-cpu-ms")
		b.ReportMetric(perK(after.since(before, natsProc.cmd.Process.Pid)), "nats-cpu-ms/1k")
		b.ReportMetric(perK(after.since(before, ch.Pid())), "clickhouse-cpu-ms/1k")
		// How finely the work was cut: the rows of an events insert, and (P > 1) the
		// events of an envelope in PARTITIONS.
		b.ReportMetric(float64(unique)/float64(insertQueries(b, ctx, conn)-insertsBefore), "rows/insert")
		if partitions > 1 {
			s, err := js.Stream(ctx, streams.Partitions)
			if err != nil {
				b.Fatal(err)
			}
			info, err := s.Info(ctx)
			if err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(total)/float64(info.State.Msgs), "events/envelope")
		}
		var peak, faults int64
		for _, pid := range pids {
			_, rss := procstat.Usage(pid)
			peak = max(peak, rss)
			faults += procstat.MinorFaults(pid)
		}
		b.ReportMetric(float64(peak)/(1<<20), "worker-peak-MiB")
		b.ReportMetric(float64(faults*int64(os.Getpagesize()))/float64(workers)/(1<<20), "worker-faulted-MiB")
		b.ReportMetric(0, "ns/op")
		nc.Close()
	}
}

// insertQueries is how many INSERT queries the ClickHouse server ran (its
// InsertQuery counter): the events inserts and a few of the benchmark's and the sink's.
func insertQueries(b *testing.B, ctx context.Context, conn driver.Conn) uint64 {
	var n uint64
	if err := conn.QueryRow(ctx, "SELECT toUInt64(sum(value)) FROM system.events WHERE event = 'InsertQuery'").Scan(&n); err != nil {
		b.Fatal(err)
	}
	return n
}

// limit puts pid in a cgroup of its own allowed cores of CPU time, removed when the
// benchmark ends.
func limit(b *testing.B, name string, cores float64, pid int) {
	b.Helper()
	dir := filepath.Join(cpuCgroupRoot, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	for _, w := range [][2]string{
		{"cpu.cfs_period_us", "100000"},
		{"cpu.cfs_quota_us", strconv.Itoa(int(cores * 100000))},
		{"cgroup.procs", strconv.Itoa(pid)},
	} {
		if err := os.WriteFile(filepath.Join(dir, w[0]), []byte(w[1]), 0o644); err != nil {
			b.Fatalf("cgroup %s: %s: %v", name, w[0], err)
		}
	}
	b.Cleanup(func() {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		// The directory goes once its processes have.
		poll.Until(b, 10*time.Second, func() error { return os.Remove(dir) })
	})
}
