package enrich

import (
	"strings"

	"context"
	"fmt"
	"github.com/nats-io/nats.go/jetstream"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/streams"
)

var userAgents = []string{
	"Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
	"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
	"Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
	"Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
	"Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
}

// benchSetup is the benchmark's enrichment: three lookups, a country lookup in the
// real IPv4+IPv6 tables, user-agent parsing, and an HMAC mask.
func benchSetup(b *testing.B) (EnrichConfig, map[string]Table, map[string]*geoHolder) {
	dir := sharedData(b, "ip")
	files := []string{filepath.Join(dir, "geo-whois-asn-country-ipv4.csv.gz"), filepath.Join(dir, "geo-whois-asn-country-ipv6.csv.gz")}
	gh, err := loadGeoHolder(files, []string{"country"})
	if err != nil {
		b.Fatal(err)
	}
	users, plans, regions := staticTable{}, staticTable{}, staticTable{}
	for i := range 5000 {
		users[fmt.Sprintf("u%d", i)] = map[string]any{"plan": fmt.Sprintf("p%d", i%3), "name": fmt.Sprintf("user %d", i)}
	}
	for i := range 3 {
		plans[fmt.Sprintf("p%d", i)] = map[string]any{"tier": i}
	}
	for i := range 997 {
		regions[fmt.Sprintf("/products/%d", i)] = map[string]any{"category": fmt.Sprintf("c%d", i%17)}
	}
	cfg := DefaultEnrichConfig()
	cfg.Tables = []TableConfig{{Name: "users", KV: "users"}, {Name: "plans", KV: "plans"}, {Name: "pages", KV: "pages"}}
	cfg.Geo = []GeoConfig{{Name: "country", Files: files, Columns: []string{"country"}}}
	cfg.Rules = []RuleConfig{{
		Lookups: []LookupConfig{
			{Table: "users", From: "data.user", To: "user"},
			{Table: "plans", From: "data.plan", To: "plan"},
			{Table: "pages", From: "data.path", To: "page"},
		},
		GeoIP:     []GeoIPConfig{{Table: "country", From: "data.ip", To: "geo"}},
		UserAgent: &UAConfig{From: "data.ua", To: "ua"},
		Mask:      []MaskConfig{{Field: "data.email", How: MaskHMAC, SecretEnv: "MASK_KEY"}},
	}}
	return cfg, map[string]Table{"users": users, "plans": plans, "pages": regions}, map[string]*geoHolder{"country": gh}
}

func benchEvent(i int) []byte {
	e := events.Event{
		ID: fmt.Sprintf("pv-%d", i), Source: "web", Type: "page.view", SpecVersion: "1.0",
		Time: time.Unix(1_800_000_000, 0).UTC(), Key: fmt.Sprintf("%032x", i), ReceivedAt: time.Unix(1_800_000_000, 0).UTC(),
		NATSSubject: "events.web.pageview",
		Data: fmt.Appendf(nil, `{"user":"u%d","plan":"p%d","path":"/products/%d","ip":"%d.%d.%d.%d","ua":%q,"email":"user%d@example.com","duration_ms":%d}`,
			i%5000, i%3, i%997, 1+i%223, i%251, i%241, 1+i%250, userAgents[i%len(userAgents)], i%5000, i%3000),
	}
	b, _ := e.Marshal()
	return b
}

