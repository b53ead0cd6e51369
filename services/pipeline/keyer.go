package pipeline

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/schemas/keyed"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/streams"
)

// Headers of an event the keying step copied into PARTITIONS alone, not in an
// envelope: one too large for an envelope (and every event, before envelopes).
const (
	// HeaderKey is the event's dedup key.
	HeaderKey = "Sluice-Key"
	// HeaderReceived is when EVENTS stored the event (RFC 3339, nanoseconds): the
	// receive time that dedup windows and received_at use.
	HeaderReceived = "Sluice-Received"
	// HeaderEventsSeq is the event's sequence in EVENTS.
	HeaderEventsSeq = "Sluice-Events-Seq"
)

// keyer is the keying step: with more than one partition, every worker runs one on
// the shared durable consumer "partitioner" of EVENTS. It validates and keys each
// event, as the pipeline does, and copies it as it was published (subject, headers,
// payload) with its key into an envelope of its partition p (schemas/keyed): the
// events of one partition among the up to keyBatch messages it reads at once go in
// one message, partitioned.<p>.envelope in PARTITIONS, so PARTITIONS stores and
// delivers one message for many events. Invalid input goes to the DLQ from here,
// with the reason. It acks its input once the batch's envelopes (and dead letters)
// are stored. It keeps no state: a redelivery after a crash may copy an event twice,
// and the copy's key, the same, makes the partition's dedup drop the second.
type keyer struct {
	*pipeline
	decide *dedup.Handler
}

// keyBatch is how many input messages the keyer handles between waits for acks.
const keyBatch = 1000

func (p *pipeline) newKeyer() (*keyer, error) {
	if p.cfg.Partitions <= 1 {
		return nil, nil
	}
	h, err := dedup.NewHandler(dedup.HandlerConfig{MaxPayload: p.maxPayload, Window: p.cfg.Window, Ingest: p.cfg.Ingest, NonStandard: p.m.nonStandard})
	if err != nil {
		return nil, err
	}
	return &keyer{pipeline: p, decide: h}, nil
}

