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
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/streams"
)

// Headers of a message the keying step copied into PARTITIONS.
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
// payload) to partitioned.<p>.<subject> in PARTITIONS, p the partition of its key;
// invalid input goes to the DLQ from here, with the reason. It acks its input once
// the copy (or the dead letter) is stored. It keeps no state: a redelivery after a
// crash may copy an event twice, and the copy's key, the same, makes the partition's
// dedup drop the second.
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
	futures := make([]jetstream.PubAckFuture, 0, keyBatch)
	inputs := make([]int, 0, keyBatch) // the input of each future, by index in batch
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
		futures, inputs = futures[:0], inputs[:0]
		for i, m := range batch {
			for _, out := range k.copiesOf(m) {
				f, err := k.js.PublishMsgAsync(out)
				if err != nil {
					return fmt.Errorf("pipeline: keying step: publish to %s: %w", out.Subject, err)
				}
				futures, inputs = append(futures, f), append(inputs, i)
			}
		}
		for j, f := range futures {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				// Unacked input comes again after the ack wait; what was stored of
				// this batch is dropped then by dedup (same key).
				return fmt.Errorf("pipeline: keying step: publish to %s: %w", f.Msg().Subject, err)
			case <-ctx.Done():
				return nil
			}
			if j == len(futures)-1 || inputs[j+1] != inputs[j] { // the input's last copy
				_ = batch[inputs[j]].Ack()
			}
		}
	}
}

// copiesOf is what the keying step publishes for m: for each of its events (one,
// or each element of a batch) its copy in its partition, or a dead letter. A copy
// of an element holds that element alone, and its index in HeaderElement.
func (k *keyer) copiesOf(m jetstream.Msg) []*nats.Msg {
	md, err := m.Metadata()
	if err != nil {
		return []*nats.Msg{stage.DeadLetter(Name, m, fmt.Sprintf("message without JetStream metadata: %v", err), k.maxPayload)}
	}
	var outs []*nats.Msg
	k.decide.DecideAll(events.Message{Subject: m.Subject(), Header: m.Headers(), Data: m.Data(), Received: md.Timestamp}, func(d dedup.Decision) {
		if d.Invalid != nil {
			outs = append(outs, dedup.DeadLetter(Name, m, d, k.maxPayload))
			return
		}
		out := nats.NewMsg(partition.Subject(partition.Of(d.Event.Key, k.cfg.Partitions), m.Subject()))
		for h, v := range m.Headers() {
			// The producer's Nats-Msg-Id is in the key; JetStream need not keep it again.
			if h != nats.MsgIdHdr {
				out.Header[h] = v
			}
		}
		out.Header.Set(HeaderKey, d.Event.Key)
		out.Header.Set(HeaderReceived, md.Timestamp.UTC().Format(time.RFC3339Nano))
		out.Header.Set(HeaderEventsSeq, strconv.FormatUint(md.Sequence.Stream, 10))
		out.Data = m.Data()
		if d.Element != nil {
			out.Header.Set(stage.HeaderElement, strconv.Itoa(d.Element.Index))
			out.Data = d.Data
		}
		outs = append(outs, out)
	})
	return outs
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
