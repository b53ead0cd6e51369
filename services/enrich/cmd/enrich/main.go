// Command enrich runs the enrich stage against an external NATS server.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/stage"
)

func main() {
	os.Exit(service.Main(service.Spec{
		Name:        "enrich",
		Summary:     "adds lookups, geo and user-agent fields to unique events and masks sensitive ones, publishes to ENRICHED",
		MetricsAddr: "127.0.0.1:9302",
		Config:      true,
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
				Ready: func() { env.Ready.Set("consumer", nil) },
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
