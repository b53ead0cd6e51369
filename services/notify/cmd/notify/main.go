// Command notify runs the notify stage against an external NATS server.
package main

import (
	"context"
	"os"

	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/notify"
)

func main() {
	os.Exit(service.Main(service.Spec{
		Name:        "notify",
		Summary:     "routes alerts from ALERTS to the receivers of SLUICE_CONFIG (grouped, silenced, inhibited) and delivers them signed, with durable retries",
		MetricsAddr: "127.0.0.1:9304",
		Config:      true,
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
			return notify.Run(ctx, cfg, notify.Deps{
				NATS: env.NATS, Logger: env.Log, Registerer: env.Registerer,
				Ready: func() { env.Ready.Set("consumer", nil) },
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
