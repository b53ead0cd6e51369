// Command notify runs the notify stage against an external NATS server.
package main

import (
	"context"
	"flag"
	"os"

	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/notify"
)

func main() {
	stallAfter := stage.DefaultStallAfter
	os.Exit(service.Main(service.Spec{
		Name:        "notify",
		Summary:     "routes alerts from ALERTS to the receivers of SLUICE_CONFIG (grouped, silenced, inhibited) and delivers them signed, with durable retries",
		MetricsAddr: "127.0.0.1:9304",
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
			cfg, err := notify.LoadConfig(f, os.LookupEnv)
			if err != nil {
				return err
			}
			cfg.Replicas = env.Service.Replicas
			cfg.StallAfter = stallAfter
			return notify.Run(ctx, cfg, notify.Deps{
				NATS: env.NATS, Logger: env.Log, Registerer: env.Registerer,
				Ready: func() { env.Ready.Set("consumer", nil) }, Readiness: env.Ready,
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
