// Package dedup is the dedup stage: it validates each raw event, derives its key and
// publishes the first occurrence inside the key's window to the UNIQUE stream, with
// Nats-Msg-Id set to the key and Sluice-Expires to the end of its window. Invalid
// input goes to the DLQ with the reason.
//
// Two mechanisms drop repeats, and docs/dedup.md says why both:
//   - the window store (package window): every key published to UNIQUE inside its
//     window (24 h by default, per subject pattern, by receive or event time), at
//     22-32 bytes a key, rebuilt after a crash from a snapshot and a replay of UNIQUE,
//     and kept in step across replicas by tailing UNIQUE;
//   - UNIQUE's own Nats-Msg-Id duplicate window (10 min), which catches what the store
//     has not seen yet: a retry after a failed ack, or two replicas taking the same key
//     within the time one's publish takes to reach the other's tail.
package dedup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/dedup/window"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// Name is the stage's name in logs, metrics and dead letters.
const Name = "dedup"

// OutputPrefix is the subject prefix of the UNIQUE stream.
const OutputPrefix = "unique."

// Config configures the stage.
type Config struct {
	Stage  stage.Config
	Window WindowConfig
	// Ingest says how payloads become events.
	Ingest events.Ingest
	// DataDir holds the state snapshot (dedup/snapshot); empty keeps none, and a
	// restart replays UNIQUE from its start.
	DataDir string
}

// DefaultConfig reads the dedup consumer of EVENTS with the default window.
func DefaultConfig() Config {
	return Config{Stage: stage.Config{Name: Name, Stream: streams.Events, Consumer: "dedup"}, Window: DefaultWindowConfig()}
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// Ready is called once the stage consumes.
	Ready func()
	// Readiness is the process's /readyz, where a stall is reported (nil: not).
	Readiness *telemetry.Readiness
}

// Handler validates and keys events, and drops the keys its store holds.
type Handler struct {
	decoder     *events.Decoder
	maxPayload  int64
	window      WindowConfig
	store       *window.Store
	clock       func(uint32)
	dropped     prometheus.Counter
	nonStandard prometheus.Counter
	log         *slog.Logger
}

// HandlerConfig is what a Handler decides with.
type HandlerConfig struct {
	// MaxPayload bounds dead letters (the server's max_payload).
	MaxPayload int64
	Window     WindowConfig
	// Ingest says how payloads become events (valid: Ingest.Validate).
	Ingest events.Ingest
	// Types validate the data of events by type (nil: Ingest.TypeSchemas).
	Types *events.TypeSchemas
	// Store, if not nil, holds the keys seen; nil decides without one.
	Store *window.Store
	// Clock, if not nil, is told the stream time of each event.
	Clock func(uint32)
	// Dropped counts repeats the store held; NonStandard the members kept that are
	// not valid CloudEvents extension attributes. Either may be nil.
	Dropped, NonStandard prometheus.Counter
}

// NewHandler returns a handler.
func NewHandler(c HandlerConfig) (*Handler, error) {
	types := c.Types
	if types == nil {
		var err error
		if types, err = c.Ingest.TypeSchemas(); err != nil {
			return nil, fmt.Errorf("dedup: %w", err)
		}
	}
	unused := func(p prometheus.Counter) prometheus.Counter {
		if p == nil {
			return prometheus.NewCounter(prometheus.CounterOpts{Name: "unused"})
		}
		return p
	}
	return &Handler{decoder: events.NewDecoder(types, &c.Ingest), maxPayload: c.MaxPayload, window: c.Window, store: c.Store, clock: c.Clock,
		dropped: unused(c.Dropped), nonStandard: unused(c.NonStandard), log: slog.New(slog.DiscardHandler)}, nil
}

// NewNonStandardCounter registers the counter of members kept that are not valid
// CloudEvents extension attributes (ingest.invalid_members other than reject).
func NewNonStandardCounter(reg prometheus.Registerer) prometheus.Counter {
	return telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sluice_ingest_nonstandard_members_total",
		Help: "Top-level members of CloudEvents payloads that are not valid extension attributes (objects, arrays, bad names), kept as ingest.invalid_members says (extensions or data) rather than rejected.",
	}))
}

