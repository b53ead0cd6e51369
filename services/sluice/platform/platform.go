// Package platform runs every sluice stage in one process, and `sluice up`: an
// embedded NATS server, a ClickHouse to write to, and the stages.
package platform

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/services/sink"
)

// Stages is what every stage shares when they run in one process.
type Stages struct {
	NATS       *nats.Conn
	ClickHouse driver.Conn
	// Shards are a ClickHouse cluster's (chconn.OpenShards); nil: one server.
	Shards *chconn.Shards
	// Config is the parsed SLUICE_CONFIG (rules, receivers, enrichment).
	Config *configfile.File
	// Env reads secrets named by the config.
	Env        func(string) (string, bool)
	Log        *slog.Logger
	Registerer prometheus.Registerer
	Ready      *telemetry.Readiness
	// Sink overrides the sink's batching (zero: sink.DefaultConfig()).
	Sink sink.Config
	// DataDir holds the stages' local state (the dedup snapshot, keys and alert
	// groups on disk); empty keeps none.
	DataDir string
	// Split runs dedup, enrich and alert as stages of their own, each hop a stream,
	// and the sink for every table, instead of the pipeline stage.
	Split bool
	// Partitions divides the pipeline stage's input (pipeline.Config.Partitions);
	// this one worker owns them all. 0 is the pipeline's default.
	Partitions int
}

// RunStages runs the pipeline stage, notify and the sink (dead letters and alerts)
// or, with Split, dedup, enrich, alert, notify and the sink, until ctx is done or
// one of them fails; then it stops the others and returns the first error.
func RunStages(ctx context.Context, s Stages) error {
	alertCfg, err := alert.LoadConfig(s.Config)
	if err != nil {
		var re *alert.RuleError
		if !errors.As(err, &re) {
			return err
		}
		s.Log.Error("rules that did not load are left out; the rest run", "err", err)
	}
	notifyCfg, err := notify.LoadConfig(s.Config, s.Env)
	if err != nil {
		return err
	}
	dedupCfg := dedup.DefaultConfig()
	if dedupCfg.Window, err = dedup.LoadWindowConfig(s.Config); err != nil {
		return err
	}
	if dedupCfg.Ingest, err = dedup.LoadIngest(s.Config); err != nil {
		return err
	}
	dedupCfg.DataDir = s.DataDir
	if s.DataDir != "" {
		alertCfg.GroupsDir = filepath.Join(s.DataDir, "alert")
	}
	enrichCfg := enrich.DefaultConfig()
	if enrichCfg.Enrich, err = enrich.LoadEnrichConfig(s.Config); err != nil {
		return err
	}
	enrichCfg.ConfigPath = s.Config.Path
	enrichCfg.Secrets = s.Env
	sinkCfg := s.Sink
	if sinkCfg.MaxRows == 0 {
		sinkCfg = sink.DefaultConfig()
	}
	typed, err := sink.LoadTypedTables(s.Config)
	if err != nil {
		return err
	}
	sinkCfg.Typed = typed
	ready := func(name string) func() { return func() { s.Ready.Set("stage "+name, nil) } }
	var runs []stageRun
	if !s.Split {
		s.Ready.Set("stage "+notify.Name, errors.New("not consuming yet"))
		// The pipeline and the sink stage each apply the migrations at start. At
		// once, both would apply the same ones (each recording them), and on a
		// ClickHouse cluster their two ALTER ... ON CLUSTER of one table can stall
		// past the read timeout (18.16): apply them here first, once; the stages
		// then find them applied.
		if _, _, err := sink.Prepare(ctx, s.ClickHouse, s.Shards, typed, s.Log); err != nil {
			return fmt.Errorf("prepare ClickHouse: %w", err)
		}
		pipeCfg := pipeline.DefaultConfig()
		pipeCfg.Window, pipeCfg.Ingest, pipeCfg.Enrich, pipeCfg.Alert = dedupCfg.Window, dedupCfg.Ingest, enrichCfg, alertCfg
		pipeCfg.Typed, pipeCfg.DataDir = typed, s.DataDir
		pipeCfg.Replica = "sluice-up"
		if s.Partitions > 0 {
			pipeCfg.Partitions = s.Partitions
		}
		sinkCfg.Tables = []string{"dead_letters", "alerts"}
		runs = []stageRun{
			{pipeline.Name, func(ctx context.Context) error {
				return pipeline.Run(ctx, pipeCfg, pipeline.Deps{NATS: s.NATS, ClickHouse: s.ClickHouse, Shards: s.Shards, Logger: s.Log, Registerer: s.Registerer, Ready: s.Ready})
			}},
			{notify.Name, func(ctx context.Context) error {
				return notify.Run(ctx, notifyCfg, notify.Deps{NATS: s.NATS, Logger: s.Log, Registerer: s.Registerer, Ready: ready(notify.Name), Readiness: s.Ready})
			}},
			{sink.Name, func(ctx context.Context) error {
				return sink.Run(ctx, sinkCfg, sink.Deps{NATS: s.NATS, ClickHouse: s.ClickHouse, Shards: s.Shards, Logger: s.Log, Registerer: s.Registerer, Ready: s.Ready})
			}},
		}
		return runAll(ctx, runs)
	}
	for _, name := range []string{dedup.Name, enrich.Name, alert.Name, notify.Name} {
		s.Ready.Set("stage "+name, errors.New("not consuming yet"))
	}
	runs = []stageRun{
		{dedup.Name, func(ctx context.Context) error {
			return dedup.Run(ctx, dedupCfg, dedup.Deps{NATS: s.NATS, Logger: s.Log, Registerer: s.Registerer, Ready: ready(dedup.Name), Readiness: s.Ready})
		}},
		{enrich.Name, func(ctx context.Context) error {
			return enrich.Run(ctx, enrichCfg, enrich.Deps{NATS: s.NATS, Logger: s.Log, Registerer: s.Registerer, Ready: ready(enrich.Name), Readiness: s.Ready})
		}},
		{alert.Name, func(ctx context.Context) error {
			return alert.Run(ctx, alertCfg, alert.Deps{NATS: s.NATS, Logger: s.Log, Registerer: s.Registerer, Ready: ready(alert.Name)})
		}},
		{notify.Name, func(ctx context.Context) error {
			return notify.Run(ctx, notifyCfg, notify.Deps{NATS: s.NATS, Logger: s.Log, Registerer: s.Registerer, Ready: ready(notify.Name), Readiness: s.Ready})
		}},
		{sink.Name, func(ctx context.Context) error {
			return sink.Run(ctx, sinkCfg, sink.Deps{NATS: s.NATS, ClickHouse: s.ClickHouse, Shards: s.Shards, Logger: s.Log, Registerer: s.Registerer, Ready: s.Ready})
		}},
	}
	return runAll(ctx, runs)
}

// stageRun is one stage to run.
type stageRun struct {
	name string
	run  func(context.Context) error
}

// runAll runs each stage until ctx is done or one fails; then it stops the others
// and returns the first error.
func runAll(ctx context.Context, runs []stageRun) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for _, r := range runs {
		wg.Go(func() {
			err := r.run(ctx)
			if err == nil && ctx.Err() == nil {
				err = fmt.Errorf("stage %s stopped on its own", r.name)
			}
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("stage %s: %w", r.name, err)
				}
				mu.Unlock()
				cancel()
			}
		})
	}
	wg.Wait()
	return firstErr
}
