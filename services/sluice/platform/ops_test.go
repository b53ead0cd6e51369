package platform

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.yaml.in/yaml/v3"

	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/settings"
	statuspage "github.com/sluicehq/sluice/services/kit/telemetry/dashboard"
	"github.com/sluicehq/sluice/services/kit/testnet"
)

// deploy is the repository's deploy directory.
var deploy = filepath.Join("..", "..", "..", "deploy")

// The Prometheus alerting rules pass promtool (Debian's prometheus package).
func TestPrometheusRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool is missing: run `make promtool` (installs Debian's prometheus package)")
	}
	out, err := exec.Command(promtool, "check", "rules", filepath.Join(deploy, "prometheus", "sluice-rules.yml")).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "SUCCESS: 7 rules found") {
		t.Fatalf("promtool check rules: %s", out)
	}
}

// recorder is a registry that notes the name of every metric registered with it.
type recorder struct {
	*prometheus.Registry
	mu    sync.Mutex
	names map[string]bool
}

var fqName = regexp.MustCompile(`fqName: "([^"]+)"`)

func (r *recorder) Register(c prometheus.Collector) error {
	descs := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(descs); close(descs) }()
	r.mu.Lock()
	for d := range descs {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			r.names[m[1]] = true
		}
	}
	r.mu.Unlock()
	return r.Registry.Register(c)
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

// Every metric the alerting rules, the Grafana dashboard and the status page name is one the
// services register (the platform with the pipeline stage, then with the split
// stages), histograms by their _bucket, _sum and _count series.
func TestOpsMetricsExist(t *testing.T) {
	if _, err := chserver.Binary(); err != nil {
		t.Fatal(err)
	}
	registered := map[string]bool{}
	for _, split := range []bool{false, true} {
		rec := &recorder{Registry: prometheus.NewRegistry(), names: map[string]bool{}}
		metricsAddr := testnet.FreeAddr(t)
		cfg := UpConfig{DataDir: t.TempDir(), NATSListen: testnet.FreeAddr(t), Split: split,
			ClickHouse: settings.ClickHouse{Addr: testnet.FreeAddr(t), Database: "sluice", User: "default"},
			Service:    settings.Service{MetricsAddr: metricsAddr, ShutdownTimeout: 20 * time.Second, ApplyTopology: true},
			Env:        func(string) (string, bool) { return "", false }}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			done <- Up(ctx, cfg, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})), rec)
		}()
		// Every stage registers its metrics as it starts: wait for one of each.
		stages := []string{"sluice_pipeline_", "sluice_sink_", "sluice_notify_"}
		if split {
			stages = []string{"sluice_dedup_", "sluice_enrich_", "sluice_alert_", "sluice_sink_", "sluice_notify_"}
		}
		poll.Until(t, 2*time.Minute, func() error {
			rec.mu.Lock()
			defer rec.mu.Unlock()
			for _, prefix := range stages {
				if !slices.ContainsFunc(slices.Collect(maps.Keys(rec.names)), func(n string) bool { return strings.HasPrefix(n, prefix) }) {
					return fmt.Errorf("no %s* metric registered yet", prefix)
				}
			}
			return readyz(metricsAddr)
		})
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		for n := range rec.names {
			registered[n] = true
		}
	}
	var used []string
	rules, err := os.ReadFile(filepath.Join(deploy, "prometheus", "sluice-rules.yml"))
	if err != nil {
		t.Fatal(err)
	}
	dashboard, err := os.ReadFile(filepath.Join(deploy, "grafana", "sluice.json"))
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Panels []struct {
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(dashboard, &d); err != nil || len(d.Panels) == 0 {
		t.Fatalf("the dashboard: %v, %d panels", err, len(d.Panels))
	}
	var r struct {
		Groups []struct {
			Rules []struct{ Alert, Expr string }
		}
	}
	if err := yaml.Unmarshal(rules, &r); err != nil || len(r.Groups) == 0 {
		t.Fatalf("the rules: %v", err)
	}
	name := regexp.MustCompile(`\bsluice_[a-z0-9_]+`)
	for _, g := range r.Groups {
		for _, rule := range g.Rules {
			used = append(used, name.FindAllString(rule.Expr, -1)...)
		}
	}
	for _, p := range d.Panels {
		for _, tg := range p.Targets {
			used = append(used, name.FindAllString(tg.Expr, -1)...)
		}
	}
	// The status page's panels too.
	for _, p := range statuspage.Panels() {
		used = append(used, p.Metrics...)
	}
	slices.Sort(used)
	for _, n := range slices.Compact(used) {
		base := n
		for _, suffix := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suffix); ok && registered[b] {
				base = b
			}
		}
		if !registered[base] {
			t.Errorf("%s is named by deploy/ or the status page but no service registers it", n)
		}
	}
	if len(used) < 10 {
		t.Fatalf("only %d metric names found in the rules and the dashboard", len(used))
	}
}

func readyz(addr string) error {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + addr + "/readyz")
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/readyz: %d", resp.StatusCode)
	}
	return nil
}