// Result is what the stage decides for one input.
type Result struct {
	// Out is the UNIQUE message to publish; nil for a repeat or invalid input.
	Out *nats.Msg
	// Duplicate is set when the window store holds the key.
	Duplicate bool
	// Invalid says why the input cannot be accepted.
	Invalid error
	Key     window.Key
	// Expires is when the key leaves its window (Unix seconds).
	Expires uint32
}

// Decision is what the stage decides for one input, before any output is encoded.
type Decision struct {
	// Event is the decoded, keyed event (nil for invalid input).
	Event *events.Event
	// Duplicate is set when the window store holds the key.
	Duplicate bool
	// Invalid says why the input cannot be accepted.
	Invalid error
	Key     window.Key
	// Expires is when the key leaves its window (Unix seconds).
	Expires uint32
	// Now is the input's stream time (Unix seconds), the store's clock.
	Now uint32
	// Element places the event in its batch message; nil for a message that is one
	// event, or that could not be split (Invalid then says why). Data is then the
	// element's payload.
	Element *events.Element
	Data    []byte
}

// DecideAll decides each event of m: m itself when it is one event, else each
// element of its batch in order, or one Invalid decision when the batch cannot be
// split.
func (h *Handler) DecideAll(m events.Message, yield func(Decision)) {
	parts, err := h.decoder.Split(m)
	switch {
	case err != nil:
		yield(Decision{Invalid: err})
	case parts == nil:
		yield(h.Decide(m))
	default:
		for _, p := range parts {
			yield(h.Decide(p))
		}
	}
}

// Decide validates and keys one input and says whether the store holds its key:
// the stage's pure core.
//
// A key is held until its window ends: the time JetStream stored the first
// occurrence (receive time) or its CloudEvents time (event time), plus the window of
// its subject, and never before MinHold after it was received (UNIQUE's duplicate
// window drops republications that long, so the store must agree with it).
func (h *Handler) Decide(m events.Message) Decision {
	d := h.decide(m)
	if m.Element != nil {
		d.Element, d.Data = m.Element, m.Data
	}
	return d
}

func (h *Handler) decide(m events.Message) Decision {
	e, err := h.decoder.Decode(m)
	if err != nil {
		return Decision{Invalid: err}
	}
	if e.NonStandard > 0 {
		h.nonStandard.Add(float64(e.NonStandard))
	}
	if fields := h.window.KeyFieldsFor(m.Subject); fields != nil {
		if e.Key, err = FieldsKey(e, fields); err != nil {
			if m.Element != nil {
				err = fmt.Errorf("batch element %d: %w", m.Element.Index, err)
			}
			return Decision{Invalid: err}
		}
	} else {
		e.Key = Key(e, m)
	}
	k, _ := ParseKey(e.Key)
	now := unixSeconds(e.ReceivedAt)
	if h.clock != nil {
		h.clock(now)
	}
	if h.store != nil && h.store.Seen(k, now) {
		return Decision{Event: e, Duplicate: true, Key: k, Now: now}
	}
	base := e.ReceivedAt
	if h.window.Time == EventTime {
		base = e.Time
	}
	expires := max(expirySeconds(base.Add(h.window.WindowFor(m.Subject))), expirySeconds(e.ReceivedAt.Add(h.window.MinHold)))
	return Decision{Event: e, Key: k, Expires: expires, Now: now}
}

// Keys are the keys a dedup step decides with: in memory (window.Store) or on
// disk (window.Disk).
type Keys interface {
	// Admit reports whether k is held inside its window at now (a repeat); when
	// not, it holds k until exp as first seen at input sequence seq.
	Admit(k window.Key, exp uint32, seq uint64, now uint32) (repeat bool, err error)
}

