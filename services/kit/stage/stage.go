// Package stage binds a message handler to a durable JetStream pull consumer: it
// publishes what the handler returns and acks the input only after every publish is
// acknowledged by JetStream, naks with a backoff on failure, and dead-letters bad
// input. It is the one place that maps a handler's result to Ack or Nak.
package stage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/deadletters"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/kit/watchdog"
	"github.com/sluicehq/sluice/streams"
)

// Handler processes one input and returns the messages to publish before the input
// is acked: none (drop), one or more outputs, or a dead letter (see DeadLetter).
// An error means a transient failure: the input is redelivered after a backoff.
// Bad input is never an error; it is a dead letter.
type Handler func(msg jetstream.Msg) ([]*nats.Msg, error)

// Config names the consumer a stage reads and bounds its work in flight.
type Config struct {
	// Name of the stage, in logs, metrics and dead letters.
	Name string
	// Stream and Consumer (durable) to read.
	Stream, Consumer string
	// MaxInFlight bounds the inputs whose outputs await a publish ack.
	MaxInFlight int
	// PullBatch is how many messages a pull asks for at once.
	PullBatch int
	// PublishTimeout is how long a publish may wait for its ack.
	PublishTimeout time.Duration
	// OnDuplicate, if set, is called for each output the stream refused as a
	// duplicate (its Nats-Msg-Id was inside the stream's duplicate window).
	OnDuplicate func()
	// StallAfter: a stage holding input that finishes (acks or naks) none of it
	// this long is reported stalled: in sluice_stage_stalled, the log and, when
	// Ready is set, its check "stage <name> progress". Default 2 minutes.
	StallAfter time.Duration
	// Ready is the process's /readyz (nil: the stall is not reported there).
	Ready *telemetry.Readiness
	// Slow is fault injection for tests (SLUICE_TEST_SLOW); zero in production.
	Slow Slow
}

func (c *Config) defaults() {
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 4096
	}
	if c.PullBatch <= 0 {
		c.PullBatch = 1000
	}
	if c.PublishTimeout <= 0 {
		c.PublishTimeout = DefaultPublishTimeout
	}
	if c.StallAfter <= 0 {
		c.StallAfter = DefaultStallAfter
	}
}

// Metrics counts what stages do, labelled by stage.
type Metrics struct {
	Messages *prometheus.CounterVec
	Lag      *prometheus.GaugeVec
	Stalled  *prometheus.GaugeVec
}

// NewMetrics returns the stage metrics registered with reg (nil: not exported).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	return &Metrics{
		Messages: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_stage_messages_total",
			Help: "Messages handled by a stage, by outcome: in, acked, nacked (redelivered later), published, duplicate (publish dropped by the stream's Nats-Msg-Id window), dead_letter.",
		}, []string{"stage", "outcome"})),
		Lag: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_stage_consumer_lag",
			Help: "Messages in the stage's input stream not yet delivered to its consumer, as of the last message.",
		}, []string{"stage"})),
		Stalled: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_stage_stalled",
			Help: "1 while a stage holds input and finished none of it for its stall_after (the watchdog).",
		}, []string{"stage"})),
	}
}

// Runner runs a Handler on a consumer.
type Runner struct {
	cfg     Config
	js      jetstream.JetStream
	handle  Handler
	log     *slog.Logger
	metrics *Metrics
	// dog counts input held and finished, for the stall watch.
	dog watchdog.Dog
}

// DefaultStallAfter is how long a stage may hold input and finish none of it
// before its watchdog reports it stalled.
const DefaultStallAfter = 2 * time.Minute

// DefaultPublishTimeout is how long an asynchronous publish waits for its ack before
// it fails (and is published again). Without a timeout, nats.go waits for ever: an
// ack lost on the way, as when a cluster node leading the stream dies, would stall
// the publisher for good.
const DefaultPublishTimeout = 10 * time.Second

// New returns a runner reading cfg.Consumer on cfg.Stream through nc.
func New(nc *nats.Conn, cfg Config, h Handler, log *slog.Logger, reg prometheus.Registerer) (*Runner, error) {
	cfg.defaults()
	if cfg.Name == "" || cfg.Stream == "" || cfg.Consumer == "" {
		return nil, errors.New("stage: Name, Stream and Consumer are required")
	}
	js, err := jetstream.New(nc,
		jetstream.WithPublishAsyncMaxPending(cfg.MaxInFlight),
		jetstream.WithPublishAsyncTimeout(cfg.PublishTimeout))
	if err != nil {
		return nil, fmt.Errorf("stage %s: %w", cfg.Name, err)
	}
	return &Runner{
		cfg:     cfg,
		js:      js,
		handle:  cfg.Slow.wrap(h),
		log:     log.With("stage", cfg.Name, "stream", cfg.Stream, "consumer", cfg.Consumer),
		metrics: NewMetrics(reg),
	}, nil
}

