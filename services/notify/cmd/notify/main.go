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
		Summary:     "delivers alerts from ALERTS to the webhooks of SLUICE_CONFIG, signed, with durable retries",
		MetricsAddr: "127.0.0.1:9304",
		Config:      true,
		Run: func(ctx context.Context, env service.Env) error {
			f, err := env.ConfigFile()
			if err != nil {
				return err
			}
			receivers, err := notify.LoadReceivers(f, os.LookupEnv)
			if err != nil {
				return err
			}
			cfg := notify.DefaultConfig()
			cfg.Receivers = receivers
			return notify.Run(ctx, cfg, notify.Deps{
				NATS: env.NATS, Logger: env.Log, Registerer: env.Registerer,
				Ready: func() { env.Ready.Set("consumer", nil) },
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
