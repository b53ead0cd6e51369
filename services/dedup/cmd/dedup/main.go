// Command dedup runs the dedup stage against an external NATS server.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/stage"
)

func main() {
	stallAfter := stage.DefaultStallAfter
	os.Exit(service.Main(service.Spec{
		Name:        "dedup",
		Summary:     "validates raw events, drops repeats inside the dedup window, publishes to UNIQUE",
		MetricsAddr: "127.0.0.1:9301",
		Config:      true,
		DataDir:     true,
		Flags: func(fs *flag.FlagSet, env settings.Lookup) error {
			return settings.Duration(fs, env, &stallAfter, "stall-after", "STAGE_STALL_AFTER", stallAfter,
				"a stage that holds input and finishes none of it this long is reported stalled (/readyz, sluice_stage_stalled)")
		},
		Run: func(ctx context.Context, env service.Env) error {
			f, err := env.ConfigFile()
			if err != nil {
				return err
			}
			cfg := dedup.DefaultConfig()
			if cfg.Window, err = dedup.LoadWindowConfig(f); err != nil {
				return err
			}
			if cfg.Ingest, err = dedup.LoadIngest(f); err != nil {
				return err
			}
			cfg.DataDir = env.Service.DataDir
			cfg.Stage.StallAfter = stallAfter
			// Fault injection for the fault tests (test/procs); unset in production.
			if v, ok := os.LookupEnv("SLUICE_TEST_SLOW"); ok {
				if cfg.Stage.Slow, err = stage.ParseSlow(v); err != nil {
					return fmt.Errorf("SLUICE_TEST_SLOW: %w", err)
				}
			}
			return dedup.Run(ctx, cfg, dedup.Deps{
				NATS: env.NATS, Logger: env.Log, Registerer: env.Registerer,
				Ready: func() { env.Ready.Set("consumer", nil) }, Readiness: env.Ready,
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
