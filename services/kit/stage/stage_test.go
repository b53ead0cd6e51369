package stage

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/kit/testnet"
)

// A handler slower than the ack wait on some messages: the runner keeps those
// messages from redelivery while the handler works, so each is handled once and
// every output is published once.
func TestSlowHandlerIsNotRedelivered(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "IN", Subjects: []string{"in.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "OUT", Subjects: []string{"out.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateOrUpdateConsumer(ctx, "IN", jetstream.ConsumerConfig{Durable: "c", AckPolicy: jetstream.AckExplicitPolicy, AckWait: time.Second}); err != nil {
		t.Fatal(err)
	}
	const total = 40
	for i := range total {
		if _, err := js.Publish(ctx, fmt.Sprintf("in.%d", i), nil); err != nil {
			t.Fatal(err)
		}
	}
	var calls atomic.Int32
	handle := func(msg jetstream.Msg) ([]*nats.Msg, error) {
		n := calls.Add(1)
		if n%10 == 0 {
			time.Sleep(2500 * time.Millisecond) // 2.5 ack waits
		}
		out := nats.NewMsg("out." + msg.Subject())
		out.Header.Set(nats.MsgIdHdr, msg.Subject())
		return []*nats.Msg{out}, nil
	}
	r, err := New(nc, Config{Name: "slow", Stream: "IN", Consumer: "c", PullBatch: 1}, handle, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(runCtx, nil) }()
	poll.Until(t, time.Minute, func() error { return natstest.Idle(ctx, js, "IN", "c") })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := calls.Load(); got != total {
		t.Fatalf("the handler ran %d times for %d messages: slow messages were redelivered", got, total)
	}
	s, err := js.Stream(ctx, "OUT")
	if err != nil {
		t.Fatal(err)
	}
	if got := s.CachedInfo().State.Msgs; got != total {
		t.Fatalf("OUT holds %d, want %d", got, total)
	}
}

// A pull that nats.go ends while the stage runs (here: its consumer deleted and
// made again, as an operator might) is started again: the stage goes on handling
// input rather than returning or waiting for ever.
func TestPullEndedIsStartedAgain(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "IN", Subjects: []string{"in.>"}}); err != nil {
		t.Fatal(err)
	}
	consumer := jetstream.ConsumerConfig{Durable: "c", AckPolicy: jetstream.AckExplicitPolicy, DeliverPolicy: jetstream.DeliverNewPolicy}
	if _, err := js.CreateOrUpdateConsumer(ctx, "IN", consumer); err != nil {
		t.Fatal(err)
	}
	handled := make(chan string, 10)
	handle := func(msg jetstream.Msg) ([]*nats.Msg, error) {
		handled <- msg.Subject()
		return nil, nil
	}
	r, err := New(nc, Config{Name: "reopen", Stream: "IN", Consumer: "c"}, handle, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(runCtx, nil) }()
	waitFor := func(subject string) {
		t.Helper()
		for {
			select {
			case got := <-handled:
				if got == subject {
					return
				}
			case err := <-done:
				t.Fatalf("Run returned (%v) while waiting for %s", err, subject)
			case <-time.After(time.Minute):
				t.Fatalf("%s not handled within a minute", subject)
			}
		}
	}
	if _, err := js.Publish(ctx, "in.first", nil); err != nil {
		t.Fatal(err)
	}
	waitFor("in.first")
	if err := js.DeleteConsumer(ctx, "IN", "c"); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateOrUpdateConsumer(ctx, "IN", consumer); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx, "in.second", nil); err != nil {
		t.Fatal(err)
	}
	waitFor("in.second")
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A handler that never returns stalls the stage: /readyz and sluice_stage_stalled
// say so after StallAfter, and both clear once it finishes.
func TestStallReported(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "IN", Subjects: []string{"in.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateOrUpdateConsumer(ctx, "IN", jetstream.ConsumerConfig{Durable: "c", AckPolicy: jetstream.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	handle := func(msg jetstream.Msg) ([]*nats.Msg, error) {
		<-release
		return nil, nil
	}
	ready := &telemetry.Readiness{}
	reg := prometheus.NewRegistry()
	r, err := New(nc, Config{Name: "wedged", Stream: "IN", Consumer: "c", StallAfter: 200 * time.Millisecond, Ready: ready},
		handle, slog.New(slog.NewTextHandler(io.Discard, nil)), reg)
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(runCtx, nil) }()
	stalled := func() float64 {
		return testutil.ToFloat64(r.metrics.Stalled.WithLabelValues("wedged"))
	}
	if _, err := js.Publish(ctx, "in.x", nil); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, time.Minute, func() error {
		err := ready.Check()
		if err == nil || !strings.Contains(err.Error(), "stage wedged holds 1 messages and finished none") || stalled() != 1 {
			return fmt.Errorf("ready %v, stalled %v", err, stalled())
		}
		return nil
	})
	close(release)
	poll.Until(t, time.Minute, func() error {
		if err := ready.Check(); err != nil || stalled() != 0 {
			return fmt.Errorf("after the handler returned: ready %v, stalled %v", err, stalled())
		}
		return nil
	})
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A stage started while JetStream does not answer (the connection to the server
// silent for longer than one request's timeout, as while a restarted server
// recovers its streams) asks for its consumer again, and runs once it answers:
// the CI run of the combined fault test had notify exit with "context deadline
// exceeded" after a NATS restart.
func TestStartWhileJetStreamSilent(t *testing.T) {
	ns := natstest.Run(t)
	_, js := ns.Connect(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "IN", Subjects: []string{"in.>"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateOrUpdateConsumer(ctx, "IN", jetstream.ConsumerConfig{Durable: "c", AckPolicy: jetstream.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	f := testnet.NewFreezer(t, strings.TrimPrefix(ns.URL, "nats://"))
	nc, err := nats.Connect("nats://"+f.Addr(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	handled := make(chan struct{}, 1)
	r, err := New(nc, Config{Name: "late", Stream: "IN", Consumer: "c"}, func(jetstream.Msg) ([]*nats.Msg, error) {
		handled <- struct{}{}
		return nil, nil
	}, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	f.FreezeOpen()
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	done := make(chan error, 1)
	wg.Go(func() { done <- r.Run(runCtx, nil) })
	// Longer than a request's timeout (5 s): the first ask goes unanswered.
	select {
	case err := <-done:
		t.Fatalf("Run returned while JetStream was silent: %v", err)
	case <-time.After(6 * time.Second):
	}
	f.CloseFrozen() // the client connects again, through the proxy
	if _, err := js.Publish(ctx, "in.x", nil); err != nil {
		t.Fatal(err)
	}
	select {
	case <-handled:
	case err := <-done:
		t.Fatalf("Run returned: %v", err)
	case <-time.After(time.Minute):
		t.Fatal("nothing handled within a minute of JetStream answering again")
	}
}
