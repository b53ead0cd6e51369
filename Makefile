# sluice: `make up` runs the platform, `make test` runs every test.
# Both install what a fresh Debian/Ubuntu machine with Go lacks.

SHELL := /bin/bash
GO ?= go
# Every module of the workspace, as package patterns.
MODULES := ./schemas/... ./streams/... ./services/kit/... ./services/dedup/... ./services/enrich/... \
           ./services/alert/... ./services/notify/... ./services/sink/... ./services/pipeline/... ./services/sluice/... ./test/...
MODULE_DIRS := schemas streams services/kit services/dedup services/enrich services/alert services/notify services/sink services/pipeline services/sluice test
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CHDB_VERSION := 26.5.3
CHDB_LIB := .tools/chdb/node_modules/@chdb/lib-linux-x64-gnu/libchdb.so
COMPOSE_VERSION := v2.40.3
BINARIES := sluice dedup enrich alert notify sink pipeline
# `make up` and `make listen` share a demo signing secret; set your own for real use.
# Only those two targets see these (the tests set their own).
SLUICE_CONFIG ?= examples/sluice.yaml
WEBHOOK_SECRET ?= whsec_c2x1aWNlLWRlbW8tc2VjcmV0LWNoYW5nZS1tZQ==
up listen: export SLUICE_CONFIG := $(SLUICE_CONFIG)
up listen: export WEBHOOK_SECRET := $(WEBHOOK_SECRET)

.PHONY: up listen test test-compose fuzz deps clickhouse zookeeper chdb nettools docker promtool chromium compose-plugin build vet modules bench clean help
FUZZTIME ?= 10s

help:
	@echo "make up     install what is missing, then run NATS + every stage (+ a local ClickHouse if none answers)"
	@echo "make test   install what is missing, then vet and run every test"
	@echo "make test-compose  only the compose suite (test/compose: compose.yaml with images built here)"
	@echo "make listen a local webhook receiver on 127.0.0.1:8080 that checks signatures"
	@echo "make build  build bin/{$(BINARIES)}"
	@echo "make bench  run the benchmarks (not part of make test)"
	@echo "make fuzz   run each fuzz target for FUZZTIME (10s; part of make test)"

## up: run the whole platform from one command.
up: clickhouse build
	./bin/sluice up

## listen: the webhook receiver of examples/sluice.yaml.
listen: build
	./bin/sluice webhook listen --addr 127.0.0.1:8080

## test: the whole suite, as CI runs it.
test: deps vet modules
	CHDB_LIB=$(CURDIR)/$(CHDB_LIB) $(GO) test -race -count=1 -timeout 60m $(MODULES)
	$(MAKE) fuzz

## test-compose: the compose suite alone.
test-compose: docker
	cd test && $(GO) test -count=1 -timeout 30m -v ./compose/

## fuzz: each fuzz target for FUZZTIME (the saved corpora run in every make test too).
# Go 1.26's fuzz coordinator can report "context deadline exceeded" when FUZZTIME ends
# while a worker is mid-input (golang/go#75804, fixed in Go 1.27): such a run, with no
# failing input written, is run again, up to twice (FuzzEngine's inputs, tens of ms
# each with their disk checks, meet it in about one run of three here); any other
# failure fails.
FUZZ = echo "fuzz $(1) for $(FUZZTIME)"; run() { $(GO) test -run '^$$' -fuzz "^$$1\$$" -fuzztime $(FUZZTIME) "$$2" 2>&1 | tee /tmp/sluice-fuzz.log; return $${PIPESTATUS[0]}; }; \
	race() { grep -q 'context deadline exceeded' /tmp/sluice-fuzz.log && ! grep -q 'Failing input written' /tmp/sluice-fuzz.log \
	&& echo "$(1): the fuzz coordinator deadline race (Go issue 75804), no failing input; again"; }; \
	run $(1) $(2) || { race && run $(1) $(2); } || { race && run $(1) $(2); }
fuzz:
	@cd schemas && $(call FUZZ,FuzzDecode,./events/)
	@cd schemas && $(call FUZZ,FuzzValid,./events/)
	@cd schemas && $(call FUZZ,FuzzDecodeDataFields,./events/)
	@cd schemas && $(call FUZZ,FuzzIngest,./events/)
	@cd schemas && $(call FUZZ,FuzzDecode,./keyed/)
	@cd services/alert && $(call FUZZ,FuzzRule,.)
	@cd services/alert && $(call FUZZ,FuzzEngine,.)
	@cd services/alert && $(call FUZZ,FuzzPartitionedOrder,.)
	@cd services/alert && $(call FUZZ,FuzzStateBinary,.)
	@cd services/sluice && $(call FUZZ,FuzzConfig,./platform/)

deps: clickhouse zookeeper chdb nettools docker promtool chromium