type inflight struct {
	msg     jetstream.Msg
	futures []jetstream.PubAckFuture
}

// Run consumes until ctx is done, then stops pulling, finishes what it holds (acks
// what was published, leaves the rest unacked for redelivery) and returns.
// ready is called once the consumer is bound. A pull that nats.go ends while ctx
// lives (its subscription closed under it) is started again after a pause: only
// ctx ends a stage.
func (r *Runner) Run(ctx context.Context, ready func()) error {
	// Asked again while JetStream does not answer in time (a server just restarted).
	cons, err := streams.OpenConsumer(ctx, r.js, r.cfg.Stream, r.cfg.Consumer)
	if err != nil {
		return fmt.Errorf("stage %s: consumer %s on %s: %w", r.cfg.Name, r.cfg.Consumer, r.cfg.Stream, err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(r.cfg.PullBatch))
	if err != nil {
		return fmt.Errorf("stage %s: pull: %w", r.cfg.Name, err)
	}
	if ready != nil {
		ready()
	}
	pending := make(chan inflight, r.cfg.MaxInFlight)
	var wg sync.WaitGroup
	wg.Go(func() { r.ackLoop(pending) })
	stopped := make(chan struct{})
	// A handler slower than the ack wait would see its message redelivered while it
	// works: keepAlive extends the message's ack timer (InProgress) meanwhile.
	var working atomic.Pointer[work]
	if ackWait := cons.CachedInfo().Config.AckWait; ackWait > 0 {
		wg.Go(func() { keepAlive(&working, ackWait/3, stopped) })
	}
	watchCtx, stopWatch := context.WithCancel(context.WithoutCancel(ctx))
	wg.Go(func() { r.watchStall(watchCtx) })
	for {
		r.consume(ctx, it, pending, &working)
		if ctx.Err() != nil {
			break
		}
		r.log.Warn("pull ended while the stage runs; pulling again", "retry_in", time.Second)
		it = nil
		for it == nil && ctx.Err() == nil {
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
				if it, err = cons.Messages(jetstream.PullMaxMessages(r.cfg.PullBatch)); err != nil {
					r.log.Warn("pull", "err", err)
				}
			}
		}
		if it == nil {
			break
		}
	}
	close(stopped)
	close(pending)
	stopWatch()
	wg.Wait()
	return nil
}

// watchStall reports the stage stalled while it holds input and finishes none,
// until ctx ends.
func (r *Runner) watchStall(ctx context.Context) {
	check := "stage " + r.cfg.Name + " progress"
	gauge := r.metrics.Stalled.WithLabelValues(r.cfg.Name)
	gauge.Set(0)
	defer func() {
		gauge.Set(0)
		if r.cfg.Ready != nil {
			r.cfg.Ready.Set(check, nil)
		}
	}()
	r.dog.Watch(ctx, r.cfg.StallAfter, "stage "+r.cfg.Name, "finished", func(err error) {
		if r.cfg.Ready != nil {
			r.cfg.Ready.Set(check, err)
		}
		if err != nil {
			gauge.Set(1)
			r.log.Error("stage stalled", "err", err)
			return
		}
		gauge.Set(0)
		r.log.Info("stage moves again")
	})
}

// consume handles what it yields until the iterator ends: drained when ctx ends,
// or closed by nats.go.
func (r *Runner) consume(ctx context.Context, it jetstream.MessagesContext, pending chan<- inflight, working *atomic.Pointer[work]) {
	var wg sync.WaitGroup
	defer wg.Wait()
	done := make(chan struct{})
	defer close(done)
	wg.Go(func() {
		select {
		case <-ctx.Done():
			it.Drain()
		case <-done:
			it.Stop()
		}
	})
	in := r.metrics.Messages.WithLabelValues(r.cfg.Name, "in")
	lag := r.metrics.Lag.WithLabelValues(r.cfg.Name)
	for {
		msg, err := it.Next()
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			return
		}
		if err != nil {
			r.log.Warn("pull", "err", err)
			continue
		}
		in.Inc()
		r.dog.Read(1)
		if md, err := msg.Metadata(); err == nil {
			lag.Set(float64(md.NumPending))
		}
		working.Store(&work{msg: msg, since: time.Now()})
		outs, err := r.handle(msg)
		working.Store(nil)
		if err != nil {
			r.dog.Done(1, time.Now())
			r.nak(msg, err)
			continue
		}
		p := inflight{msg: msg, futures: make([]jetstream.PubAckFuture, 0, len(outs))}
		for _, out := range outs {
			f, err := r.js.PublishMsgAsync(out)
			if err != nil {
				r.log.Warn("publish", "subject", out.Subject, "err", err)
				p.futures = append(p.futures, failed{err})
				continue
			}
			p.futures = append(p.futures, f)
		}
		pending <- p
	}
}

