// Command pipeline runs dedup, enrich, alert and the events insert as one stage,
// against an external NATS server and ClickHouse.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"

	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/crash"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/services/sink"
)

func main() {
	cfg := pipeline.DefaultConfig()
	os.Exit(service.Main(service.Spec{
		Name:        "pipeline",
		Summary:     "a pipeline worker: for each partition it owns, validates, drops repeats, enriches, evaluates the alert rules and inserts each unique event into ClickHouse",
		MetricsAddr: "127.0.0.1:9306",
		ClickHouse:  true,
		Config:      true,
		DataDir:     true,
		Flags: func(fs *flag.FlagSet, env settings.Lookup) error {
			settings.String(fs, env, &cfg.Replica, "replica", "PIPELINE_REPLICA", cfg.Replica, "this worker's name in the group (unique; letters, digits, '-', '_' and '=')")
			settings.String(fs, env, &cfg.StartAt, "start-at", "PIPELINE_START_AT", "first", "where a pipeline without state starts reading EVENTS: first, end, or a stream sequence")
			return errors.Join(
				settings.Int(fs, env, &cfg.MaxRows, "batch-max-rows", "PIPELINE_BATCH_MAX_ROWS", cfg.MaxRows, "most events in one batch (one insert); a worker holds at most two batches' worth in flight"),
				settings.Duration(fs, env, &cfg.FlushInterval, "flush-interval", "PIPELINE_FLUSH_INTERVAL", cfg.FlushInterval, "the longest a batch waits to fill before it is inserted (it goes on at once when the partition's earlier batches are stored and no input waits)"),
				settings.Duration(fs, env, &cfg.InsertTimeout, "insert-timeout", "PIPELINE_INSERT_TIMEOUT", cfg.InsertTimeout, "longest an insert may take"),
				settings.Duration(fs, env, &cfg.SnapshotInterval, "snapshot-interval", "PIPELINE_SNAPSHOT_INTERVAL", cfg.SnapshotInterval, "how often the state (dedup keys, alert windows, position) is saved"),
				settings.Duration(fs, env, &cfg.StallAfter, "stall-after", "PIPELINE_STALL_AFTER", cfg.StallAfter, "a partition that holds input and stores none of it this long is reported stalled (/readyz, sluice_pipeline_stalled)"),
				settings.Bool(fs, env, &cfg.StallRestart, "stall-restart", "PIPELINE_STALL_RESTART", cfg.StallRestart, "a stalled partition's run also ends and starts again from its state (a new consumer and writer)"),
				settings.Duration(fs, env, &cfg.LeaseTTL, "lease-ttl", "PIPELINE_LEASE_TTL", cfg.LeaseTTL, "how long a partition's claim lasts unrenewed: another worker takes the partition over this long after its owner dies"),
				settings.Int(fs, env, &cfg.Partitions, "partitions", "SLUICE_PARTITIONS", cfg.Partitions, "partitions of the input, the same for every worker: 1 (every worker reads EVENTS whole, one at a time) or more (a keying step divides EVENTS by event key; each partition has one owner; see docs/scaling.md)"),
			)
		},
		Run: func(ctx context.Context, env service.Env) error {
			f, err := env.ConfigFile()
			if err != nil {
				return err
			}
			if cfg.Window, err = dedup.LoadWindowConfig(f); err != nil {
				return err
			}
			if cfg.Ingest, err = dedup.LoadIngest(f); err != nil {
				return err
			}
			if cfg.Typed, err = sink.LoadTypedTables(f); err != nil {
				return err
			}
			if cfg.Enrich.Enrich, err = enrich.LoadEnrichConfig(f); err != nil {
				return err
			}
			cfg.DataDir = env.Service.DataDir
			cfg.Enrich.ConfigPath = env.Service.ConfigPath
			cfg.Enrich.Secrets = os.LookupEnv
			cfg.Replicas, cfg.Enrich.Replicas = env.Service.Replicas, env.Service.Replicas
			if cfg.Alert, err = alert.LoadConfig(f); err != nil {
				var re *alert.RuleError
				if !errors.As(err, &re) {
					return err
				}
				env.Log.Error("rules that did not load are left out; the rest run", "err", err)
			}
			// Fault injection for the crash tests (test/procs); unset in production.
			if v, ok := os.LookupEnv("SLUICE_TEST_CRASH"); ok {
				if cfg.Crash, err = crash.Parse(v); err != nil {
					return fmt.Errorf("SLUICE_TEST_CRASH: %w", err)
				}
			}
			// ClickHouse may not answer yet (starting beside this service): wait,
			// not ready meanwhile, rather than exit into a restart loop.
			conn, err := chconn.Wait(ctx, env.ClickHouse, func(err error) { env.Ready.Set("clickhouse", err) }, env.Log)
			if ctx.Err() != nil {
				return nil
			}
			if err != nil {
				return err
			}
			defer conn.Close()
			shards, err := chconn.OpenShards(ctx, conn, env.ClickHouse)
			if err != nil {
				return err
			}
			defer shards.Close()
			return pipeline.Run(ctx, cfg, pipeline.Deps{
				NATS: env.NATS, ClickHouse: conn, Shards: shards, Logger: env.Log, Registerer: env.Registerer, Ready: env.Ready,
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
