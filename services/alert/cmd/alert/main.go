// Command alert runs the alert stage against an external NATS server.
package main

import (
	"context"
	"errors"
	"os"
	"path/filepath"

	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/kit/service"
)

func main() {
	os.Exit(service.Main(service.Spec{
		Name:        "alert",
		Summary:     "evaluates the rules of SLUICE_CONFIG on enriched events in event time, publishes alert changes to ALERTS",
		MetricsAddr: "127.0.0.1:9303",
		Config:      true,
		DataDir:     true,
		Run: func(ctx context.Context, env service.Env) error {
			f, err := env.ConfigFile()
			if err != nil {
				return err
			}
			cfg, err := alert.LoadConfig(f)
			if err != nil {
				var re *alert.RuleError
				if !errors.As(err, &re) {
					return err
				}
				env.Log.Error("rules that did not load are left out; the rest run", "err", err)
			}
			cfg.Replicas = env.Service.Replicas
			cfg.GroupsDir = filepath.Join(env.Service.DataDir, "alert")
			return alert.Run(ctx, cfg, alert.Deps{
				NATS: env.NATS, Logger: env.Log, Registerer: env.Registerer,
				Ready: func() { env.Ready.Set("consumer", nil) },
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
