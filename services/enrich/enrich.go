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
	// Replicas is how many copies a NATS cluster keeps of a KV table's bucket the
	// stage creates because it is missing (0 or 1 on a single server).
	Replicas int
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
	// Readiness is the process's /readyz, where a stall is reported (nil: not).
	Readiness *telemetry.Readiness
}

// Handler enriches events with the current rules.
type Handler struct {
	live       *Live
	maxPayload int64
}

// Handle returns the ENRICHED message for an event, or a dead letter when the input
// is not a sluice event.
func (h *Handler) Handle(msg jetstream.Msg) ([]*nats.Msg, error) {
	if !h.live.HasRules() {
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
	if !h.live.Enrich(e) {
		return data, e.Key, nil
	}
	body, err := e.Marshal()
	if err != nil {
		return nil, "", fmt.Errorf("cannot encode the enriched event: %w", err)
	}
	return body, e.Key, nil
}

// Live is an Enricher kept current until Close: KV tables by a watch, files
// checked for changes, and the rules rebuilt when the config file changes.
type Live struct {
	current atomic.Pointer[runtime]
	stop    context.CancelFunc
	wg      sync.WaitGroup
}

// Start loads the tables and compiles the rules of cfg (cfg.Stage is not used),
// and keeps them current until Close.
func Start(ctx context.Context, cfg Config, js jetstream.JetStream, log *slog.Logger, reg prometheus.Registerer) (*Live, error) {
	misses := telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_enrich_lookup_misses_total", Help: "Lookups whose key a table lacks (the table's default applies), by table.",
	}, []string{"table"}))
	reloads := telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_enrich_config_reloads_total", Help: "Reloads of the enrich config, by result (ok, failed: the running config stays).",
	}, []string{"result"}))
	fileReloads := telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_enrich_file_reloads_total", Help: "Reloads of changed table files, by file and result (ok, failed: the previous table stays).",
	}, []string{"file", "result"}))
	miss := func(table string) { misses.WithLabelValues(table).Inc() }
	reloaded := func(file, result string) { fileReloads.WithLabelValues(file, result).Inc() }
	ua, err := NewUserAgents(20_000)
	if err != nil {
		return nil, fmt.Errorf("enrich: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	l := &Live{stop: cancel}
	start := func(ec EnrichConfig) (*runtime, error) {
		return startRuntime(ctx, ec, js, cfg.Replicas, ua, cfg.Secrets, log, miss, reloaded)
	}
	rt, err := start(cfg.Enrich)
	if err != nil {
		cancel()
		return nil, err
	}
	l.current.Store(rt)
	log.Info("enrich rules loaded", "rules", len(cfg.Enrich.Rules), "tables", len(cfg.Enrich.Tables), "geo", len(cfg.Enrich.Geo))
	if cfg.ConfigPath != "" {
		// Noted before Start returns: a change made after that is seen.
		w := configfile.NewWatcher(cfg.ConfigPath)
		l.wg.Go(func() {
			watchConfig(ctx, w, cfg.Enrich.ReloadInterval, log, func(ec EnrichConfig) error {
				next, err := start(ec)
				if err != nil {
					return err
				}
				l.current.Swap(next).close()
				return nil
			}, func(result string) { reloads.WithLabelValues(result).Inc() })
		})
	}
	return l, nil
}

// HasRules reports whether any enrich rule is configured.
func (l *Live) HasRules() bool { return len(l.current.Load().en.rules) > 0 }

// DataFields is what the current rules read of events' data.
func (l *Live) DataFields() events.DataFields { return l.current.Load().en.data }

// Enrich applies the current rules to e and reports whether there were any.
func (l *Live) Enrich(e *events.Event) bool {
	rt := l.current.Load()
	if len(rt.en.rules) == 0 {
		return false
	}
	rt.en.Enrich(e)
	return true
}

// Close stops the watches and reloads.
func (l *Live) Close() {
	l.stop()
	l.wg.Wait()
	l.current.Load().close()
}

// Run loads the tables, runs the stage until ctx is done, and reloads the rules
// when the config file changes.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	js, err := jetstream.New(deps.NATS)
	if err != nil {
		return err
	}
	live, err := Start(ctx, cfg, js, deps.Logger.With("stage", Name), deps.Registerer)
	if err != nil {
		return err
	}
	defer live.Close()
	cfg.Stage.Ready = deps.Readiness
	r, err := stage.New(deps.NATS, cfg.Stage, (&Handler{live: live, maxPayload: deps.NATS.MaxPayload()}).Handle, deps.Logger, deps.Registerer)
	if err != nil {
		return err
	}
	return r.Run(ctx, deps.Ready)
}

// watchConfig calls apply with the enrich section each time w's file changes; a
// file that does not parse or validate is logged and the running config stays.
func watchConfig(ctx context.Context, w *configfile.Watcher, every time.Duration, log *slog.Logger, apply func(EnrichConfig) error, counted func(result string)) {
	path := w.Path()
	failed := func(err error) {
		log.Error("the changed config did not load; the running enrich config stays", "config", path, "err", err)
		counted("failed")
	}
	w.Run(ctx, every, func(f *configfile.File) {
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
