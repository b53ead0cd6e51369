// Package service is the shared main of the sluice services: flags and environment,
// logging, signals, the NATS connection, the JetStream topology, and the metrics
// endpoint. Each cmd/<name>/main.go is one call to Main.
package service

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/memlimit"
	"github.com/sluicehq/sluice/services/kit/natsconn"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// Env is what a service's Run gets from Main.
type Env struct {
	Log        *slog.Logger
	Registerer prometheus.Registerer
	NATS       *nats.Conn
	Service    settings.Service
	ClickHouse settings.ClickHouse
	Ready      *telemetry.Readiness
}

// ConfigFile reads SLUICE_CONFIG (an empty path is an empty config).
func (e Env) ConfigFile() (*configfile.File, error) { return configfile.Load(e.Service.ConfigPath) }

// Spec describes one service binary.
type Spec struct {
	Name string
	// Summary is the first line of --help.
	Summary string
	// MetricsAddr is the default METRICS_ADDR.
	MetricsAddr string
	// ClickHouse adds the CLICKHOUSE_* settings.
	ClickHouse bool
	// Config adds --config (SLUICE_CONFIG).
	Config bool
	// DataDir adds --data-dir (SLUICE_DATA_DIR).
	DataDir bool
	// Flags registers the service's own flags (optional), reading defaults from env.
	Flags func(fs *flag.FlagSet, env settings.Lookup) error
	// Run runs the service until ctx is done.
	Run func(ctx context.Context, env Env) error
}

// Main runs spec with args (without the program name) and returns the exit code.
func Main(spec Spec, args []string, lookup settings.Lookup, stderr io.Writer) int {
	fs := flag.NewFlagSet(spec.Name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		natsS settings.NATS
		chS   settings.ClickHouse
		svcS  settings.Service
	)
	settings.BindNATS(fs, lookup, &natsS)
	if spec.ClickHouse {
		settings.BindClickHouse(fs, lookup, &chS)
	}
	if spec.Config {
		settings.BindConfig(fs, lookup, &svcS.ConfigPath)
	}
	if spec.DataDir {
		settings.BindDataDir(fs, lookup, &svcS.DataDir)
	}
	if err := errors.Join(settings.BindService(fs, lookup, &svcS, spec.MetricsAddr), settings.BindReplicas(fs, lookup, &svcS.Replicas), settings.BindMemoryLimit(fs, lookup, &svcS.MemoryLimit)); err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	if spec.Flags != nil {
		if err := spec.Flags(fs, lookup); err != nil {
			fmt.Fprintln(stderr, err)
			return 2
		}
	}
	fs.Usage = func() {
		fmt.Fprintf(stderr, "%s: %s\n\nUsage: %s [flags]\n\nEvery flag can also be set by the environment variable named after it.\n\n", spec.Name, spec.Summary, spec.Name)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected arguments %q\n", spec.Name, fs.Args())
		return 2
	}
	if err := settings.CheckReplicas(svcS.Replicas); err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", spec.Name, err)
		return 2
	}
	log, err := telemetry.NewLogger(stderr, svcS.LogLevel, svcS.LogFormat)
	if err != nil {
		fmt.Fprintln(stderr, err)
		return 2
	}
	log = log.With("service", spec.Name)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	// The limit holds until Main returns, through the drain after a signal too.
	limitCtx, stopLimit := context.WithCancel(context.Background())
	defer stopLimit()
	wg.Go(func() { memlimit.Run(limitCtx, svcS.MemoryLimit, lookup, log) })
	if err := run(ctx, spec, natsS, chS, svcS, log); err != nil {
		log.Error(spec.Name+" exited", "err", err)
		return 1
	}
	return 0
}

func run(ctx context.Context, spec Spec, natsS settings.NATS, chS settings.ClickHouse, svcS settings.Service, log *slog.Logger) error {
	// A service starting while NATS restarts waits up to 30 s for it.
	nc, err := natsconn.ConnectWait(ctx, natsS, "sluice-"+spec.Name, log, 30*time.Second)
	if err != nil {
		return err
	}
	defer nc.Close()
	if svcS.ApplyTopology {
		if err := ApplyTopology(ctx, nc, svcS.Replicas); err != nil {
			return err
		}
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	env := Env{Log: log, Registerer: reg, NATS: nc, Service: svcS, ClickHouse: chS, Ready: &telemetry.Readiness{}}
	return RunWithTelemetry(ctx, svcS, reg, env.Ready, nc, log, func(ctx context.Context) error {
		return spec.Run(ctx, env)
	})
}

// RunWithTelemetry serves the metrics endpoint while body runs, and bounds the
// drain after ctx is done by s.ShutdownTimeout; a drain that does not finish says
// what may have held it: nc (the service's NATS connection) not connected, and
// ready's checks that fail.
func RunWithTelemetry(ctx context.Context, s settings.Service, g prometheus.Gatherer, ready *telemetry.Readiness, nc *nats.Conn, log *slog.Logger, body func(context.Context) error) error {
	httpCtx, stopHTTP := context.WithCancel(context.Background())
	defer stopHTTP()
	var wg sync.WaitGroup
	httpErr := make(chan error, 1)
	wg.Go(func() { httpErr <- telemetry.Serve(httpCtx, s.MetricsAddr, g, ready, log) })
	defer wg.Wait()
	done := make(chan error, 1)
	go func() { done <- body(ctx) }()
	select {
	case err := <-done:
		stopHTTP()
		return err
	case err := <-httpErr:
		return err
	case <-ctx.Done():
	}
	log.Info("shutting down", "timeout", s.ShutdownTimeout)
	select {
	case err := <-done:
		stopHTTP()
		return err
	case <-time.After(s.ShutdownTimeout):
		stopHTTP()
		return fmt.Errorf("drain did not finish within %s%s; unacked work will be redelivered", s.ShutdownTimeout, drainHeld(nc, ready))
	}
}

// drainHeld is what may have held a drain, in parentheses (or ""): NATS not
// connected (acks and the last saves wait for it), and ready's failing checks.
func drainHeld(nc *nats.Conn, ready *telemetry.Readiness) string {
	var why []string
	if st := nc.Status(); st != nats.CONNECTED {
		why = append(why, "NATS not connected: "+strings.ToLower(st.String()))
	}
	if err := ready.Check(); err != nil {
		why = append(why, "not ready: "+err.Error())
	}
	if len(why) == 0 {
		return ""
	}
	return " (" + strings.Join(why, "; ") + ")"
}

// ApplyTopology creates or updates every stream and consumer in streams/, every
// stream with replicas copies.
func ApplyTopology(ctx context.Context, nc *nats.Conn, replicas int) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	t, err := streams.Load()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return t.WithReplicas(replicas).Apply(ctx, js)
}
