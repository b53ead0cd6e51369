// Command dedup runs the dedup stage against an external NATS server.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/stage"
)

func main() {
	os.Exit(service.Main(service.Spec{
		Name:        "dedup",
		Summary:     "validates raw events, drops repeats inside the dedup window, publishes to UNIQUE",
		MetricsAddr: "127.0.0.1:9301",
		Config:      true,
		DataDir:     true,
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
			// Fault injection for the fault tests (test/procs); unset in production.
			if v, ok := os.LookupEnv("SLUICE_TEST_SLOW"); ok {
				if cfg.Stage.Slow, err = stage.ParseSlow(v); err != nil {
					return fmt.Errorf("SLUICE_TEST_SLOW: %w", err)
				}
			}
			return dedup.Run(ctx, cfg, dedup.Deps{
				NATS: env.NATS, Logger: env.Log, Registerer: env.Registerer,
				Ready: func() { env.Ready.Set("consumer", nil) },
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
