package stage

import (
	"context"
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
