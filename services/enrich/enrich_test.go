package enrich

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/streams"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

type harness struct {
	t    *testing.T
	reg  *prometheus.Registry
	nc   *nats.Conn
	js   jetstream.JetStream
	next uint64 // next ENRICHED sequence to read
	n    int
}

func newHarness(t *testing.T) *harness {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	return &harness{t: t, nc: nc, js: js, next: 1, reg: prometheus.NewRegistry()}
}

func (h *harness) run(cfg Config) {
	h.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() {
		done <- Run(ctx, cfg, Deps{NATS: h.nc, Logger: quiet, Registerer: h.reg, Ready: func() { close(ready) }})
	}()
	select {
	case <-ready:
	case err := <-done:
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			h.t.Errorf("Run: %v", err)
		}
	})
}

// send publishes one event to UNIQUE and returns its enriched form from ENRICHED.
func (h *harness) send(data string) *events.Event {
	h.t.Helper()
	h.n++
	e := events.Event{ID: fmt.Sprint(h.n), Source: "web", Type: "page.view", SpecVersion: "1.0", Time: time.Now().UTC(),
		Key: fmt.Sprintf("%032x", h.n), ReceivedAt: time.Now().UTC(), NATSSubject: "events.web.view", Data: []byte(data)}
	b, _ := e.Marshal()
	if _, err := h.js.Publish(context.Background(), "unique.web.view", b); err != nil {
		h.t.Fatal(err)
	}
	s, err := h.js.Stream(context.Background(), streams.Enriched)
	if err != nil {
		h.t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		m, err := s.GetMsg(context.Background(), h.next)
		if err == nil {
			h.next++
			out, err := events.Unmarshal(m.Data)
			if err != nil {
				h.t.Fatal(err)
			}
			return out
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("no enriched event %d: %v", h.next, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sendUntil sends events until cond holds for one (a reload is asynchronous).
func (h *harness) sendUntil(data string, cond func(*events.Event) bool) *events.Event {
	h.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		e := h.send(data)
		if cond(e) {
			return e
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("condition never held; last enrichment %v", e.Enrichment)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// A `nats kv put` while the stage runs changes the next events' enrichment, with
// the bucket's revision recorded; a key that is not there gives the default.
func TestKVPutChangesEnrichment(t *testing.T) {
	h := newHarness(t)
	cfg := DefaultConfig()
	cfg.Enrich.Tables = []TableConfig{{Name: "users", KV: "users", Default: map[string]any{"plan": "unknown"}}}
	cfg.Enrich.Rules = []RuleConfig{{Lookups: []LookupConfig{{Table: "users", From: "data.user", To: "user"}}}}
	// A value put before the stage starts is loaded at start.
	kv, err := h.js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: "users"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), "u1", []byte(`{"plan":"free"}`)); err != nil {
		t.Fatal(err)
	}
	h.run(cfg)
	if e := h.send(`{"user":"u1"}`); e.Enrichment["user_plan"] != "free" {
		t.Fatalf("before the put: %v", e.Enrichment)
	}
	if e := h.send(`{"user":"u2"}`); e.Enrichment["user_plan"] != "unknown" {
		t.Fatalf("missing key: %v", e.Enrichment)
	}
	// What `nats kv put users u1 '{"plan":"pro"}'` sends.
	if err := h.nc.Publish("$KV.users.u1", []byte(`{"plan":"pro"}`)); err != nil {
		t.Fatal(err)
	}
	e := h.sendUntil(`{"user":"u1"}`, func(e *events.Event) bool { return e.Enrichment["user_plan"] == "pro" })
	versions := e.Enrichment[VersionsField].(map[string]any)
	if versions["users"] != "kv:users@2" {
		t.Fatalf("versions = %v, want revision 2", versions)
	}
	// A broken value keeps the previous one.
	if _, err := kv.Put(context.Background(), "u1", []byte(`not json`)); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), "u3", []byte(`{"plan":"team"}`)); err != nil {
		t.Fatal(err)
	}
	h.sendUntil(`{"user":"u3"}`, func(e *events.Event) bool { return e.Enrichment["user_plan"] == "team" })
	if e := h.send(`{"user":"u1"}`); e.Enrichment["user_plan"] != "pro" {
		t.Fatalf("after a broken value: %v", e.Enrichment)
	}
	if err := kv.Delete(context.Background(), "u1"); err != nil {
		t.Fatal(err)
	}
	h.sendUntil(`{"user":"u1"}`, func(e *events.Event) bool { return e.Enrichment["user_plan"] == "unknown" })
}

// A file table reloads when the file changes; a broken file keeps the previous
// table. A changed config file swaps the rules; a broken one keeps them.
func TestFileAndConfigReload(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	table := dir + "/plans.csv"
	write := func(p, body string) {
		t.Helper()
		if err := os.WriteFile(p+".tmp", []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(p+".tmp", p); err != nil {
			t.Fatal(err)
		}
	}
	write(table, "id,plan\nu1,free\n")
	cfgPath := dir + "/sluice.yaml"
	configText := func(to string) string {
		return fmt.Sprintf("enrich:\n  reload_interval: 50ms\n  tables:\n    - {name: plans, file: %s, key: id}\n  rules:\n    - lookups: [{table: plans, from: data.user, to: %s}]\n", table, to)
	}
	write(cfgPath, configText("plan"))
	cfg := DefaultConfig()
	cfg.ConfigPath = cfgPath
	cfg.Enrich.ReloadInterval = 50 * time.Millisecond
	cfg.Enrich.Tables = []TableConfig{{Name: "plans", File: table, Key: "id"}}
	cfg.Enrich.Rules = []RuleConfig{{Lookups: []LookupConfig{{Table: "plans", From: "data.user", To: "plan"}}}}
	h.run(cfg)
	if e := h.send(`{"user":"u1"}`); e.Enrichment["plan_plan"] != "free" {
		t.Fatalf("start: %v", e.Enrichment)
	}
	write(table, "id,plan\nu1,pro\n")
	h.sendUntil(`{"user":"u1"}`, func(e *events.Event) bool { return e.Enrichment["plan_plan"] == "pro" })
	write(table, "id,plan\nu1,\"broken\n") // an unterminated quote
	h.waitCounter("sluice_enrich_file_reloads_total", "failed", 1)
	if e := h.send(`{"user":"u1"}`); e.Enrichment["plan_plan"] != "pro" {
		t.Fatalf("after a broken file: %v", e.Enrichment)
	}
	write(table, "id,plan\nu1,pro\n")
	// The config: new rules take effect; a broken config keeps them.
	write(cfgPath, configText("tier"))
	h.sendUntil(`{"user":"u1"}`, func(e *events.Event) bool { return e.Enrichment["tier_plan"] == "pro" })
	write(cfgPath, "enrich:\n  rules:\n    - lookups: [{table: nope, from: data.user, to: x}]\n")
	h.waitCounter("sluice_enrich_config_reloads_total", "failed", 1)
	if e := h.send(`{"user":"u1"}`); e.Enrichment["tier_plan"] != "pro" {
		t.Fatalf("after a broken config: %v", e.Enrichment)
	}
}

// waitCounter polls the registry until the counter named name with the label
// value result reaches n.
func (h *harness) waitCounter(name, result string, n float64) {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		mfs, err := h.reg.Gather()
		if err != nil {
			h.t.Fatal(err)
		}
		got := 0.0
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "result" && l.GetValue() == result {
						got += m.GetCounter().GetValue()
					}
				}
			}
		}
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			h.t.Fatalf("%s{result=%q} = %v, want %v", name, result, got, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A lookup table's bucket deleted and made again (`nats kv rm users`, `nats kv add
// users`, new puts) while the stage runs: nats.go's watch alone goes on from the old
// bucket's next revision (missing the new one's first values) or ends; the stage
// must follow the new bucket, not keep the old values for good.
func TestKVBucketRemadeIsFollowed(t *testing.T) {
	h := newHarness(t)
	cfg := DefaultConfig()
	cfg.Enrich.Tables = []TableConfig{{Name: "users", KV: "users", Default: map[string]any{"plan": "unknown"}}}
	cfg.Enrich.Rules = []RuleConfig{{Lookups: []LookupConfig{{Table: "users", From: "data.user", To: "user"}}}}
	ctx := context.Background()
	kv, err := h.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "users"})
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"u1", "u2", "u3"} {
		if _, err := kv.Put(ctx, k, []byte(`{"plan":"free"}`)); err != nil {
			t.Fatal(err)
		}
	}
	h.run(cfg)
	if e := h.send(`{"user":"u1"}`); e.Enrichment["user_plan"] != "free" {
		t.Fatalf("before: %v", e.Enrichment)
	}
	if err := h.js.DeleteKeyValue(ctx, "users"); err != nil {
		t.Fatal(err)
	}
	kv, err = h.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "users"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "u1", []byte(`{"plan":"pro"}`)); err != nil {
		t.Fatal(err)
	}
	e := h.sendUntil(`{"user":"u1"}`, func(e *events.Event) bool { return e.Enrichment["user_plan"] == "pro" })
	if v := e.Enrichment[VersionsField].(map[string]any)["users"]; v != "kv:users@1" {
		t.Fatalf("version after the bucket was made again = %v, want kv:users@1", v)
	}
	// u2 is not in the new bucket: the default, not the old bucket's value.
	if e := h.send(`{"user":"u2"}`); e.Enrichment["user_plan"] != "unknown" {
		t.Fatalf("a key of the old bucket only: %v", e.Enrichment)
	}
	// And the new bucket's changes go on being followed.
	if _, err := kv.Put(ctx, "u3", []byte(`{"plan":"team"}`)); err != nil {
		t.Fatal(err)
	}
	h.sendUntil(`{"user":"u3"}`, func(e *events.Event) bool { return e.Enrichment["user_plan"] == "team" })
}
