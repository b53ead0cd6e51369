// Command sink runs the ClickHouse sink against an external NATS server and ClickHouse.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/crash"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/sink"
)

func main() {
	cfg := sink.DefaultConfig()
	var tables string
	os.Exit(service.Main(service.Spec{
		Name:        "sink",
		Summary:     "inserts events, alerts and dead letters into ClickHouse in batches, acking after each insert",
		MetricsAddr: "127.0.0.1:9305",
		ClickHouse:  true,
		Config:      true,
		Flags: func(fs *flag.FlagSet, env settings.Lookup) error {
			settings.String(fs, env, &tables, "tables", "SINK_TABLES", strings.Join(sink.TableNames(), ","),
				"tables to fill, comma-separated (leave out events when the pipeline service writes them); with events, the typed tables of SLUICE_CONFIG too")
			return errors.Join(
				settings.Int(fs, env, &cfg.MaxRows, "batch-max-rows", "SINK_BATCH_MAX_ROWS", cfg.MaxRows, "most rows in one insert (keep at or under the consumers' max_ack_pending)"),
				settings.Duration(fs, env, &cfg.FlushInterval, "flush-interval", "SINK_FLUSH_INTERVAL", cfg.FlushInterval, "how long a batch waits to fill before it is inserted"),
				settings.Duration(fs, env, &cfg.InsertTimeout, "insert-timeout", "SINK_INSERT_TIMEOUT", cfg.InsertTimeout, "longest an insert may take"),
			)
		},
		Run: func(ctx context.Context, env service.Env) error {
			if cfg.MaxRows <= 0 || cfg.FlushInterval <= 0 || cfg.InsertTimeout <= 0 {
				return errors.New("--batch-max-rows, --flush-interval and --insert-timeout must be positive")
			}
			for t := range strings.SplitSeq(tables, ",") {
				if t = strings.TrimSpace(t); t != "" {
					cfg.Tables = append(cfg.Tables, t)
				}
			}
			if len(cfg.Tables) == 0 {
				return errors.New("--tables names no table")
			}
			f, err := env.ConfigFile()
			if err != nil {
				return err
			}
			if cfg.Typed, err = sink.LoadTypedTables(f); err != nil {
				return err
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
			// Fault injection for the crash tests (test/procs); unset in production.
			if v, ok := os.LookupEnv("SLUICE_TEST_CRASH"); ok {
				inj, err := crash.Parse(v)
				if err != nil {
					return fmt.Errorf("SLUICE_TEST_CRASH: %w", err)
				}
				cfg.Crash = inj
			}
			shards, err := chconn.OpenShards(ctx, conn, env.ClickHouse)
			if err != nil {
				return err
			}
			defer shards.Close()
			return sink.Run(ctx, cfg, sink.Deps{
				NATS: env.NATS, ClickHouse: conn, Shards: shards, Logger: env.Log, Registerer: env.Registerer, Ready: env.Ready,
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
