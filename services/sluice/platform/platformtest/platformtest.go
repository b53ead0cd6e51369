// Package platformtest runs the whole platform (`sluice up`: embedded NATS, its own
// clickhouse-server, every stage) in a test, with its data in a directory that
// outlives a restart.
package platformtest

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chserver"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/services/sluice/platform"
)

// Platform is a running `sluice up`.
type Platform struct {
	t          testing.TB
	cfg        platform.UpConfig
	NATSURL    string
	ClickHouse settings.ClickHouse
	stop       func()
}

// Start runs the platform with SLUICE_CONFIG at configPath ("" for none) and env
// for its other settings, and its own clickhouse-server; it stops at the test's
// end. It fails the test with an install hint when clickhouse-server is missing.
func Start(t testing.TB, configPath string, env map[string]string) *Platform {
	t.Helper()
	if _, err := chserver.Binary(); err != nil {
		t.Fatal(err)
	}
	return StartOn(t, configPath, env, settings.ClickHouse{Addr: testnet.FreeAddr(t), Database: "sluice", User: "default"}, 1)
}

// StartOn is Start writing to the ClickHouse of ch (a running server or a
// cluster's node, with ch.Cluster set) instead of its own, with the pipeline's
// input in partitions (`sluice up --partitions`).
func StartOn(t testing.TB, configPath string, env map[string]string, ch settings.ClickHouse, partitions int) *Platform {
	t.Helper()
	natsAddr := testnet.FreeAddr(t)
	p := &Platform{t: t, NATSURL: "nats://" + natsAddr, ClickHouse: ch}
	p.cfg = platform.UpConfig{DataDir: t.TempDir(), NATSListen: natsAddr, ClickHouse: p.ClickHouse, Partitions: partitions,
		Service: settings.Service{ShutdownTimeout: 20 * time.Second, ApplyTopology: true, ConfigPath: configPath},
		Env:     func(k string) (string, bool) { v, ok := env[k]; return v, ok }}
	p.start()
	t.Cleanup(p.Stop)
	return p
}

func (p *Platform) start() {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	go func() { done <- platform.Up(ctx, p.cfg, log, prometheus.NewRegistry()) }()
	p.stop = func() {
		cancel()
		if err := <-done; err != nil {
			p.t.Errorf("sluice up: %v", err)
		}
	}
}

// Stop stops the platform (again: nothing).
func (p *Platform) Stop() {
	if p.stop != nil {
		p.stop()
		p.stop = nil
	}
}

// Restart stops the platform and starts it again on the same data, reading its
// config again.
func (p *Platform) Restart() {
	p.Stop()
	p.start()
}

// Connect connects to the platform's NATS once it answers, reconnecting across
// restarts.
func (p *Platform) Connect(t testing.TB) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	var nc *nats.Conn
	poll.Until(t, time.Minute, func() (err error) {
		nc, err = nats.Connect(p.NATSURL, nats.MaxReconnects(-1))
		return err
	})
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// DB connects to the platform's ClickHouse once its tables are there.
func (p *Platform) DB(t testing.TB) driver.Conn {
	t.Helper()
	var db driver.Conn
	poll.Until(t, 2*time.Minute, func() (err error) {
		if db == nil {
			if db, err = chconn.Open(context.Background(), p.ClickHouse); err != nil {
				return err
			}
		}
		// Every migration applied.
		ms, err := chmigrate.Migrations()
		if err != nil {
			return err
		}
		var n uint64
		if err := db.QueryRow(context.Background(), "SELECT count() FROM schema_migrations").Scan(&n); err != nil {
			return err
		}
		if n < uint64(len(ms)) {
			return fmt.Errorf("%d of %d migrations applied", n, len(ms))
		}
		return nil
	})
	t.Cleanup(func() { _ = db.Close() })
	return db
}
