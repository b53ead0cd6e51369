// Package enrich is the enrich stage: it reads UNIQUE, applies the enrich rules of
// SLUICE_CONFIG (lookups in NATS KV buckets and files, geo by IP prefix, user-agent
// parsing, derived fields, masks) and publishes each event to ENRICHED with
// Nats-Msg-Id = the event key, acking its input after the publish ack.
//
// Tables are held in memory and refreshed without a restart: KV buckets by a watch,
// files when they change. A change of the config file swaps in the new rules and
// tables once they all load; a config that does not keeps the running one.
package enrich

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// Name is the stage's name in logs, metrics and dead letters.
const Name = "enrich"

// Subject prefixes of the input and output streams.
const (
	InputPrefix  = "unique."
	OutputPrefix = "enriched."
)

// Config configures the stage.
type Config struct {
	Stage  stage.Config
	Enrich EnrichConfig
	// ConfigPath, if set, is watched: a change reloads Enrich from its enrich section.
	ConfigPath string
	// Secrets reads the HMAC keys that masks name (os.LookupEnv in mains).
	Secrets func(string) (string, bool)
}

// DefaultConfig reads the enrich consumer of UNIQUE, with no rules.
func DefaultConfig() Config {
	return Config{Stage: stage.Config{Name: Name, Stream: streams.Unique, Consumer: "enrich"}, Enrich: DefaultEnrichConfig(),
		Secrets: func(string) (string, bool) { return "", false }}
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Ready      func()
}

// Handler enriches events with the current runtime's rules.
type Handler struct {
	current    atomic.Pointer[runtime]
	maxPayload int64
}

// Handle returns the ENRICHED message for an event, or a dead letter when the input
// is not a sluice event.
func (h *Handler) Handle(msg jetstream.Msg) ([]*nats.Msg, error) {
	if rt := h.current.Load(); rt == nil || len(rt.en.rules) == 0 {
		// Nothing to add: forward the event as it is, keyed as dedup keyed it.
		if key := msg.Headers().Get(nats.MsgIdHdr); key != "" {
			out := nats.NewMsg(OutputPrefix + strings.TrimPrefix(msg.Subject(), InputPrefix))
			out.Header.Set(nats.MsgIdHdr, key)
			out.Data = msg.Data()
			return []*nats.Msg{out}, nil
		}
	}
	body, key, err := h.enrich(msg.Data())
	if err != nil {
		return []*nats.Msg{stage.DeadLetter(Name, msg, err.Error(), h.maxPayload)}, nil
	}
	out := nats.NewMsg(OutputPrefix + strings.TrimPrefix(msg.Subject(), InputPrefix))
	out.Header.Set(nats.MsgIdHdr, key)
	out.Data = body
	return []*nats.Msg{out}, nil
}

func (h *Handler) enrich(data []byte) ([]byte, string, error) {
	e, err := events.Unmarshal(data)
	if err != nil {
		return nil, "", err
	}
	if e.Key == "" {
		return nil, "", errors.New("event has no sluicekey (was it published to unique.> by something other than the dedup stage?)")
	}
	rt := h.current.Load()
	if rt == nil || len(rt.en.rules) == 0 {
		return data, e.Key, nil
	}
	rt.en.Enrich(e)
	body, err := e.Marshal()
	if err != nil {
		return nil, "", fmt.Errorf("cannot encode the enriched event: %w", err)
	}
	return body, e.Key, nil
}

// Run loads the tables, runs the stage until ctx is done, and reloads the rules
// when the config file changes.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	js, err := jetstream.New(deps.NATS)
	if err != nil {
		return err
	}
	log := deps.Logger.With("stage", Name)
	misses := telemetry.Register(deps.Registerer, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_enrich_lookup_misses_total", Help: "Lookups whose key a table lacks (the table's default applies), by table.",
	}, []string{"table"}))
	reloads := telemetry.Register(deps.Registerer, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_enrich_config_reloads_total", Help: "Reloads of the enrich config, by result (ok, failed: the running config stays).",
	}, []string{"result"}))
	fileReloads := telemetry.Register(deps.Registerer, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_enrich_file_reloads_total", Help: "Reloads of changed table files, by file and result (ok, failed: the previous table stays).",
	}, []string{"file", "result"}))
	miss := func(table string) { misses.WithLabelValues(table).Inc() }
	reloaded := func(file, result string) { fileReloads.WithLabelValues(file, result).Inc() }
	ua, err := NewUserAgents(20_000)
	if err != nil {
		return fmt.Errorf("enrich: %w", err)
	}
	start := func(ec EnrichConfig) (*runtime, error) {
		return startRuntime(ctx, ec, js, ua, cfg.Secrets, log, miss, reloaded)
	}
	rt, err := start(cfg.Enrich)
	if err != nil {
		return err
	}
	h := &Handler{maxPayload: deps.NATS.MaxPayload()}
	h.current.Store(rt)
	defer func() { h.current.Load().close() }()
	log.Info("enrich rules loaded", "rules", len(cfg.Enrich.Rules), "tables", len(cfg.Enrich.Tables), "geo", len(cfg.Enrich.Geo))

	var wg sync.WaitGroup
	defer wg.Wait()
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	if cfg.ConfigPath != "" {
		wg.Go(func() {
			watchConfig(watchCtx, cfg.ConfigPath, cfg.Enrich.ReloadInterval, log, func(ec EnrichConfig) error {
				next, err := start(ec)
				if err != nil {
					return err
				}
				h.current.Swap(next).close()
				return nil
			}, func(result string) { reloads.WithLabelValues(result).Inc() })
		})
	}
	r, err := stage.New(deps.NATS, cfg.Stage, h.Handle, deps.Logger, deps.Registerer)
	if err != nil {
		return err
	}
	return r.Run(ctx, deps.Ready)
}

// watchConfig calls apply with the enrich section each time the file at path
// changes; a file that does not parse or validate is logged and the running config
// stays.
func watchConfig(ctx context.Context, path string, every time.Duration, log *slog.Logger, apply func(EnrichConfig) error, counted func(result string)) {
	failed := func(err error) {
		log.Error("the changed config did not load; the running enrich config stays", "config", path, "err", err)
		counted("failed")
	}
	configfile.Watch(ctx, path, every, func(f *configfile.File) {
		ec, err := LoadEnrichConfig(f)
		if err == nil {
			err = apply(ec)
		}
		if err != nil {
			failed(err)
			return
		}
		counted("ok")
		log.Info("enrich config reloaded", "config", path, "rules", len(ec.Rules))
	}, failed)
}