// work is the message a handler is working on, and since when.
type work struct {
	msg   jetstream.Msg
	since time.Time
}

// keepAlive sends InProgress for the message in work every period while its
// handler has been at it longer than period, until stopped is closed.
func keepAlive(working *atomic.Pointer[work], period time.Duration, stopped <-chan struct{}) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-stopped:
			return
		case <-t.C:
			if w := working.Load(); w != nil && time.Since(w.since) >= period {
				_ = w.msg.InProgress()
			}
		}
	}
}

func (r *Runner) ackLoop(pending <-chan inflight) {
	acked := r.metrics.Messages.WithLabelValues(r.cfg.Name, "acked")
	published := r.metrics.Messages.WithLabelValues(r.cfg.Name, "published")
	dup := r.metrics.Messages.WithLabelValues(r.cfg.Name, "duplicate")
	dead := r.metrics.Messages.WithLabelValues(r.cfg.Name, "dead_letter")
	for p := range pending {
		var failure error
		for _, f := range p.futures {
			select {
			case ack := <-f.Ok():
				switch {
				case strings.HasPrefix(f.Msg().Subject, DLQPrefix):
					dead.Inc()
				case ack.Duplicate:
					dup.Inc()
					if r.cfg.OnDuplicate != nil {
						r.cfg.OnDuplicate()
					}
				default:
					published.Inc()
				}
			case err := <-f.Err():
				failure = err
			}
		}
		r.dog.Done(1, time.Now())
		if failure != nil {
			r.nak(p.msg, fmt.Errorf("publish: %w", failure))
			continue
		}
		if err := p.msg.Ack(); err != nil {
			r.log.Warn("ack", "err", err)
			continue
		}
		acked.Inc()
	}
}

// RetryAfterError asks for a redelivery after a given delay (a server's
// Retry-After) instead of the backoff.
type RetryAfterError struct {
	After time.Duration
	Err   error
}

func (e *RetryAfterError) Error() string {
	return fmt.Sprintf("%v (retry after %s)", e.Err, e.After)
}

func (e *RetryAfterError) Unwrap() error { return e.Err }

func (r *Runner) nak(msg jetstream.Msg, err error) {
	r.metrics.Messages.WithLabelValues(r.cfg.Name, "nacked").Inc()
	delivered := uint64(1)
	if md, mdErr := msg.Metadata(); mdErr == nil {
		delivered = md.NumDelivered
	}
	delay := Jitter(Backoff(delivered))
	var ra *RetryAfterError
	if errors.As(err, &ra) && ra.After > 0 {
		delay = ra.After
	}
	r.log.Warn("will retry", "delivered", delivered, "retry_in", delay, "err", err)
	if nerr := msg.NakWithDelay(delay); nerr != nil {
		r.log.Warn("nak", "err", nerr)
	}
}

// Backoff is the redelivery delay after the given number of deliveries: 250 ms
// doubling to at most 30 s.
func Backoff(delivered uint64) time.Duration {
	d := 250 * time.Millisecond
	for i := uint64(1); i < delivered && d < 30*time.Second; i++ {
		d *= 2
	}
	return min(d, 30*time.Second)
}

// Jitter spreads d by ±20%, so retries of many messages do not arrive together.
func Jitter(d time.Duration) time.Duration {
	return d - d/5 + rand.N(2*d/5+1)
}

// failed is a PubAckFuture for a publish that failed before it was sent.
type failed struct{ err error }

func (f failed) Ok() <-chan *jetstream.PubAck { return nil }
func (f failed) Err() <-chan error {
	c := make(chan error, 1)
	c <- f.err
	return c
}
func (f failed) Msg() *nats.Msg { return &nats.Msg{} }

// Dead-letter headers and subject: the contract of schemas/deadletters.
const (
	DLQPrefix        = deadletters.SubjectPrefix
	HeaderReason     = deadletters.HeaderReason
	HeaderStage      = deadletters.HeaderStage
	HeaderSubject    = deadletters.HeaderSubject
	HeaderStream     = deadletters.HeaderStream
	HeaderStreamSeq  = deadletters.HeaderStreamSeq
	HeaderReceivedAt = deadletters.HeaderReceivedAt
	HeaderElement    = deadletters.HeaderElement
)

