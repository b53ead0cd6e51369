package platform

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/testnet"
)

// chromium is Debian's headless browser, or the test fails saying how to get it.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	t.Fatal("the status page's browser test needs Chromium: apt-get install -y --no-install-recommends chromium")
	return ""
}

// The status page in a real browser: sluice up serves it on the metrics address
// while events (repeats and invalid ones among them) and alerts flow; the totals
// it shows come to what ClickHouse holds (rows, dead letters, alerts firing) and
// what was published (repeats), and every panel with data draws a chart.
// SLUICE_DASHBOARD_SCREENSHOT=file.png keeps a screenshot (docs/dashboard.png).
func TestStatusPageInBrowser(t *testing.T) {
	browser := chromium(t)
	if _, err := chserver.Binary(); err != nil {
		t.Fatal(err)
	}
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.Copy(io.Discard, r.Body) }))
	defer hook.Close()
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "sluice.yaml")
	config := fmt.Sprintf(`rules:
  - name: big-order
    filter: 'type == "order" && int(data.amount) > 900'
    group_by: [data.region]
receivers:
  - {name: hook, url: %q, secret_env: [HOOK_SECRET], allow_private: true}
`, hook.URL)
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	natsAddr, metricsAddr := testnet.FreeAddr(t), testnet.FreeAddr(t)
	cfg := UpConfig{DataDir: dir, NATSListen: natsAddr,
		ClickHouse: settings.ClickHouse{Addr: testnet.FreeAddr(t), Database: "sluice", User: "default"},
		Service:    settings.Service{MetricsAddr: metricsAddr, ShutdownTimeout: 20 * time.Second, ApplyTopology: true, ConfigPath: cfgPath},
		Env: func(k string) (string, bool) {
			if k == "HOOK_SECRET" {
				return "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", true
			}
			return "", false
		}}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- Up(ctx, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})), prometheus.NewRegistry())
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Up: %v", err)
		}
	}()
	poll.Until(t, 2*time.Minute, func() error { return readyz(metricsAddr) })

	// The browser opens the page before the events come, so its charts see them flow.
	alloc, stopAlloc := chromedp.NewExecAllocator(ctx, append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(browser), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.WindowSize(1400, 1100))...)
	defer stopAlloc()
	page, closePage := chromedp.NewContext(alloc)
	defer closePage()
	if err := chromedp.Do(page, chromedp.Navigate("http://"+metricsAddr+"/?every=500"), chromedp.WaitVisible("#panel-outcomes")); err != nil {
		t.Fatalf("load the page: %v", err)
	}

	nc, err := nats.Connect("nats://" + natsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	types := []string{"order", "click", "signup"}
	regions := []string{"eu", "us", "apac"}
	var published, repeats, invalid int
	// Paced over a few seconds so the charts have a shape; nothing waits on it.
	for round := range 12 {
		for i := range 150 {
			n := round*150 + i
			typ := types[n%len(types)]
			body := fmt.Sprintf(`{"id":"e%d","data":{"amount":%d,"region":%q}}`, n, n%1000, regions[n%len(regions)])
			_ = nc.Publish("events.shop."+typ, []byte(body))
			published++
			if n%20 == 0 { // a repeat: same source and id
				_ = nc.Publish("events.shop."+typ, []byte(body))
				repeats++
			}
			if n%50 == 0 {
				_ = nc.Publish("events.shop."+typ, []byte(`{"id": broken`))
				invalid++
			}
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(400 * time.Millisecond) // the producer's pace (the charts' shape), not a wait for a condition
	}

	conn, err := chconn.Open(ctx, cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	count := func(query string) (uint64, error) {
		var n uint64
		err := conn.QueryRow(ctx, query).Scan(&n)
		return n, err
	}
	shown := func(id string) (uint64, error) {
		text, err := chromedp.Run(page, chromedp.Text("#"+id))
		if err != nil {
			return 0, err
		}
		return strconv.ParseUint(strings.ReplaceAll(text, " ", ""), 10, 64)
	}
	poll.Until(t, 2*time.Minute, func() error {
		stored, err := count("SELECT count() FROM events")
		if err != nil {
			return err
		}
		dead, err := count("SELECT count() FROM dead_letters")
		if err != nil {
			return err
		}
		firing, err := count(`SELECT count() FROM (SELECT fingerprint, groupArray(status) AS s FROM alerts GROUP BY fingerprint)
			WHERE has(s, 'firing') AND NOT has(s, 'resolved')`)
		if err != nil {
			return err
		}
		if stored != uint64(published) || dead != uint64(invalid) || firing == 0 {
			return fmt.Errorf("ClickHouse holds %d of %d events, %d of %d dead letters, %d alerts firing", stored, published, dead, invalid, firing)
		}
		for _, c := range []struct {
			id   string
			want uint64
		}{{"total-stored", stored}, {"total-repeat", uint64(repeats)}, {"total-dead_letter", dead}, {"total-firing", firing}, {"total-lag", 0}} {
			got, err := shown(c.id)
			if err != nil {
				return fmt.Errorf("#%s: %w", c.id, err)
			}
			if got != c.want {
				return fmt.Errorf("the page shows %s %d, want %d", c.id, got, c.want)
			}
		}
		return nil
	})
	// Each panel with data drew a chart, with a series per outcome, type and reason.
	for panel, series := range map[string][]string{
		"outcomes": {"stored", "repeat", "dead_letter"}, "types": types, "lag": {"lag"}, "insert": {"insert"},
		"alerts": {"firing"}, "dead": {"invalid event"},
	} {
		labels, err := chromedp.Run(page, chromedp.Evaluate[[]string](fmt.Sprintf(
			`[...document.querySelectorAll("#panel-%s .u-legend .u-series .u-label")].map(e => e.textContent)`, panel)))
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range series {
			if !strings.Contains(strings.Join(labels, "\n"), s) {
				t.Errorf("panel %s has series %q, want %q among them", panel, labels, s)
			}
		}
	}
	if path := os.Getenv("SLUICE_DASHBOARD_SCREENSHOT"); path != "" {
		png, err := chromedp.Run(page, chromedp.FullScreenshot(100))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, png, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
