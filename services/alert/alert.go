// Package alert is the alert stage: it evaluates the rules of SLUICE_CONFIG on the
// ENRICHED stream and publishes what fires to ALERTS (alerts.<rule>.<severity>) with
// a Nats-Msg-Id derived from the rule and the event, so a retry is not a second alert.
//
// This build evaluates match rules (one matching event fires one alert). Rule
// filters are expr expressions compiled once at start.
package alert

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/streams"
)

// Name is the stage's name in logs, metrics and dead letters.
const Name = "alert"

// Config configures the stage.
type Config struct {
	Stage stage.Config
	Rules []*Rule
}

// DefaultConfig reads the alert consumer of ENRICHED, with no rules.
func DefaultConfig() Config {
	return Config{Stage: stage.Config{Name: Name, Stream: streams.Enriched, Consumer: "alert"}}
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Ready      func()
}

// Handler evaluates rules on events.
type Handler struct {
	rules      []*Rule
	maxPayload int64
	log        *slog.Logger
}

// Env returns what filters see of e.
func Env(e *events.Event) *EventEnv {
	var data any
	if len(e.Data) > 0 {
		_ = json.Unmarshal(e.Data, &data)
	}
	return events.NewExprEnv(e, data)
}

// Evaluate returns the alerts e fires.
func (h *Handler) Evaluate(e *events.Event) ([]*alerts.Alert, error) {
	if len(h.rules) == 0 {
		return nil, nil
	}
	env := Env(e)
	var out []*alerts.Alert
	for _, r := range h.rules {
		ok, err := r.Matches(env)
		if err != nil {
			// A filter that fails on one event (a missing field, a wrong type) does
			// not match it; the event is not bad input.
			h.log.Debug("filter did not evaluate", "rule", r.Name, "key", e.Key, "err", err)
			continue
		}
		if !ok {
			continue
		}
		labels := maps.Clone(r.Labels)
		if labels == nil {
			labels = map[string]string{}
		}
		labels["alertname"] = r.Name
		labels["severity"] = r.Severity
		fpLabels := maps.Clone(labels)
		fpLabels["event_key"] = e.Key
		out = append(out, &alerts.Alert{
			Fingerprint: alerts.Fingerprint(r.Name, fpLabels),
			Rule:        r.Name,
			Status:      alerts.Firing,
			Severity:    r.Severity,
			Labels:      labels,
			Annotations: r.Annotate(env),
			StartsAt:    e.Time,
			EventKey:    e.Key,
		})
	}
	return out, nil
}

// Handle returns one ALERTS message per alert the event fires.
func (h *Handler) Handle(msg jetstream.Msg) ([]*nats.Msg, error) {
	if len(h.rules) == 0 {
		return nil, nil
	}
	e, err := events.Unmarshal(msg.Data())
	if err != nil {
		return []*nats.Msg{stage.DeadLetter(Name, msg, err.Error(), h.maxPayload)}, nil
	}
	fired, err := h.Evaluate(e)
	if err != nil {
		return nil, err
	}
	outs := make([]*nats.Msg, 0, len(fired))
	for _, a := range fired {
		body, err := json.Marshal(a)
		if err != nil {
			return nil, fmt.Errorf("encode alert: %w", err)
		}
		m := nats.NewMsg(a.Subject())
		m.Header.Set(nats.MsgIdHdr, "alert:"+a.Fingerprint+":"+a.Status)
		m.Data = body
		outs = append(outs, m)
	}
	return outs, nil
}

// Run runs the stage until ctx is done.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	h := &Handler{rules: cfg.Rules, maxPayload: deps.NATS.MaxPayload(), log: deps.Logger.With("stage", Name)}
	deps.Logger.Info("alert rules loaded", "rules", len(cfg.Rules))
	r, err := stage.New(deps.NATS, cfg.Stage, h.Handle, deps.Logger, deps.Registerer)
	if err != nil {
		return err
	}
	return r.Run(ctx, deps.Ready)
}
