package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/services/notify"
)

// BenchmarkAlertLatency runs every service as a process against a nats-server
// process and a clickhouse-server, publishes events at BENCH_RATE per second
// (default 10,000) for BENCH_SECONDS (default 10) as `nats pub` does, 1% of them
// matching an alert rule, and reports the p50, p99 and max time from an event's
// publish to the webhook request carrying its alert (group_wait 0).
func BenchmarkAlertLatency(b *testing.B) {
	rate, seconds := 10_000, 10
	if v, err := strconv.Atoi(os.Getenv("BENCH_RATE")); err == nil && v > 0 {
		rate = v
	}
	if v, err := strconv.Atoi(os.Getenv("BENCH_SECONDS")); err == nil && v > 0 {
		seconds = v
	}
	dir := b.TempDir()
	build(b, dir, binaries)
	secret := "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	s, _ := notify.ParseSecret(secret)
	var (
		mu        sync.Mutex
		latencies []time.Duration
		bad       int
	)
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got := time.Now()
		body, _ := io.ReadAll(r.Body)
		var p notify.Payload
		err := json.Unmarshal(body, &p)
		mu.Lock()
		defer mu.Unlock()
		if err != nil || notify.Verify(s, r.Header, body, got, time.Minute) != nil {
			bad++
			return
		}
		for _, a := range p.Alerts {
			sent, err := strconv.ParseInt(a.Annotations["sent"], 10, 64)
			if err != nil {
				bad++
				continue
			}
			latencies = append(latencies, got.Sub(time.Unix(0, sent)))
		}
	}))
	defer hook.Close()
	cfgPath := filepath.Join(dir, "sluice.yaml")
	cfg := fmt.Sprintf(`rules:
  - name: every-hundredth
    filter: 'type == "page.view" && int(data.n) %% 100 == 0'
    annotations: {sent: "{{ .data.sent }}"}
receivers:
  - {name: hook, url: %q, secret_env: [HOOK_SECRET], allow_private: true}
`, hook.URL)
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		b.Fatal(err)
	}
	for range b.N {
		port := testnet.FreePort(b)
		url := "nats://127.0.0.1:" + strconv.Itoa(port)
		start(b, "nats-server", filepath.Join(dir, "nats-server"), nil, "-js", "-sd", b.TempDir(), "-a", "127.0.0.1", "-p", strconv.Itoa(port))
		var nc *nats.Conn
		poll.Until(b, 20*time.Second, func() error {
			var err error
			nc, err = nats.Connect(url)
			return err
		})
		ctx := context.Background()
		if err := service.ApplyTopology(ctx, nc, 1); err != nil {
			b.Fatal(err)
		}
		ch := chtest.Start(b)
		chs, _ := chtest.Database(b, ch)
		env := []string{"NATS_URL=" + url, "CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database, "SLUICE_CONFIG=" + cfgPath,
			"HOOK_SECRET=" + secret, "METRICS_ADDR=", "LOG_LEVEL=warn", "SLUICE_APPLY_TOPOLOGY=false", "SLUICE_DATA_DIR=" + b.TempDir()}
		var procs []*proc
		for _, name := range []string{"sink", "dedup", "enrich", "alert", "notify"} {
			procs = append(procs, start(b, name, filepath.Join(dir, name), env))
		}
		time.Sleep(2 * time.Second) // let the services bind their consumers
		mu.Lock()
		latencies = latencies[:0]
		mu.Unlock()
		b.ResetTimer()
		total := rate * seconds
		tick := time.NewTicker(10 * time.Millisecond)
		perTick := rate / 100
		for i := 0; i < total; {
			<-tick.C
			for range perTick {
				body := fmt.Appendf(nil, `{"specversion":"1.0","id":"lat-%d","source":"web","type":"page.view","time":%q,"data":{"n":%d,"sent":"%d","user":"u%d","path":"/p/%d"}}`,
					i, time.Now().UTC().Format(time.RFC3339Nano), i, time.Now().UnixNano(), i%5000, i%997)
				if err := nc.Publish("events.web.pageview", body); err != nil {
					b.Fatal(err)
				}
				i++
			}
		}
		tick.Stop()
		want := total / 100
		poll.Until(b, 2*time.Minute, func() error {
			mu.Lock()
			defer mu.Unlock()
			if len(latencies) < want {
				return fmt.Errorf("%d of %d alerts at the webhook", len(latencies), want)
			}
			return nil
		})
		b.StopTimer()
		mu.Lock()
		sorted := slices.Clone(latencies)
		mu.Unlock()
		slices.Sort(sorted)
		at := func(q float64) float64 { return sorted[int(q*float64(len(sorted)-1))].Seconds() * 1000 }
		b.ReportMetric(at(0.50), "p50-ms")
		b.ReportMetric(at(0.99), "p99-ms")
		b.ReportMetric(sorted[len(sorted)-1].Seconds()*1000, "max-ms")
		b.ReportMetric(float64(rate), "events/s-offered")
		b.ReportMetric(float64(bad), "bad-webhooks")
		b.ReportMetric(0, "ns/op")
		for _, p := range procs {
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
			_ = p.cmd.Wait()
		}
		nc.Close()
	}
}
