package stage

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natstest"
)

// Pump hands the stream's messages on in order, waits while out is full, and
// closes out once the iterator stops.
func TestPump(t *testing.T) {
	_, js := natstest.Run(t).Connect(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "IN", Subjects: []string{"in"}}); err != nil {
		t.Fatal(err)
	}
	for i := range 50 {
		if _, err := js.Publish(ctx, "in", fmt.Appendf(nil, "%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	cons, err := js.OrderedConsumer(ctx, "IN", jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	it, err := cons.Messages()
	if err != nil {
		t.Fatal(err)
	}
	out := make(chan jetstream.Msg, 1) // smaller than the input: Pump waits
	go Pump(ctx, it, out, slog.New(slog.NewTextHandler(io.Discard, nil)))
	for i := range 50 {
		msg := <-out
		if got := string(msg.Data()); got != fmt.Sprint(i) {
			t.Fatalf("message %d is %q", i, got)
		}
	}
	it.Stop()
	for range out { // drained and closed once the iterator stopped
	}
}

// errIterator is an iterator that fails with its errors in turn, then is closed.
type errIterator struct {
	jetstream.MessagesContext
	errs []error
}

func (e *errIterator) Next(...jetstream.NextOpt) (jetstream.Msg, error) {
	if len(e.errs) == 0 {
		return nil, jetstream.ErrMsgIteratorClosed
	}
	err := e.errs[0]
	e.errs = e.errs[1:]
	return nil, err
}

// PumpUntilStale ends at the first missed heartbeat (the caller pulls anew); Pump
// reads on past it.
func TestPumpUntilStale(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, c := range []struct {
		pump func(context.Context, jetstream.MessagesContext, chan<- jetstream.Msg, *slog.Logger)
		left int
	}{{PumpUntilStale, 1}, {Pump, 0}} {
		it := &errIterator{errs: []error{errors.New("a passing error"), jetstream.ErrNoHeartbeat, errors.New("a passing error")}}
		out := make(chan jetstream.Msg)
		c.pump(context.Background(), it, out, log)
		if _, open := <-out; open || len(it.errs) != c.left {
			t.Fatalf("out open %v, %d errors left unread; want closed, %d left", open, len(it.errs), c.left)
		}
	}
}
