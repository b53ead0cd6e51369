// Package enrich is the enrich stage: it reads UNIQUE and publishes each event to
// ENRICHED with Nats-Msg-Id = the event key, acking its input after the publish ack.
//
// In this slice the stage forwards events unchanged (no lookups are configured);
// lookup tables, geo, derived fields and masking plug into Handle.
package enrich

import (
	"context"
	"log/slog"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/stage"
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
	Stage stage.Config
}

// DefaultConfig reads the enrich consumer of UNIQUE.
func DefaultConfig() Config {
	return Config{Stage: stage.Config{Name: Name, Stream: streams.Unique, Consumer: "enrich"}}
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Ready      func()
}

// Handler enriches events.
type Handler struct {
	maxPayload int64
}

// Handle returns the ENRICHED message for an event, or a dead letter when the input
// is not a sluice event.
func (h *Handler) Handle(msg jetstream.Msg) ([]*nats.Msg, error) {
	e, err := events.Unmarshal(msg.Data())
	if err != nil {
		return []*nats.Msg{stage.DeadLetter(Name, msg, err.Error(), h.maxPayload)}, nil
	}
	if e.Key == "" {
		return []*nats.Msg{stage.DeadLetter(Name, msg, "event has no sluicekey (was it published to unique.> by something other than the dedup stage?)", h.maxPayload)}, nil
	}
	out := nats.NewMsg(OutputPrefix + strings.TrimPrefix(msg.Subject(), InputPrefix))
	out.Header.Set(nats.MsgIdHdr, e.Key)
	out.Data = msg.Data()
	return []*nats.Msg{out}, nil
}

// Run runs the stage until ctx is done.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	h := &Handler{maxPayload: deps.NATS.MaxPayload()}
	r, err := stage.New(deps.NATS, cfg.Stage, h.Handle, deps.Logger, deps.Registerer)
	if err != nil {
		return err
	}
	return r.Run(ctx, deps.Ready)
}
