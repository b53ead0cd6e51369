// Package jspub publishes to JetStream for stages that own their input position
// (an ordered consumer plus a snapshot) instead of acking it: publishes are
// asynchronous, and Settle waits until every one is stored, publishing again what
// failed. Each message carries a Nats-Msg-Id, so a publish repeated after a
// restart is dropped by the stream's duplicate window, and PublishedSince tells
// what older than that window was already published.
package jspub

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Publisher publishes asynchronously and remembers what is in flight.
type Publisher struct {
	js  jetstream.JetStream
	log *slog.Logger
	// maxPending is how many publishes may be in flight before Publish settles.
	maxPending int
	pending    []pending
}

type pending struct {
	msg    *nats.Msg
	future jetstream.PubAckFuture
}

// New returns a Publisher settling by itself once maxPending publishes are in
// flight.
func New(js jetstream.JetStream, maxPending int, log *slog.Logger) *Publisher {
	return &Publisher{js: js, log: log, maxPending: maxPending}
}

// Publish sends m asynchronously.
func (p *Publisher) Publish(ctx context.Context, m *nats.Msg) error {
	f, err := p.js.PublishMsgAsync(m)
	if err != nil {
		f = nil // published again by Settle
	}
	p.pending = append(p.pending, pending{msg: m, future: f})
	if len(p.pending) >= p.maxPending {
		return p.Settle(ctx)
	}
	return nil
}

// Pending is the number of publishes not yet settled.
func (p *Publisher) Pending() int { return len(p.pending) }

// Settle waits for every publish in flight, publishing again (same Nats-Msg-Id)
// what failed, until all are stored or ctx ends.
func (p *Publisher) Settle(ctx context.Context) error {
	for i, pp := range p.pending {
		if pp.future != nil {
			select {
			case <-pp.future.Ok():
				continue
			case err := <-pp.future.Err():
				p.log.Warn("publish failed; retrying", "subject", pp.msg.Subject, "err", err)
			case <-ctx.Done():
				p.pending = p.pending[i:]
				return ctx.Err()
			}
		}
		for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 5*time.Second) {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := p.js.PublishMsg(pctx, pp.msg)
			cancel()
			if err == nil {
				break
			}
			p.log.Warn("publish failed; retrying", "subject", pp.msg.Subject, "err", err)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				p.pending = p.pending[i:]
				p.pending[0].future = nil
				return ctx.Err()
			}
		}
	}
	p.pending = p.pending[:0]
	return nil
}

// PublishedSince returns the Nats-Msg-Ids of the messages stored in stream since
// the given time (read headers only).
func PublishedSince(ctx context.Context, js jetstream.JetStream, stream string, since time.Time) (map[string]bool, error) {
	ids := map[string]bool{}
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartTimePolicy, OptStartTime: &since, HeadersOnly: true,
	})
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", stream, err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", stream, err)
	}
	for n := info.NumPending; n > 0; {
		batch, err := cons.Fetch(int(min(n, 1000)), jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", stream, err)
		}
		got := 0
		for msg := range batch.Messages() {
			got++
			if id := msg.Headers().Get(nats.MsgIdHdr); id != "" {
				ids[id] = true
			}
			if md, err := msg.Metadata(); err == nil && md.NumPending == 0 {
				n = 0
			}
		}
		if err := batch.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			return nil, fmt.Errorf("read %s: %w", stream, err)
		}
		if got == 0 {
			break
		}
		n -= min(n, uint64(got))
	}
	return ids, nil
}
