package platform

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/testnet"
)

// sluice up with nothing answering at CLICKHOUSE_ADDR: it starts clickhouse-server
// under the data dir, NATS on its listen address, and every stage; an event
// published over TCP lands in ClickHouse; /readyz and /metrics answer; a cancel stops
// everything, ClickHouse included.
func TestUpStartsEverything(t *testing.T) {
	if _, err := chserver.Binary(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	natsAddr, chAddr, metricsAddr := testnet.FreeAddr(t), testnet.FreeAddr(t), testnet.FreeAddr(t)
	cfg := UpConfig{
		DataDir:    dir,
		NATSListen: natsAddr,
		ClickHouse: settings.ClickHouse{Addr: chAddr, Database: "sluice", User: "default"},
		Service:    settings.Service{MetricsAddr: metricsAddr, ShutdownTimeout: 20 * time.Second, ApplyTopology: true},
		Env:        func(string) (string, bool) { return "", false },
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	go func() { done <- Up(ctx, cfg, log, prometheus.NewRegistry()) }()

	get := func(path string) (int, string, error) {
		resp, err := http.Get("http://" + metricsAddr + path)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	poll.Until(t, time.Minute, func() error {
		code, body, err := get("/readyz")
		if err != nil {
			return err
		}
		if code != http.StatusOK {
			return fmt.Errorf("/readyz %d: %s", code, body)
		}
		return nil
	})
	nc, err := nats.Connect("nats://" + natsAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := nc.Publish("events.web.click", []byte(`{"id":"up-1","data":{"x":1}}`)); err != nil {
		t.Fatal(err)
	}
	conn, err := chconn.Open(ctx, cfg.ClickHouse)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	poll.Until(t, time.Minute, func() error {
		var n uint64
		if err := conn.QueryRow(ctx, "SELECT count() FROM events WHERE id = 'up-1' AND source = 'web' AND type = 'click'").Scan(&n); err != nil {
			return err
		}
		if n != 1 {
			return fmt.Errorf("%d rows", n)
		}
		return nil
	})
	// The row is visible once the server stored it, a moment before the pipeline
	// has the insert's answer and counts it.
	poll.Until(t, time.Minute, func() error {
		_, body, err := get("/metrics")
		if err != nil {
			return err
		}
		if !strings.Contains(body, "sluice_pipeline_rows_inserted_total 1") {
			return fmt.Errorf("/metrics without sluice_pipeline_rows_inserted_total 1:\n%s", body)
		}
		return nil
	})
	// The stages found the migrations applied: each is recorded once (the pipeline
	// and the sink applying them at once recorded some twice, and on a ClickHouse
	// cluster their concurrent ALTERs could stall past the read timeout).
	var rows, versions uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(version) FROM schema_migrations").Scan(&rows, &versions); err != nil {
		t.Fatal(err)
	}
	ms, err := chmigrate.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if rows != versions || versions != uint64(len(ms)) {
		t.Fatalf("schema_migrations holds %d rows of %d versions, want one row of each of %d migrations", rows, versions, len(ms))
	}
	conn.Close()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Up: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Up did not return after cancel")
	}
	if chserver.Answers(chAddr) {
		t.Fatal("the ClickHouse sluice started still answers after sluice stopped")
	}
	if _, err := os.Stat(dir + "/nats/jetstream"); err != nil {
		t.Fatalf("JetStream store not under the data dir: %v", err)
	}
}

// Without ClickHouse installed, up says how to get it.
func TestUpWithoutClickHouseSaysHowToInstall(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	cfg := UpConfig{
		DataDir:    t.TempDir(),
		NATSListen: testnet.FreeAddr(t),
		ClickHouse: settings.ClickHouse{Addr: testnet.FreeAddr(t), Database: "sluice"},
		Env:        func(string) (string, bool) { return "", false },
	}
	err := Up(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	if err == nil || !strings.Contains(err.Error(), "apt-get install -y clickhouse-server") || !strings.Contains(err.Error(), "docker compose up -d clickhouse") {
		t.Fatalf("err = %v", err)
	}
}
