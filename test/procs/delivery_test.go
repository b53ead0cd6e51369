package procs

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// startProcessPipeline runs every service as a process against a nats-server
// process and a clickhouse-server, with config as SLUICE_CONFIG; before, if set,
// changes the streams first.
func startProcessPipeline(t *testing.T, config string, before func(jetstream.JetStream)) (*natsProcess, jetstream.JetStream, *streams.Topology, driver.Conn) {
	t.Helper()
	return startProcesses(t, services, nil, config, before)
}

// startProcesses is startProcessPipeline with names as the services (extra adds to
// their environment); the topology returned holds the consumers they read.
func startProcesses(t *testing.T, names []string, extra map[string][]string, config string, before func(jetstream.JetStream)) (*natsProcess, jetstream.JetStream, *streams.Topology, driver.Conn) {
	t.Helper()
	bin := build(t)
	ns := runNATS(t)
	nc, js := ns.connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	topo, err := streams.Load()
	if err != nil {
		t.Fatal(err)
	}
	if before != nil {
		before(js)
	}
	srv := chtest.Start(t)
	chs, conn := chtest.Database(t, srv)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"NATS_URL=" + ns.url(), "SLUICE_APPLY_TOPOLOGY=false", "CLICKHOUSE_ADDR=" + chs.Addr, "CLICKHOUSE_DATABASE=" + chs.Database,
		"SLUICE_CONFIG=" + cfgPath, "HOOK_SECRET=" + hookSecret, "SLUICE_DATA_DIR=" + filepath.Join(dir, "state")}
	for _, name := range names {
		startService(t, bin, name, append(slices.Clone(env), extra[name]...)).waitReady(t)
	}
	return ns, js, readBy(topo, names), conn
}

func idle(ctx context.Context, js jetstream.JetStream, topo *streams.Topology) error {
	for _, c := range topo.Consumers {
		if err := natstest.Idle(ctx, js, c.Stream, c.Config.Durable); err != nil {
			return err
		}
	}
	return nil
}

// Fault 4 with every service a process: the receiver answers 500, then times out,
// then 200. Every alert arrives, each under one webhook-id, signed.
func TestReceiverDownAsProcesses(t *testing.T) {
	var (
		phase atomic.Int32 // 0: 500s, 1: timeouts, 2: up
		hits  atomic.Int32
	)
	hook := newGatedHook(t, func(w http.ResponseWriter) bool {
		hits.Add(1)
		switch phase.Load() {
		case 0:
			http.Error(w, "down", http.StatusInternalServerError)
			return false
		case 1:
			time.Sleep(700 * time.Millisecond) // beyond the receiver's 300 ms timeout
			return false
		}
		return true
	})
	cfg := fmt.Sprintf("rules:\n  - name: all\n    filter: 'type == \"order.created\"'\nreceivers:\n  - {name: hook, url: %q, secret_env: [HOOK_SECRET], allow_private: true, timeout: 300ms}\n", hook.URL)
	ns, js, topo, _ := startProcessPipeline(t, cfg, nil)
	nc, _ := ns.connect(t)
	const alerts = 20
	for i := range alerts {
		if err := nc.Publish("events.shop.order", fmt.Appendf(nil, `{"id":"w%d","type":"order.created","data":{"order_id":"w%d","amount":1}}`, i, i)); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	wait := func(d time.Duration, cond func() error) {
		t.Helper()
		if err := oracle.WaitFor(ctx, d, cond); err != nil {
			t.Fatal(err)
		}
	}
	wait(time.Minute, func() error {
		if hits.Load() < 4 {
			return fmt.Errorf("%d requests while down", hits.Load())
		}
		return nil
	})
	phase.Store(1)
	before := hits.Load()
	wait(time.Minute, func() error {
		if hits.Load() < before+3 {
			return fmt.Errorf("%d requests while timing out", hits.Load()-before)
		}
		return nil
	})
	phase.Store(2)
	wait(2*time.Minute, func() error {
		if ids, _ := hook.deliveries(); len(ids) < alerts {
			return fmt.Errorf("%d of %d alerts delivered", len(ids), alerts)
		}
		if err := natstest.Idle(ctx, js, streams.Notify, notify.DelivererConsumer("hook")); err != nil {
			return err
		}
		return idle(ctx, js, topo)
	})
	ids, bad := hook.deliveries()
	for id, n := range ids {
		if n != 1 {
			t.Errorf("%s delivered %d times", id, n)
		}
	}
	if len(ids) != alerts || bad != 0 {
		t.Fatalf("%d webhook-ids (want %d), %d badly signed", len(ids), alerts, bad)
	}
}

// Fault 6 with every service a process: republishing 20,000 delivered events after
// JetStream's duplicate windows (cut to 1 s on EVENTS and UNIQUE) have passed adds
// no row and no alert.
func TestRepublishAsProcesses(t *testing.T) {
	republish(t, services, nil)
}

// TestRepublishPipeline is TestRepublishAsProcesses with the pipeline stage.
func TestRepublishPipeline(t *testing.T) {
	republish(t, pipelineServices, pipelineEnv)
}

func republish(t *testing.T, names []string, extra map[string][]string) {
	ns, js, topo, conn := startProcesses(t, names, extra, "rules:\n  - name: tenth\n    filter: 'int(data.n) % 10 == 0'\n", func(js jetstream.JetStream) {
		topo, _ := streams.Load()
		for _, name := range []string{streams.Events, streams.Unique} {
			cfg, _ := topo.Stream(name)
			cfg.Duplicates = time.Second
			if _, err := js.UpdateStream(context.Background(), *cfg); err != nil {
				t.Fatal(err)
			}
		}
	})
	nc, _ := ns.connect(t)
	ctx := context.Background()
	m := oracle.NewManifest(oracle.Spec{Total: 20_000, Seed: 5})
	wantAlerts := uint64((len(m.Events) + 9) / 10)
	counts := func() (events, alerts uint64) {
		_ = conn.QueryRow(ctx, "SELECT count() FROM events").Scan(&events)
		_ = conn.QueryRow(ctx, "SELECT count() FROM alerts").Scan(&alerts)
		return
	}
	for round := range 2 {
		published := time.Now()
		if err := m.PublishAll(nc, 200); err != nil {
			t.Fatal(err)
		}
		err := oracle.WaitFor(ctx, 2*time.Minute, func() error {
			s, err := js.Stream(ctx, streams.Events)
			if err != nil {
				return err
			}
			if got := s.CachedInfo().State.Msgs; got < uint64((round+1)*len(m.Publishes)) {
				return fmt.Errorf("EVENTS holds %d", got)
			}
			if e, a := counts(); e < uint64(len(m.Events)) || a < wantAlerts {
				return fmt.Errorf("%d events, %d alerts", e, a)
			}
			return idle(ctx, js, topo)
		})
		if err != nil {
			t.Fatal(err)
		}
		for time.Since(published) < 1500*time.Millisecond { // past both duplicate windows
			time.Sleep(50 * time.Millisecond)
		}
	}
	if err := m.Check(ctx, conn); err != nil {
		t.Fatal(err)
	}
	if _, a := counts(); a != wantAlerts {
		t.Fatalf("%d alerts, want %d", a, wantAlerts)
	}
}
