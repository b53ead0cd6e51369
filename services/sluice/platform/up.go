package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strconv"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/natsserver"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/telemetry"
)

// UpConfig configures `sluice up`.
type UpConfig struct {
	// DataDir holds the JetStream store (nats/) and, when sluice starts one, the
	// ClickHouse data (clickhouse/).
	DataDir string
	// NATSListen is where the embedded server listens, for the nats CLI and producers.
	NATSListen string
	ClickHouse settings.ClickHouse
	Service    settings.Service
	Env        func(string) (string, bool)
	// Split runs the split stages instead of the pipeline stage (see Stages).
	Split bool
	// Partitions divides the pipeline's input (see Stages); 0 is 1.
	Partitions int
}

// Registry is where the stages register their metrics and /metrics reads them (a
// *prometheus.Registry).
type Registry interface {
	prometheus.Registerer
	prometheus.Gatherer
}

// Up runs the whole platform in this process until ctx is done.
func Up(ctx context.Context, cfg UpConfig, log *slog.Logger, reg Registry) error {
	file, err := configfile.Load(cfg.Service.ConfigPath)
	if err != nil {
		return err
	}
	host, portText, err := net.SplitHostPort(cfg.NATSListen)
	if err != nil {
		return fmt.Errorf("--nats-listen %q: %w", cfg.NATSListen, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return fmt.Errorf("--nats-listen %q: port: %w", cfg.NATSListen, err)
	}
	srv, err := natsserver.Start(natsserver.Config{Host: host, Port: port, StoreDir: filepath.Join(cfg.DataDir, "nats"),
		Debug: cfg.Service.LogLevel == "debug"})
	if err != nil {
		return err
	}
	defer func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	}()
	log.Info("NATS with JetStream is listening", "url", srv.ClientURL(), "store", filepath.Join(cfg.DataDir, "nats"))

	chStop, err := ensureClickHouse(ctx, &cfg, log)
	if err != nil {
		return err
	}
	defer chStop()
	conn, err := chconn.Open(ctx, cfg.ClickHouse)
	if err != nil {
		return err
	}
	defer conn.Close()
	shards, err := chconn.OpenShards(ctx, conn, cfg.ClickHouse)
	if err != nil {
		return err
	}
	defer shards.Close()

	nc, err := nats.Connect("", nats.InProcessServer(srv), nats.Name("sluice-up"))
	if err != nil {
		return fmt.Errorf("connect to the embedded NATS server: %w", err)
	}
	defer nc.Close()
	if cfg.Service.ApplyTopology {
		if err := service.ApplyTopology(ctx, nc, 1); err != nil {
			return err
		}
	}
	ready := &telemetry.Readiness{}
	return service.RunWithTelemetry(ctx, cfg.Service, reg, ready, nc, log, func(ctx context.Context) error {
		return RunStages(ctx, Stages{
			NATS: nc, ClickHouse: conn, Shards: shards, Config: file, Env: cfg.Env, DataDir: cfg.DataDir, Split: cfg.Split, Partitions: cfg.Partitions,
			Log: log, Registerer: reg, Ready: ready,
		})
	})
}

// ensureClickHouse uses the ClickHouse at cfg.ClickHouse.Addr, or, when nothing
// answers on that loopback address, starts clickhouse-server there with its data in
// the data dir. It returns how to stop what it started.
func ensureClickHouse(ctx context.Context, cfg *UpConfig, log *slog.Logger) (func(), error) {
	addr := cfg.ClickHouse.Addr
	if chserver.Answers(addr) {
		log.Info("using ClickHouse", "addr", addr)
		return func() {}, nil
	}
	host, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("CLICKHOUSE_ADDR %q: %w", addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("nothing answers at CLICKHOUSE_ADDR %s; start ClickHouse there, or unset CLICKHOUSE_ADDR to let sluice start a local one", addr)
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return nil, fmt.Errorf("CLICKHOUSE_ADDR %q: port: %w", addr, err)
	}
	dir := filepath.Join(cfg.DataDir, "clickhouse")
	srv, err := chserver.Start(ctx, dir, port)
	if errors.Is(err, chserver.ErrNotInstalled) {
		return nil, fmt.Errorf("nothing answers at CLICKHOUSE_ADDR %s and %w", addr, err)
	}
	if err != nil {
		return nil, err
	}
	log.Info("nothing answered at CLICKHOUSE_ADDR, so sluice started clickhouse-server; it stops with sluice", "addr", srv.Addr, "data", dir)
	return func() { _ = srv.Stop() }, nil
}
