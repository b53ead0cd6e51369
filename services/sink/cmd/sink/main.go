// Command sink runs the ClickHouse sink against an external NATS server and ClickHouse.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/sink"
)

func main() {
	os.Exit(service.Main(service.Spec{
		Name:        "sink",
		Summary:     "inserts events, alerts and dead letters into ClickHouse in batches, acking after each insert",
		MetricsAddr: "127.0.0.1:9305",
		ClickHouse:  true,
		Run: func(ctx context.Context, env service.Env) error {
			conn, err := chconn.Open(ctx, env.ClickHouse)
			if err != nil {
				return err
			}
			defer conn.Close()
			cfg := sink.DefaultConfig()
			// Fault injection for the crash tests (test/procs); unset in production.
			if v, ok := os.LookupEnv("SLUICE_TEST_CRASH"); ok {
				crash, err := sink.ParseCrash(v)
				if err != nil {
					return fmt.Errorf("SLUICE_TEST_CRASH: %w", err)
				}
				cfg.Crash = crash
			}
			return sink.Run(ctx, cfg, sink.Deps{
				NATS: env.NATS, ClickHouse: conn, Logger: env.Log, Registerer: env.Registerer, Ready: env.Ready,
			})
		},
	}, os.Args[1:], os.LookupEnv, os.Stderr))
}