// Admit is the ordered half of a decision made without a store (a Handler whose
// HandlerConfig has no Store, deciding in parallel): whether keys hold d's key in
// its window already (a repeat), and, when not, holding it from now on as the
// first occurrence at input sequence seq. Decisions must be admitted in input
// order; d must be valid.
func Admit(keys Keys, d *Decision, seq uint64) (repeat bool, err error) {
	return keys.Admit(d.Key, d.Expires, seq, d.Now)
}

// Process decides what happens to a message that is one event and encodes the
// UNIQUE message of a first occurrence.
func (h *Handler) Process(m events.Message) Result {
	d := h.Decide(m)
	out, err := h.Output(m.Subject, d)
	switch {
	case d.Invalid != nil:
		return Result{Invalid: d.Invalid}
	case err != nil:
		return Result{Invalid: err}
	case d.Duplicate:
		return Result{Duplicate: true, Key: d.Key}
	}
	return Result{Out: out, Key: d.Key, Expires: d.Expires}
}

// Output is what the stage publishes for one decision: the UNIQUE message of a
// first occurrence, or nil for a repeat or invalid input.
func (h *Handler) Output(subject string, d Decision) (*nats.Msg, error) {
	if d.Invalid != nil || d.Duplicate {
		return nil, nil
	}
	body, err := d.Event.Marshal()
	if err != nil {
		return nil, fmt.Errorf("cannot encode event: %w", err)
	}
	out := nats.NewMsg(OutputPrefix + strings.TrimPrefix(subject, events.SubjectPrefix+"."))
	out.Header.Set(nats.MsgIdHdr, d.Event.Key)
	out.Header.Set(HeaderExpires, strconv.FormatUint(uint64(d.Expires), 10))
	out.Data = body
	return out, nil
}

// Handle returns, for each event of the input, its UNIQUE message when it is seen
// for the first time in its window, nothing for a repeat, or a dead letter.
func (h *Handler) Handle(msg jetstream.Msg) ([]*nats.Msg, error) {
	var outs []*nats.Msg
	h.DecideAll(events.Message{
		Subject:  msg.Subject(),
		Header:   msg.Headers(),
		Data:     msg.Data(),
		Received: stage.ReceivedOf(msg),
	}, func(d Decision) {
		out, err := h.Output(msg.Subject(), d)
		if err != nil {
			d.Invalid = err
		}
		switch {
		case d.Invalid != nil:
			outs = append(outs, DeadLetter(Name, msg, d, h.maxPayload))
		case d.Duplicate:
			h.dropped.Inc()
			if h.log.Enabled(context.Background(), slog.LevelDebug) {
				h.log.Debug("dropped a repeat", "subject", msg.Subject(), "seq", stage.SeqOf(msg))
			}
		default:
			outs = append(outs, out)
		}
	})
	return outs, nil
}

// DeadLetter is the dead letter of an invalid decision on msg: of the message, or
// of the batch element the decision is about.
func DeadLetter(stageName string, msg jetstream.Msg, d Decision, maxPayload int64) *nats.Msg {
	if el := d.Element; el != nil {
		return stage.ElementDeadLetter(stageName, msg, el.Index, d.Data, d.Invalid.Error(), maxPayload)
	}
	return stage.DeadLetter(stageName, msg, d.Invalid.Error(), maxPayload)
}

