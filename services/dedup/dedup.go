// Package dedup is the dedup stage: it validates each raw event, derives its key and
// publishes the first occurrence to the UNIQUE stream with Nats-Msg-Id set to the key.
//
// The UNIQUE stream's duplicate window (24 h in streams/UNIQUE.stream.json) is the
// dedup window: JetStream drops a publish whose Nats-Msg-Id it has stored inside the
// window, keeps that index in the stream (rebuilt from the file store after a server
// restart), and the same index serves every replica of this stage. A crash between
// the publish and the ack makes JetStream redeliver the input; the republish is then
// recognised as a duplicate. Invalid input goes to the DLQ with the reason.
package dedup

import (
	"context"
	"fmt"
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
const Name = "dedup"

// OutputPrefix is the subject prefix of the UNIQUE stream.
const OutputPrefix = "unique."

// Config configures the stage.
type Config struct {
	Stage stage.Config
}

// DefaultConfig reads the dedup consumer of EVENTS.
func DefaultConfig() Config {
	return Config{Stage: stage.Config{Name: Name, Stream: streams.Events, Consumer: "dedup"}}
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// Ready is called once the stage consumes.
	Ready func()
}

// Handler validates and keys events. It is the stage's pure core plus the mapping
// to NATS messages.
type Handler struct {
	decoder    *events.Decoder
	maxPayload int64
}

// NewHandler returns a handler validating with the embedded per-type schemas.
func NewHandler(maxPayload int64) (*Handler, error) {
	types, err := events.LoadTypeSchemas()
	if err != nil {
		return nil, fmt.Errorf("dedup: %w", err)
	}
	return &Handler{decoder: events.NewDecoder(types), maxPayload: maxPayload}, nil
}

// Handle returns the UNIQUE message for a valid event, or a dead letter.
func (h *Handler) Handle(msg jetstream.Msg) ([]*nats.Msg, error) {
	m := events.Message{
		Subject:  msg.Subject(),
		Header:   msg.Headers(),
		Data:     msg.Data(),
		Received: stage.ReceivedOf(msg),
	}
	e, err := h.decoder.Decode(m)
	if err != nil {
		return []*nats.Msg{stage.DeadLetter(Name, msg, err.Error(), h.maxPayload)}, nil
	}
	e.Key = Key(e, m)
	body, err := e.Marshal()
	if err != nil {
		return []*nats.Msg{stage.DeadLetter(Name, msg, "cannot encode event: "+err.Error(), h.maxPayload)}, nil
	}
	out := nats.NewMsg(OutputPrefix + strings.TrimPrefix(msg.Subject(), events.SubjectPrefix+"."))
	out.Header.Set(nats.MsgIdHdr, e.Key)
	out.Data = body
	return []*nats.Msg{out}, nil
}

// Run runs the stage until ctx is done.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	h, err := NewHandler(deps.NATS.MaxPayload())
	if err != nil {
		return err
	}
	r, err := stage.New(deps.NATS, cfg.Stage, h.Handle, deps.Logger, deps.Registerer)
	if err != nil {
		return err
	}
	return r.Run(ctx, deps.Ready)
}
