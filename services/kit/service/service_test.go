package service

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/natsconn"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/telemetry"
)

// A service stopped while its NATS server is down cannot drain (acks and saves
// wait for NATS): the error says so, beside the readiness checks that fail, rather
// than only that the drain did not finish.
func TestDrainHeldByNATS(t *testing.T) {
	ns := natstest.Run(t)
	log := slog.New(slog.DiscardHandler)
	nc, err := natsconn.Connect(settings.NATS{URL: ns.URL}, "test", log)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ready := &telemetry.Readiness{}
	ready.Set("consumer", nil)
	ctx, cancel := context.WithCancel(context.Background())
	released := make(chan struct{})
	ended := make(chan struct{})
	errc := make(chan error, 1)
	go func() {
		errc <- RunWithTelemetry(ctx, settings.Service{ShutdownTimeout: 200 * time.Millisecond}, nil, ready, nc, log, func(ctx context.Context) error {
			defer close(ended)
			<-ctx.Done()
			<-released // a drain held by NATS
			return nil
		})
	}()
	defer func() { cancel(); close(released); <-ended }()
	ns.Shutdown()
	poll.Until(t, 10*time.Second, func() error {
		if nc.IsConnected() {
			return errors.New("still connected")
		}
		return nil
	})
	ready.Set("consumer", errors.New("nats: connection closed"))
	cancel()
	err = <-errc
	for _, want := range []string{"drain did not finish within 200ms", "NATS not connected: reconnecting", "not ready: consumer: nats: connection closed", "unacked work will be redelivered"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("the drain's error: %v; want %q in it", err, want)
		}
	}
}