// Run rebuilds the window state, then runs the stage until ctx is done.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	if err := cfg.Window.Validate(); err != nil {
		return err
	}
	if cfg.Window.Store == StoreDisk {
		return errors.New("dedup: dedup.store: disk is the pipeline's (the default stage); the split dedup stage keeps its keys in memory (docs/dedup.md#keys-on-disk)")
	}
	js, err := jetstream.New(deps.NATS)
	if err != nil {
		return err
	}
	// Asked again while JetStream does not answer in time (a server just restarted).
	unique, err := streams.OpenStream(ctx, js, streams.Unique)
	if err != nil {
		return fmt.Errorf("dedup: stream %s: %w", streams.Unique, err)
	}
	cfg.Window.MinHold = unique.CachedInfo().Config.Duplicates
	if err := cfg.Window.Validate(); err != nil {
		return err
	}
	if maxAge := unique.CachedInfo().Config.MaxAge; maxAge > 0 && cfg.Window.Longest() > maxAge {
		return fmt.Errorf("dedup: the longest window (%s) exceeds the max_age of stream %s (%s), from which the state is rebuilt; shorten the window or raise max_age in streams/UNIQUE.stream.json",
			cfg.Window.Longest(), streams.Unique, maxAge)
	}
	log := deps.Logger.With("stage", Name)
	store := window.NewStore(cfg.Window.MaxKeys)
	st := &state{store: store, js: js, interval: cfg.Window.SnapshotInterval, log: log}
	if cfg.DataDir != "" {
		st.path = filepath.Join(cfg.DataDir, "dedup", "snapshot")
	}
	st.advance(unixSeconds(time.Now()))
	info := unique.CachedInfo()
	store.SetOrigin(uint64(info.Created.UnixNano()))
	st.load(st.clock.Load(), info.State.LastSeq)
	registerStateMetrics(deps.Registerer, st)
	dropped := telemetry.Register(deps.Registerer, prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_dedup_duplicates_total",
		Help: "Repeats dropped, by reason: window (the key is held in the stage's window store) or stream (UNIQUE's Nats-Msg-Id window refused the publish).",
	}, []string{"reason"}))

	// The tail and the snapshots outlive ctx until the stage has stopped, so the last
	// snapshot holds everything the stage published. Deferred in this order, stopBG
	// runs before wg.Wait.
	var wg sync.WaitGroup
	defer wg.Wait()
	bg, stopBG := context.WithCancel(context.WithoutCancel(ctx))
	defer stopBG()
	caughtUp := make(chan struct{})
	tailErr := make(chan error, 1)
	wg.Go(func() { tailErr <- st.tail(bg, caughtUp) })
	select {
	case <-caughtUp:
	case err := <-tailErr:
		return err
	case <-ctx.Done():
		return nil
	}
	wg.Go(func() { st.maintain(bg) })

	h, err := NewHandler(HandlerConfig{MaxPayload: deps.NATS.MaxPayload(), Window: cfg.Window, Ingest: cfg.Ingest, Store: store, Clock: st.advance,
		Dropped: dropped.WithLabelValues("window"), NonStandard: NewNonStandardCounter(deps.Registerer)})
	if err != nil {
		return err
	}
	h.log = log
	stageCfg := cfg.Stage
	stageCfg.OnDuplicate = dropped.WithLabelValues("stream").Inc
	stageCfg.Ready = deps.Readiness
	r, err := stage.New(deps.NATS, stageCfg, h.Handle, deps.Logger, deps.Registerer)
	if err != nil {
		return err
	}
	return r.Run(ctx, deps.Ready)
}

func registerStateMetrics(reg prometheus.Registerer, st *state) {
	if reg == nil {
		return
	}
	stat := func(f func(window.Stats) float64) func() float64 {
		return func() float64 { return f(st.store.Stats()) }
	}
	for _, c := range []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sluice_dedup_keys", Help: "Keys held in the dedup window."},
			stat(func(s window.Stats) float64 { return float64(s.Keys) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sluice_dedup_state_bytes", Help: "Memory of the dedup window's table."},
			stat(func(s window.Stats) float64 { return float64(s.Bytes) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "sluice_dedup_evicted_early_total", Help: "Keys dropped before the end of their window because dedup.max_keys was reached; a repeat of one of them is not recognised."},
			stat(func(s window.Stats) float64 { return float64(s.EvictedEarly) })),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sluice_dedup_snapshot_age_seconds", Help: "Seconds since the dedup state was last written to (or read from) its snapshot; 0 before the first."},
			func() float64 {
				at := st.snapshotAt.Load()
				if at == 0 {
					return 0
				}
				return time.Since(time.Unix(0, at)).Seconds()
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "sluice_dedup_applied_seq", Help: "Sequence of the last UNIQUE message applied to the dedup state."},
			stat(func(s window.Stats) float64 { return float64(s.LastSeq) })),
	} {
		telemetry.Register(reg, c)
	}
}