// run keys input until ctx ends, starting again after a failure.
func (k *keyer) run(ctx context.Context) {
	for attempt := uint64(1); ctx.Err() == nil; attempt++ {
		err := k.consume(ctx)
		if ctx.Err() != nil {
			return
		}
		delay := stage.Backoff(attempt)
		k.ready.Set("keyer", err)
		k.log.Error("the keying step stopped; starting again", "retry_in", delay, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
	}
}

func (k *keyer) consume(ctx context.Context) error {
	cons, err := k.js.Consumer(ctx, streams.Events, "partitioner")
	if err != nil {
		return fmt.Errorf("pipeline: keying step: consumer partitioner of %s: %w", streams.Events, err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(2 * keyBatch))
	if err != nil {
		return fmt.Errorf("pipeline: keying step: %w", err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Go(func() {
		<-ctx.Done()
		it.Stop()
	})
	msgs := make(chan jetstream.Msg, keyBatch)
	wg.Go(func() { stage.PumpUntilStale(ctx, it, msgs, k.log) })
	k.ready.Set("keyer", nil)
	batch := make([]jetstream.Msg, 0, keyBatch)
	var env envelopes
	futures := make([]jetstream.PubAckFuture, 0, keyBatch)
	for {
		batch = batch[:0]
		select {
		case <-ctx.Done():
			return nil
		case m, ok := <-msgs:
			if !ok {
				return fmt.Errorf("pipeline: keying step: the input ended (or its heartbeats stopped); pulling anew")
			}
			batch = append(batch, m)
		}
	more:
		for len(batch) < keyBatch {
			select {
			case m, ok := <-msgs:
				if !ok {
					break more
				}
				batch = append(batch, m)
			default:
				break more
			}
		}
		futures = futures[:0]
		publish := func(out *nats.Msg) error {
			f, err := k.js.PublishMsgAsync(out)
			if err != nil {
				return fmt.Errorf("pipeline: keying step: publish to %s: %w", out.Subject, err)
			}
			futures = append(futures, f)
			return nil
		}
		env.reset(k.cfg.Partitions, k.maxPayload)
		for _, m := range batch {
			if err := k.key(m, &env, publish); err != nil {
				return err
			}
		}
		if err := env.flushAll(publish); err != nil {
			return err
		}
		for _, f := range futures {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				// Unacked input comes again after the ack wait; what was stored of
				// this batch is dropped then by dedup (same key).
				return fmt.Errorf("pipeline: keying step: publish to %s: %w", f.Msg().Subject, err)
			case <-ctx.Done():
				return nil
			}
		}
		for _, m := range batch {
			_ = m.Ack()
		}
	}
}

// key keys the events of m (one, or each element of a batch): each goes into its
// partition's envelope in env, or, invalid, to the DLQ through publish. An event too
// large for an envelope is copied alone (copyOf).
func (k *keyer) key(m jetstream.Msg, env *envelopes, publish func(*nats.Msg) error) error {
	md, err := m.Metadata()
	if err != nil {
		return publish(stage.DeadLetter(Name, m, fmt.Sprintf("message without JetStream metadata: %v", err), k.maxPayload))
	}
	var perr error
	k.decide.DecideAll(events.Message{Subject: m.Subject(), Header: m.Headers(), Data: m.Data(), Received: md.Timestamp}, func(d dedup.Decision) {
		if perr != nil {
			return
		}
		if d.Invalid != nil {
			perr = publish(dedup.DeadLetter(Name, m, d, k.maxPayload))
			return
		}
		x := keyed.Entry{Subject: m.Subject(), Header: m.Headers(), Data: m.Data(), Seq: md.Sequence.Stream, Received: md.Timestamp, Key: d.Event.Key, Element: -1}
		if d.Element != nil {
			x.Element, x.Data = d.Element.Index, d.Data
		}
		p := partition.Of(d.Event.Key, k.cfg.Partitions)
		if !env.fits(&x) {
			c := copyOf(p, &x)
			if size := msgSize(c); size > k.maxPayload {
				d.Invalid = fmt.Errorf("too large to copy into its partition: %d bytes with its key and position, over the server's max_payload (%d)", size, k.maxPayload)
				perr = publish(dedup.DeadLetter(Name, m, d, k.maxPayload))
				return
			}
			// After the events read before it, in the partition's envelope: the
			// partition gets its events in the order EVENTS has them.
			if perr = env.flush(p, publish); perr == nil {
				perr = publish(c)
			}
			return
		}
		perr = env.add(p, &x, publish)
	})
	return perr
}

// envelopes are the keying step's envelopes of one batch, one a partition
// (schemas/keyed), each published when full and at the batch's end.
type envelopes struct {
	enc   []keyed.Encoder
	limit int
}

// envelopeEventBytes is what an event is taken to weigh in an envelope, for the
// partitions' pull buffers.
const envelopeEventBytes = 512

// envelopesBuffered is how many messages of its input a partition reading
// envelopes holds between its pull buffer and its batches.
const envelopesBuffered = 64

// envelopeRoom is what an envelope leaves of the server's max_payload for its
// headers.
const envelopeRoom = 4 << 10

func (e *envelopes) reset(partitions int, maxPayload int64) {
	if len(e.enc) != partitions {
		e.enc = make([]keyed.Encoder, partitions)
	}
	for i := range e.enc {
		e.enc[i].Reset()
	}
	e.limit = int(maxPayload) - envelopeRoom
}

// fits reports whether x fits an envelope alone.
func (e *envelopes) fits(x *keyed.Entry) bool { return keyed.Size(x)+64 <= e.limit }

// add adds x to partition p's envelope, publishing that envelope first if x would
// not fit in it.
func (e *envelopes) add(p int, x *keyed.Entry, publish func(*nats.Msg) error) error {
	if e.enc[p].Count() > 0 && e.enc[p].Len()+keyed.Size(x) > e.limit {
		if err := e.flush(p, publish); err != nil {
			return err
		}
	}
	e.enc[p].Add(x)
	return nil
}

func (e *envelopes) flush(p int, publish func(*nats.Msg) error) error {
	enc := &e.enc[p]
	if enc.Count() == 0 {
		return nil
	}
	out := nats.NewMsg(partition.Subject(p, keyed.Token))
	out.Header.Set(keyed.HeaderEnvelope, keyed.Version)
	out.Header.Set(keyed.HeaderCount, strconv.Itoa(enc.Count()))
	out.Data = enc.Bytes()
	enc.Reset()
	return publish(out)
}

func (e *envelopes) flushAll(publish func(*nats.Msg) error) error {
	for p := range e.enc {
		if err := e.flush(p, publish); err != nil {
			return err
		}
	}
	return nil
}

// msgSize is what m weighs against the server's max_payload: its payload and its
// headers as sent.
func msgSize(m *nats.Msg) int64 {
	n := len(m.Data)
	if len(m.Header) > 0 {
		n += len("NATS/1.0\r\n\r\n")
		for k, vs := range m.Header {
			for _, v := range vs {
				n += len(k) + len(": \r\n") + len(v)
			}
		}
	}
	return int64(n)
}

// copyOf is the copy of one event alone in partition p (an event too large for an
// envelope): published as it was to EVENTS (subject, headers, payload) to
// partitioned.<p>.<subject>, its key, receive time and EVENTS sequence in headers.
// A copy of an element holds that element alone, and its index in HeaderElement.
func copyOf(p int, x *keyed.Entry) *nats.Msg {
	out := nats.NewMsg(partition.Subject(p, x.Subject))
	for h, v := range x.Header {
		// The producer's Nats-Msg-Id is in the key; JetStream need not keep it again.
		if h != nats.MsgIdHdr {
			out.Header[h] = v
		}
	}
	out.Header.Set(HeaderKey, x.Key)
	out.Header.Set(HeaderReceived, x.Received.UTC().Format(time.RFC3339Nano))
	out.Header.Set(HeaderEventsSeq, strconv.FormatUint(x.Seq, 10))
	out.Data = x.Data
	if x.Element >= 0 {
		out.Header.Set(stage.HeaderElement, strconv.Itoa(x.Element))
	}
	return out
}

// unkeyed is the event a keyed message carries, as it was published to EVENTS, and
// its key.
func unkeyed(msg jetstream.Msg) (events.Message, string, error) {
	_, subject, err := partition.Parse(msg.Subject())
	if err != nil {
		return events.Message{}, "", err
	}
	h := msg.Headers()
	received, err := time.Parse(time.RFC3339Nano, h.Get(HeaderReceived))
	if err != nil {
		return events.Message{}, "", fmt.Errorf("header %s: %w", HeaderReceived, err)
	}
	key := h.Get(HeaderKey)
	if key == "" {
		return events.Message{}, "", fmt.Errorf("header %s is missing", HeaderKey)
	}
	m := events.Message{Subject: subject, Header: h, Data: msg.Data(), Received: received}
	if v := h.Get(stage.HeaderElement); v != "" {
		i, err := strconv.Atoi(v)
		if err != nil || i < 0 {
			return events.Message{}, "", fmt.Errorf("header %s: %q is not an index", stage.HeaderElement, v)
		}
		m.Element = &events.Element{Index: i}
	}
	return m, key, nil
}
