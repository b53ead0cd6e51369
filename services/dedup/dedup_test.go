package dedup

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/streams"
)

// run starts the stage and returns a stop func that waits for it.
func run(t *testing.T, nc *nats.Conn) func() {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	go func() {
		done <- Run(ctx, DefaultConfig(), Deps{NATS: nc, Logger: log, Registerer: prometheus.NewRegistry()})
	}()
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
}

func waitIdle(t *testing.T, js jetstream.JetStream) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := js.Consumer(ctx, streams.Events, "dedup")
		if err != nil {
			t.Fatal(err)
		}
		info, err := c.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if info.NumPending == 0 && info.NumAckPending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("dedup consumer still has %d pending, %d unacked", info.NumPending, info.NumAckPending)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitStored waits until EVENTS holds n messages: core publishes are stored
// asynchronously.
func waitStored(t *testing.T, js jetstream.JetStream, n uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := js.Stream(context.Background(), streams.Events)
		if err != nil {
			t.Fatal(err)
		}
		if s.CachedInfo().State.Msgs >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("EVENTS holds %d messages, want %d", s.CachedInfo().State.Msgs, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func streamMsgs(t *testing.T, js jetstream.JetStream, name string) uint64 {
	t.Helper()
	s, err := js.Stream(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return s.CachedInfo().State.Msgs
}

// Repeats are dropped while the stage runs and after it restarts; invalid input goes
// to the DLQ with the reason.
func TestDedupAcrossRestart(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	if err := service.ApplyTopology(context.Background(), nc); err != nil {
		t.Fatal(err)
	}
	pub := func(i int) {
		t.Helper()
		if err := nc.Publish("events.web.click", fmt.Appendf(nil, `{"id":"c%d","source":"web"}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		pub(i)
	}
	pub(1)
	pub(3)
	if err := nc.Publish("events.web.click", []byte(`{"id":7,"source":"web"}`)); err != nil {
		t.Fatal(err)
	}
	waitStored(t, js, 8)
	stop := run(t, nc)
	waitIdle(t, js)
	stop()
	if got := streamMsgs(t, js, streams.Unique); got != 5 {
		t.Fatalf("UNIQUE holds %d, want 5", got)
	}
	// While the stage is down: repeats of everything, and two new events.
	for i := range 7 {
		pub(i)
	}
	waitStored(t, js, 15)
	stop = run(t, nc)
	waitIdle(t, js)
	stop()
	if got := streamMsgs(t, js, streams.Unique); got != 7 {
		t.Fatalf("UNIQUE holds %d after the restart, want 7", got)
	}
	if got := streamMsgs(t, js, streams.DLQ); got != 1 {
		t.Fatalf("DLQ holds %d, want 1", got)
	}
	dlq, err := js.Stream(context.Background(), streams.DLQ)
	if err != nil {
		t.Fatal(err)
	}
	m, err := dlq.GetMsg(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	reason := m.Header.Get(stage.HeaderReason)
	if !strings.Contains(reason, `attribute "id" must be a string, got a number`) || m.Header.Get(stage.HeaderStage) != Name || string(m.Data) != `{"id":7,"source":"web"}` {
		t.Fatalf("dead letter: reason %q, stage %q, payload %q", reason, m.Header.Get(stage.HeaderStage), m.Data)
	}
}
