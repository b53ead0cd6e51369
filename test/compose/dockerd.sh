#!/usr/bin/env bash
# Start or stop a Docker engine for the compose suite on a machine without systemd.
#   test/compose/dockerd.sh start   # if no engine answers: start dockerd, wait for it
#   test/compose/dockerd.sh stop    # stop the dockerd this script started
set -euo pipefail
pidfile=/var/run/sluice-dockerd.pid
log=/tmp/sluice-dockerd.log
case "${1:-}" in
start)
	if docker info >/dev/null 2>&1; then exit 0; fi
	command -v dockerd >/dev/null || { echo "dockerd is missing: run make docker" >&2; exit 1; }
	echo "starting dockerd (log: $log)"
	# Containers may ask for up to dockerd's own open-file limit (compose.yaml gives
	# ClickHouse 262144); systemd would raise it, so try that here (a sandbox may not
	# allow it: the suite's override then leaves the ClickHouse limit out).
	ulimit -n "$(cat /proc/sys/fs/nr_open)" 2>/dev/null || true
	nohup dockerd --pidfile "$pidfile" >"$log" 2>&1 &
	for _ in $(seq 1 120); do
		if docker info >/dev/null 2>&1; then exit 0; fi
		sleep 0.5
	done
	echo "dockerd did not answer within 60 s; its log:" >&2
	tail -20 "$log" >&2
	exit 1
	;;
stop)
	if [ -f "$pidfile" ]; then
		pid=$(cat "$pidfile")
		kill "$pid" 2>/dev/null || true
		for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.5; done
		kill -9 "$pid" 2>/dev/null || true
	fi
	;;
*)
	echo "usage: $0 start|stop" >&2
	exit 2
	;;
esac
