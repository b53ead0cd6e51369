// Package bench measures the platform as production runs it: a nats-server process
// with a file store, a clickhouse-server, and each service as its own process.
package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/procstat"
)

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func build(t testing.TB, dir string, pkgs map[string]string) {
	for name, pkg := range pkgs {
		if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, name), pkg).CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", name, err, out)
		}
	}
}

type proc struct {
	name string
	cmd  *exec.Cmd
}

func start(t testing.TB, name, bin string, env []string, args ...string) *proc {
	c := exec.Command(bin, args...)
	c.Env = append(os.Environ(), env...)
	log, _ := os.Create(filepath.Join(os.TempDir(), "sluice-bench-"+name+".log"))
	c.Stdout, c.Stderr = log, log
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Process.Signal(syscall.SIGKILL); _ = c.Wait() })
	return &proc{name: name, cmd: c}
}

func event(i int) []byte {
	n := i
	if i%20 == 19 {
		n = i - 1 // 5% repeats
	}
	e := map[string]any{
		"specversion": "1.0", "id": "pv-" + strconv.Itoa(n), "source": "web", "type": "page.view",
		"time": time.Unix(1_800_000_000+int64(n/1000), int64(n%1000)*1e6).UTC().Format(time.RFC3339Nano),
		"data": map[string]any{
			"user": "u" + strconv.Itoa(n%5000), "session": "s-" + strconv.Itoa(n%20000),
			"path": "/products/" + strconv.Itoa(n%997), "referrer": "https://search.example.com/?q=item+" + strconv.Itoa(n%101),
			"ip": "203.0.113." + strconv.Itoa(n%254+1), "ua": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
			"duration_ms": n % 3000,
		},
	}
	b, _ := json.Marshal(e)
	return b
}

func prepublish(t testing.TB, js jetstream.JetStream, subject string, n int) {
	for i := range n {
		if _, err := js.PublishAsync(subject, event(i)); err != nil {
			t.Fatal(err)
		}
		if i%10_000 == 9_999 {
			<-js.PublishAsyncComplete()
		}
	}
	<-js.PublishAsyncComplete()
}

func count(ctx context.Context, conn driver.Conn, table string) uint64 {
	var n uint64
	_ = conn.QueryRow(ctx, "SELECT count() FROM "+table).Scan(&n)
	return n
}

