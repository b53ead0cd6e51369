package procs

import (
	"os"
	"strings"
)

// cleanEnv is the test process's environment without the variables that configure
// sluice services, so a service started by a test gets only what the test sets.
func cleanEnv() []string {
	var out []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "SLUICE_") || strings.HasPrefix(name, "NATS_") || strings.HasPrefix(name, "CLICKHOUSE_") ||
			strings.HasPrefix(name, "SINK_") || name == "METRICS_ADDR" || strings.HasPrefix(name, "LOG_") || name == "WEBHOOK_SECRET" {
			continue
		}
		out = append(out, kv)
	}
	return out
}
