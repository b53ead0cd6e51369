// Package e2e runs the whole pipeline against an embedded JetStream server and a
// real clickhouse-server, and checks what landed against what was published.
package e2e

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/poll"
	pipelinestage "github.com/sluicehq/sluice/services/pipeline"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/sluice/platform"
	"github.com/sluicehq/sluice/test/oracle"
)

type pipeline struct {
	nc *nats.Conn
	js jetstream.JetStream
	ch driver.Conn
	// split runs the split stages (set before start); the pipeline stage otherwise.
	split bool
	start func()
	stop  func()
}

// modes are the two ways to run the stages, for tests that run in both.
var modes = []struct {
	name  string
	split bool
}{{"pipeline", false}, {"split", true}}

// startPipeline runs every stage in this process against a fresh JetStream server
// and a fresh ClickHouse database, with cfg as SLUICE_CONFIG.
func startPipeline(t testing.TB, cfg string, env map[string]string) *pipeline {
	t.Helper()
	p := newPipeline(t, cfg, env)
	p.start()
	return p
}

// startPipelineStopped prepares the servers and topology; p.start runs the stages.
func startPipelineStopped(t testing.TB) *pipeline { return newPipeline(t, "", nil) }

func newPipeline(t testing.TB, cfg string, env map[string]string) *pipeline {
	t.Helper()
	return newPipelineOn(t, natstest.Run(t), cfg, env)
}

func newPipelineOn(t testing.TB, ns *natstest.Server, cfg string, env map[string]string) *pipeline {
	t.Helper()
	srv := chtest.Start(t)
	_, conn := chtest.Database(t, srv)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	file, err := configfile.Parse("test.yaml", []byte(cfg))
	if err != nil {
		t.Fatal(err)
	}
	stageConn, err := nats.Connect(ns.URL)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var (
		wg      sync.WaitGroup
		started bool
	)
	errc := make(chan error, 1)
	p := &pipeline{nc: nc, js: js, ch: conn}
	p.start = func() {
		started = true
		wg.Go(func() {
			errc <- platform.RunStages(runCtx, platform.Stages{
				NATS: stageConn, ClickHouse: conn, Config: file, Split: p.split,
				Env: func(k string) (string, bool) { v, ok := env[k]; return v, ok },
				Log: log, Registerer: prometheus.NewRegistry(), Ready: &telemetry.Readiness{},
			})
		})
		if !p.split {
			// Input stored before the pipeline stage first has state is a replay (its
			// alerts reach no receiver): wait until it has.
			poll.Until(t, time.Minute, func() error {
				kv, err := js.KeyValue(ctx, pipelinestage.Bucket)
				if err != nil {
					return err
				}
				o, err := partition.Owner(ctx, kv, 0)
				if err == nil && o.State == "" {
					err = errors.New("no state saved yet")
				}
				return err
			})
		}
	}
	var once sync.Once
	p.stop = func() {
		once.Do(func() {
			cancel()
			wg.Wait()
			stageConn.Close()
			if !started {
				return
			}
			if err := <-errc; err != nil {
				t.Errorf("stages: %v", err)
			}
		})
	}
	t.Cleanup(p.stop)
	return p
}

// idle reports nil when no consumer has work pending or unacked (the pipeline
// stage reads EVENTS without a durable consumer: the tests wait for its rows).
func (p *pipeline) idle(ctx context.Context) error {
	consumers := [][2]string{{"ALERTS", "notify"}, {"ALERTS", "sink"}, {"DLQ", "sink"}}
	if p.split {
		consumers = append(consumers, [][2]string{{"EVENTS", "dedup"}, {"UNIQUE", "enrich"}, {"ENRICHED", "sink"}}...)
	}
	for _, sc := range consumers {
		if err := natstest.Idle(ctx, p.js, sc[0], sc[1]); err != nil {
			return err
		}
	}
	return nil
}

// TestEndToEnd publishes 10,000 messages as the nats CLI does (structured and binary
// CloudEvents, with and without Nats-Msg-Id, 5% repeats, 1% invalid) and checks that
// ClickHouse holds exactly the unique valid events and the DLQ exactly the invalid ones.
func TestEndToEnd(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			p := newPipeline(t, "", nil)
			p.split = mode.split
			p.start()
			endToEnd(t, p)
		})
	}
}

func endToEnd(t *testing.T, p *pipeline) {
	m := oracle.NewManifest(oracle.Spec{Total: 10_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 1})
	if err := m.PublishAll(p.nc, 200); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	wantEvents, wantDead := uint64(len(m.Events)), uint64(len(m.Invalid))
	err := oracle.WaitFor(ctx, 2*time.Minute, func() error {
		c, err := oracle.ReadCounts(ctx, p.ch)
		if err != nil {
			return err
		}
		if c.Events < wantEvents || c.DeadLetters < wantDead {
			return fmt.Errorf("events %d/%d, dead letters %d/%d", c.Events, wantEvents, c.DeadLetters, wantDead)
		}
		return p.idle(ctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Check(ctx, p.ch); err != nil {
		t.Fatal(err)
	}
	// Every reason names the problem.
	rows, err := p.ch.Query(ctx, "SELECT reason FROM dead_letters WHERE stage IN ('dedup', 'pipeline')")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	n := 0
	for rows.Next() {
		var reason string
		if err := rows.Scan(&reason); err != nil {
			t.Fatal(err)
		}
		if len(reason) < len("invalid event: ")+5 {
			t.Errorf("reason %q does not say what is wrong", reason)
		}
		n++
	}
	if n != len(m.Invalid) {
		t.Errorf("dedup dead letters = %d, want %d", n, len(m.Invalid))
	}
	if !p.split {
		return
	}
	var errs []error
	for _, c := range []struct{ stream, subject string }{{"UNIQUE", "unique.>"}, {"ENRICHED", "enriched.>"}} {
		s, err := p.js.Stream(ctx, c.stream)
		if err != nil {
			t.Fatal(err)
		}
		if got := s.CachedInfo().State.Msgs; got != wantEvents {
			errs = append(errs, fmt.Errorf("stream %s holds %d messages, want %d", c.stream, got, wantEvents))
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Error(err)
	}
}