// BenchmarkEnrich is the stage's core per event: decode, three lookups, a geo
// lookup, user-agent parsing, an HMAC mask, encode.
func BenchmarkEnrich(b *testing.B) {
	cfg, tables, geo := benchSetup(b)
	ua, err := NewUserAgents(20_000)
	if err != nil {
		b.Fatal(err)
	}
	en, err := NewEnricher(cfg, tables, geo, ua, func(string) (string, bool) { return "k", true })
	if err != nil {
		b.Fatal(err)
	}
	live := &Live{}
	live.current.Store(&runtime{en: en})
	h := &Handler{live: live}
	payloads := make([][]byte, 4096)
	for i := range payloads {
		payloads[i] = benchEvent(i)
	}
	b.ResetTimer()
	for i := range b.N {
		if _, _, err := h.enrich(payloads[i&4095]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkStage runs the stage through JetStream with the same enrichment on
// 200,000 events pre-published to UNIQUE, from the moment it consumes until all are
// acked. NATS runs embedded in the benchmark's process; the three lookup tables are
// NATS KV buckets.
func BenchmarkStage(b *testing.B) {
	const total = 200_000
	cfg, tables, _ := benchSetup(b)
	for range b.N {
		b.StopTimer()
		ns := natstest.Run(b)
		nc, js := ns.Connect(b)
		ctx := context.Background()
		if err := service.ApplyTopology(ctx, nc, 1); err != nil {
			b.Fatal(err)
		}
		for name, t := range tables {
			kv, err := js.CreateKeyValue(ctx, kvConfig(name))
			if err != nil {
				b.Fatal(err)
			}
			for k, row := range t.(staticTable) {
				v := fmt.Sprintf(`{"v":%q}`, fmt.Sprint(row))
				if _, err := kv.Put(ctx, kvKey(k), []byte(v)); err != nil {
					b.Fatal(err)
				}
			}
		}
		for i := range total {
			if _, err := js.PublishAsync("unique.web.pageview", benchEvent(i)); err != nil {
				b.Fatal(err)
			}
			if i%10_000 == 9_999 {
				<-js.PublishAsyncComplete()
			}
		}
		<-js.PublishAsyncComplete()
		stageCfg := DefaultConfig()
		stageCfg.Enrich = cfg
		stageCfg.Secrets = func(string) (string, bool) { return "k", true }
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		ready := make(chan time.Time, 1)
		go func() {
			done <- Run(runCtx, stageCfg, Deps{NATS: nc, Logger: quiet, Registerer: prometheus.NewRegistry(), Ready: func() { ready <- time.Now() }})
		}()
		// Timed from the moment the stage consumes: loading the geo tables (0.7 s)
		// is start-up, not throughput.
		start := <-ready
		b.StartTimer()
		poll.Until(b, 5*time.Minute, func() error { return natstest.Idle(ctx, js, streams.Unique, "enrich") })
		elapsed := time.Since(start)
		b.StopTimer()
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(total/elapsed.Seconds(), "events/s")
		b.ReportMetric(0, "ns/op")
	}
}

func kvConfig(name string) jetstream.KeyValueConfig { return jetstream.KeyValueConfig{Bucket: name} }

// kvKey makes a lookup key a valid KV key (no slashes).
func kvKey(k string) string { return strings.ReplaceAll(k, "/", "_") }

// BenchmarkGeoLookup is one longest-prefix lookup in the real country tables
// (IPv4 and IPv6, 550k ranges), from the address text.
func BenchmarkGeoLookup(b *testing.B) {
	dir := sharedData(b, "ip")
	g, err := LoadGeo([]string{filepath.Join(dir, "geo-whois-asn-country-ipv4.csv.gz"), filepath.Join(dir, "geo-whois-asn-country-ipv6.csv.gz")}, []string{"country"})
	if err != nil {
		b.Fatal(err)
	}
	addrs := make([]string, 1024)
	for i := range addrs {
		if i%4 == 3 {
			addrs[i] = fmt.Sprintf("2a0%d:%x::%x", i%10, i*7919%65536, i)
		} else {
			addrs[i] = fmt.Sprintf("%d.%d.%d.%d", 1+i*7%223, i*13%256, i*31%256, i%256)
		}
	}
	b.ResetTimer()
	found := 0
	for i := range b.N {
		if _, ok := g.Lookup(addrs[i&1023]); ok {
			found++
		}
	}
	if found == 0 {
		b.Fatal("no address found")
	}
}
