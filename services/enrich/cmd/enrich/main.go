// Command enrich runs the enrich stage against an external NATS server.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/stage"
)

func main() {
	stallAfter := stage.DefaultStallAfter
	os.Exit(service.Main(service.Spec{
		Name:        "enrich",
		Summary:     "adds lookups, geo and user-agent fields to unique events and masks sensitive ones, publishes to ENRICHED",
		MetricsAddr: "127.0.0.1:9302",
		Config:      true,
		Flags: func(fs *flag.FlagSet, env settings.Lookup) error {
			return settings.Duration(fs, env, &stallAfter, "stall-after", "STAGE_STALL_AFTER", stallAfter,
				"a stage that holds input and finishes none of it this long is reported stalled (/readyz, sluice_stage_stalled)")
		},
		Run: func(ctx context.Context, env service.Env) error {
			f, err := env.ConfigFile()
			if err != nil {
				return err
			}
			cfg := enrich.DefaultConfig()
			if cfg.Enrich, err = enrich.LoadEnrichConfig(f); err != nil {
				return err
			}
			cfg.ConfigPath = env.Service.ConfigPath
			cfg.Stage.StallAfter = stallAfter
			cfg.Secrets = os.LookupEnv
			cfg.Replicas = env.Service.Replicas
			// Fault injection for the fault tests (test/procs); unset in production.
			if v, ok := os.LookupEnv("SLUICE_TEST_SLOW"); ok {
				if cfg.Stage.Slow, err = stage.ParseSlow(v); err != nil {
					return fmt.Errorf("SLUICE_TEST_SLOW: %w", err)
				}
			}
			return enrich.Run(ctx, cfg, enrich.Deps{
				NATS: env.NATS, Logger: env.Log, Registerer: env.Registerer,
				Ready: func() { env.Ready.Set("consumer", nil) }, Readiness: env.Ready,
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
