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
	h, err := dedup.NewHandler(p.maxPayload, p.cfg.Window, nil, nil, nil)
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
	wg.Go(func() { stage.Pump(ctx, it, msgs, k.log) })
	k.ready.Set("keyer", nil)
	batch := make([]jetstream.Msg, 0, keyBatch)
	futures := make([]jetstream.PubAckFuture, 0, keyBatch)
	for {
		batch = batch[:0]
		select {
		case <-ctx.Done():
			return nil
		case m, ok := <-msgs:
			if !ok {
				return fmt.Errorf("pipeline: keying step: the input ended")
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
		for _, m := range batch {
			out := k.copyOf(m)
			f, err := k.js.PublishMsgAsync(out)
			if err != nil {
				return fmt.Errorf("pipeline: keying step: publish to %s: %w", out.Subject, err)
			}
			futures = append(futures, f)
		}
		for i, f := range futures {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				// Unacked input comes again after the ack wait; what was stored of
				// this batch is dropped then by dedup (same key).
				return fmt.Errorf("pipeline: keying step: publish to %s: %w", f.Msg().Subject, err)
			case <-ctx.Done():
				return nil
			}
			_ = batch[i].Ack()
		}
	}
}

// copyOf is what the keying step publishes for m: its copy in its partition, or a
// dead letter.
func (k *keyer) copyOf(m jetstream.Msg) *nats.Msg {
	md, err := m.Metadata()
	if err != nil {
		return stage.DeadLetter(Name, m, fmt.Sprintf("message without JetStream metadata: %v", err), k.maxPayload)
	}
	d := k.decide.Decide(events.Message{Subject: m.Subject(), Header: m.Headers(), Data: m.Data(), Received: md.Timestamp})
	if d.Invalid != nil {
		return stage.DeadLetter(Name, m, d.Invalid.Error(), k.maxPayload)
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
	return events.Message{Subject: subject, Header: h, Data: msg.Data(), Received: received}, key, nil
}