// BenchmarkProduction pre-publishes BENCH_EVENTS (default 200,000) events of about
// 430 bytes with 5% repeats, then starts dedup, enrich, alert, notify and sink as
// processes against a nats-server process and a clickhouse-server, and reports
// events/s from start to the last row, CPU per 1,000 events and peak RSS per process.
// In the same run, a raw pipe (one pull consumer straight into ClickHouse) moves the
// same events, and the ratio is reported.
func BenchmarkProduction(b *testing.B) {
	total := 200_000
	if v, err := strconv.Atoi(os.Getenv("BENCH_EVENTS")); err == nil && v > 0 {
		total = v
	}
	dir := b.TempDir()
	build(b, dir, map[string]string{
		"nats-server": "github.com/nats-io/nats-server/v2",
		"dedup":       "github.com/sluicehq/sluice/services/dedup/cmd/dedup",
		"enrich":      "github.com/sluicehq/sluice/services/enrich/cmd/enrich",
		"alert":       "github.com/sluicehq/sluice/services/alert/cmd/alert",
		"notify":      "github.com/sluicehq/sluice/services/notify/cmd/notify",
		"sink":        "github.com/sluicehq/sluice/services/sink/cmd/sink",
	})
	for range b.N {
		port := freePort(b)
		url := "nats://127.0.0.1:" + strconv.Itoa(port)
		natsProc := start(b, "nats-server", filepath.Join(dir, "nats-server"), nil, "-js", "-sd", b.TempDir(), "-a", "127.0.0.1", "-p", strconv.Itoa(port))
		var nc *nats.Conn
		poll.Until(b, 20*time.Second, func() error {
			var err error
			nc, err = nats.Connect(url)
			return err
		})
		js, _ := jetstream.New(nc)
		ctx := context.Background()
		if err := service.ApplyTopology(ctx, nc); err != nil {
			b.Fatal(err)
		}
		ch := chtest.Start(b)
		chs, conn := chtest.Database(b, ch)
		prepublish(b, js, "events.web.pageview", total)
		unique := total - total/20

		env := []string{"NATS_URL=" + url, "CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database,
			"METRICS_ADDR=", "LOG_LEVEL=warn", "SLUICE_APPLY_TOPOLOGY=false", "SLUICE_DATA_DIR=" + b.TempDir()}
		b.ResetTimer()
		began := time.Now()
		var procs []*proc
		for _, s := range []string{"sink", "dedup", "enrich", "alert", "notify"} {
			procs = append(procs, start(b, s, filepath.Join(dir, s), env))
		}
		poll.Until(b, 10*time.Minute, func() error {
			if n := count(ctx, conn, "events"); n < uint64(unique) {
				return fmt.Errorf("%d/%d rows", n, unique)
			}
			return nil
		})
		elapsed := time.Since(began)
		b.StopTimer()
		rate := float64(total) / elapsed.Seconds()
		b.ReportMetric(rate, "events/s")
		var sluiceCPU float64
		for _, p := range procs {
			cpu, peak := procstat.Usage(p.cmd.Process.Pid)
			sluiceCPU += cpu
			b.ReportMetric(float64(peak)/(1<<20), p.name+"-MiB")
		}
		natsCPU, natsPeak := procstat.Usage(natsProc.cmd.Process.Pid)
		b.ReportMetric(sluiceCPU/float64(total)*1000*1000, "sluice-cpu-ms/1k")
		b.ReportMetric(natsCPU/float64(total)*1000*1000, "nats-cpu-ms/1k")
		b.ReportMetric(float64(natsPeak)/(1<<20), "nats-MiB")
		for _, p := range procs {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			_ = p.cmd.Wait()
		}

		// The raw pipe: one pull consumer on EVENTS straight into a table, ack after insert.
		rawRate := rawPipe(b, ctx, js, conn, total)
		b.ReportMetric(rawRate, "raw-events/s")
		b.ReportMetric(rate/rawRate, "ratio")
		b.ReportMetric(0, "ns/op")
		nc.Close()
	}
}

func rawPipe(b *testing.B, ctx context.Context, js jetstream.JetStream, conn driver.Conn, total int) float64 {
	if err := conn.Exec(ctx, "CREATE TABLE raw (subject String, payload String, seq UInt64) ENGINE = MergeTree() ORDER BY seq"); err != nil {
		b.Fatal(err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, streams.Events, jetstream.ConsumerConfig{Durable: "raw", AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: 100_000})
	if err != nil {
		b.Fatal(err)
	}
	began := time.Now()
	done := 0
	for done < total {
		res, err := cons.Fetch(100_000, jetstream.FetchMaxWait(500*time.Millisecond))
		if err != nil {
			b.Fatal(err)
		}
		batch, err := conn.PrepareBatch(ctx, "INSERT INTO raw (subject, payload, seq)")
		if err != nil {
			b.Fatal(err)
		}
		var msgs []jetstream.Msg
		for m := range res.Messages() {
			md, _ := m.Metadata()
			if err := batch.Append(m.Subject(), string(m.Data()), md.Sequence.Stream); err != nil {
				b.Fatal(err)
			}
			msgs = append(msgs, m)
		}
		if len(msgs) == 0 {
			_ = batch.Abort()
			continue
		}
		if err := batch.Send(); err != nil {
			b.Fatal(err)
		}
		for _, m := range msgs {
			_ = m.Ack()
		}
		done += len(msgs)
	}
	return float64(total) / time.Since(began).Seconds()
}