# Chromium (Debian's) runs the status page's browser test (services/sluice/platform).
chromium:
	@if command -v chromium >/dev/null; then :; else \
		echo "installing chromium (for the status page's browser test) from Debian's archive"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	fi

# promtool (Debian's prometheus package) checks deploy/prometheus/sluice-rules.yml.
promtool:
	@if command -v promtool >/dev/null; then :; else \
		echo "installing prometheus (for promtool) from Debian's archive"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	fi

# The compose suite's needs: Debian's docker.io and debootstrap (its ClickHouse image
# is a Debian root filesystem), the compose plugin (not packaged in bookworm: built from
# the Go module proxy), and a running dockerd (test/compose/dockerd.sh starts one if
# none answers; .ci/run stops it).
docker:
	@if command -v dockerd >/dev/null && command -v debootstrap >/dev/null; then :; else \
		echo "installing docker.io and debootstrap from Debian's archive"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq docker.io debootstrap >/dev/null; \
	fi
	@docker compose version >/dev/null 2>&1 || $(MAKE) compose-plugin
	@$(SUDO) test/compose/dockerd.sh start

compose-plugin:
	@echo "building docker compose $(COMPOSE_VERSION) from the Go module proxy into ~/.docker/cli-plugins"
	@dir=$$(cd "$$(mktemp -d)" && GOWORK=off $(GO) mod download -json github.com/docker/compose/v2@$(COMPOSE_VERSION) | sed -n 's/.*"Dir": "\(.*\)",/\1/p'); \
	test -n "$$dir" && rm -rf .tools/compose-src && mkdir -p .tools "$$HOME/.docker/cli-plugins" && cp -r "$$dir" .tools/compose-src && \
	chmod -R u+w .tools/compose-src && cd .tools/compose-src && GOWORK=off $(GO) build -ldflags "-X github.com/docker/compose/v2/internal.Version=$(COMPOSE_VERSION)" -o "$$HOME/.docker/cli-plugins/docker-compose" ./cmd

# ip and iptables, for the NATS cluster tests (test/procs: a node cut off in a network
# namespace).
nettools:
	@if command -v ip >/dev/null && command -v iptables >/dev/null; then :; else \
		echo "installing iproute2 and iptables from Debian's archive"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq iproute2 iptables >/dev/null; \
	fi

# Debian's zookeeper (with java) for the ClickHouse cluster tests (kit/chcluster:
# replicated tables need ZooKeeper or Keeper).
zookeeper:
	@if test -f /usr/share/java/zookeeper.jar && command -v java >/dev/null; then :; else \
		echo "installing zookeeper (for the ClickHouse cluster tests) from Debian's archive"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends zookeeper >/dev/null; \
	fi

# Debian's clickhouse-server (18.16 on bookworm) when no ClickHouse is installed.
clickhouse:
	@if command -v clickhouse-server >/dev/null || command -v clickhouse >/dev/null; then :; else \
		echo "installing clickhouse-server from Debian's archive"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq clickhouse-server clickhouse-client >/dev/null; \
	fi

# chDB (current ClickHouse, in-process) to check the DDL and queries on a current engine.
chdb: $(CHDB_LIB)
$(CHDB_LIB):
	@command -v npm >/dev/null || { echo "installing npm from Debian's archive (for chDB)"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq npm >/dev/null; }
	mkdir -p .tools/chdb
	npm install --no-save --no-audit --no-fund --loglevel=error --prefix .tools/chdb @chdb/lib-linux-x64-gnu@$(CHDB_VERSION)

build:
	@mkdir -p bin
	$(GO) build -o bin/sluice ./services/sluice/cmd/sluice
	$(GO) build -o bin/dedup ./services/dedup/cmd/dedup
	$(GO) build -o bin/enrich ./services/enrich/cmd/enrich
	$(GO) build -o bin/alert ./services/alert/cmd/alert
	$(GO) build -o bin/notify ./services/notify/cmd/notify
	$(GO) build -o bin/sink ./services/sink/cmd/sink
	$(GO) build -o bin/pipeline ./services/pipeline/cmd/pipeline

vet:
	$(GO) vet $(MODULES)
	@unformatted=$$(gofmt -l $(MODULE_DIRS)); if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi

# Each module builds on its own (GOWORK=off) and its go.mod is tidy.
modules:
	@for d in $(MODULE_DIRS); do \
		(cd $$d && GOWORK=off $(GO) build ./... && GOWORK=off $(GO) mod tidy -diff >/dev/null) || { echo "module $$d: does not build alone or go.mod is not tidy (run: cd $$d && GOWORK=off go mod tidy)"; exit 1; }; \
	done
	@echo "every module builds with GOWORK=off and is tidy"

bench: deps
	CHDB_LIB=$(CURDIR)/$(CHDB_LIB) $(GO) test -run '^$$' -bench . -benchmem -timeout 60m $(MODULES)

clean:
	rm -rf bin data