// DeadLetter returns the DLQ message for msg: the original payload and headers plus
// the reason, the stage and where the input came from, published to dlq.<stage>
// with a Nats-Msg-Id derived from the input's stream position, so a retry is not a
// second dead letter. maxPayload (the server's limit) truncates a payload that would
// not fit, and says so in the reason.
func DeadLetter(stage string, msg jetstream.Msg, reason string, maxPayload int64) *nats.Msg {
	return deadLetter(stage, msg, -1, msg.Data(), reason, maxPayload)
}

// ElementDeadLetter is the dead letter of one event of a batch message: its payload
// is the element's, HeaderElement its index in the batch, and its Nats-Msg-Id is
// the message's with the index, so each element's is its own.
func ElementDeadLetter(stage string, msg jetstream.Msg, index int, data []byte, reason string, maxPayload int64) *nats.Msg {
	return deadLetter(stage, msg, index, data, reason, maxPayload)
}

func deadLetter(stage string, msg jetstream.Msg, element int, data []byte, reason string, maxPayload int64) *nats.Msg {
	out := nats.NewMsg(deadletters.Subject(stage))
	for k, v := range msg.Headers() {
		if strings.HasPrefix(k, "Nats-") {
			continue
		}
		out.Header[k] = v
	}
	id := deadletters.UnplacedID(stage, msg.Subject(), element)
	if md, err := msg.Metadata(); err == nil {
		out.Header.Set(HeaderStream, md.Stream)
		out.Header.Set(HeaderStreamSeq, strconv.FormatUint(md.Sequence.Stream, 10))
		out.Header.Set(HeaderReceivedAt, md.Timestamp.UTC().Format(time.RFC3339Nano))
		id = deadletters.ID(md.Stream, md.Sequence.Stream, element)
	}
	if element >= 0 {
		out.Header.Set(HeaderElement, strconv.Itoa(element))
	} else if msgID := msg.Headers().Get(nats.MsgIdHdr); msgID != "" && out.Header.Get(deadletters.HeaderMsgID) == "" {
		// (A replay's input carries its first input's id already.)
		out.Header.Set(deadletters.HeaderMsgID, msgID)
	}
	out.Header.Set(HeaderStage, stage)
	out.Header.Set(HeaderSubject, msg.Subject())
	out.Header.Set(nats.MsgIdHdr, id)
	return withReason(out, data, reason, maxPayload)
}

// UnstoredDeadLetter is the dead letter of input that never reached a stream (a
// line `sluice import` could not publish): data published to dlq.<stage> with the
// subject it was meant for and id as its Nats-Msg-Id (a contract of
// schemas/deadletters), truncated as DeadLetter's.
func UnstoredDeadLetter(stage, subject, id string, data []byte, reason string, maxPayload int64) *nats.Msg {
	out := nats.NewMsg(deadletters.Subject(stage))
	out.Header.Set(HeaderStage, stage)
	out.Header.Set(HeaderSubject, subject)
	out.Header.Set(nats.MsgIdHdr, id)
	return withReason(out, data, reason, maxPayload)
}

// withReason sets out's reason and payload, truncating data (and saying so) when
// it would not fit maxPayload with out's headers.
func withReason(out *nats.Msg, data []byte, reason string, maxPayload int64) *nats.Msg {
	headerBytes := 0
	for k, vs := range out.Header {
		for _, v := range vs {
			headerBytes += len(k) + len(v) + 4
		}
	}
	// Leave room for the reason (capped below), the truncation's header and the
	// header framing.
	room := maxPayload - int64(headerBytes) - 1024 - 64 - 64
	if maxPayload > 0 && int64(len(data)) > room {
		reason += fmt.Sprintf(" (payload truncated from %d bytes to fit the server's max_payload)", len(data))
		out.Header.Set(deadletters.HeaderTruncated, strconv.Itoa(len(data)))
		data = data[:max(room, 0)]
	}
	out.Header.Set(HeaderReason, headerSafe(reason, 1024))
	out.Data = data
	return out
}

// headerSafe makes s one header line of at most n bytes.
func headerSafe(s string, n int) string {
	s = strings.Map(func(r rune) rune {
		if r == '\r' || r == '\n' {
			return ' '
		}
		return r
	}, s)
	if len(s) > n {
		s = s[:n]
	}
	return s
}

// SeqOf returns the input's stream sequence, or 0 when it has no metadata.
func SeqOf(msg jetstream.Msg) uint64 {
	md, err := msg.Metadata()
	if err != nil {
		return 0
	}
	return md.Sequence.Stream
}

// ReceivedOf returns when the input's stream stored it, or now.
func ReceivedOf(msg jetstream.Msg) time.Time {
	md, err := msg.Metadata()
	if err != nil {
		return time.Now()
	}
	return md.Timestamp
}
