#!/bin/sh
# Writes the compose stack's passwords to .env beside compose.yaml: a random one for
# each of ClickHouse's sluice user and the NATS users (deploy/nats/auth.conf) that
# .env does not set yet. Run it once before `docker compose up`; running it again
# keeps what is there.
set -eu
env_file="${1:-$(dirname "$0")/../.env}"
touch "$env_file"
chmod 600 "$env_file"
for name in CLICKHOUSE_PASSWORD NATS_ADMIN_PASSWORD NATS_PRODUCER_PASSWORD \
	NATS_PIPELINE_PASSWORD NATS_NOTIFY_PASSWORD NATS_SINK_PASSWORD; do
	if ! grep -q "^$name=" "$env_file"; then
		echo "$name=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" >> "$env_file"
		echo "$env_file: set $name"
	fi
done
