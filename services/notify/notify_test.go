package notify

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/streams"
)

// One receiver refuses an alert for good (404), another takes it: the second gets
// it once, and the alert is dead-lettered with the first one's answer.
func TestRefusingReceiverDoesNotStarveOthers(t *testing.T) {
	ns := natstest.Run(t)
	nc, js := ns.Connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc); err != nil {
		t.Fatal(err)
	}
	var okHits, goneHits atomic.Int32
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { okHits.Add(1) }))
	defer ok.Close()
	gone := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		goneHits.Add(1)
		http.Error(w, "no such hook", http.StatusNotFound)
	}))
	defer gone.Close()
	env := func(string) (string, bool) { return "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", true }
	var receivers []*Receiver
	for _, c := range []ReceiverConfig{
		{Name: "gone", URL: gone.URL, SecretEnv: []string{"S"}, AllowPrivate: true},
		{Name: "ok", URL: ok.URL, SecretEnv: []string{"S"}, AllowPrivate: true},
	} {
		r, err := NewReceiver(c, env)
		if err != nil {
			t.Fatal(err)
		}
		receivers = append(receivers, r)
	}
	if _, err := js.Publish(ctx, "alerts.r.critical", []byte(`{"fingerprint":"f","rule":"r","status":"firing"}`)); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Receivers = receivers
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		done <- Run(runCtx, cfg, Deps{NATS: nc, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Registerer: prometheus.NewRegistry()})
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := js.Stream(ctx, streams.DLQ)
		if err != nil {
			t.Fatal(err)
		}
		if s.CachedInfo().State.Msgs == 1 {
			m, err := s.GetMsg(ctx, 1)
			if err != nil {
				t.Fatal(err)
			}
			if reason := m.Header.Get(stage.HeaderReason); !strings.Contains(reason, "receiver gone answered 404") {
				t.Fatalf("reason = %q", reason)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the alert never reached the DLQ")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if okHits.Load() != 1 || goneHits.Load() != 1 {
		t.Fatalf("requests: ok %d, gone %d; want 1 each", okHits.Load(), goneHits.Load())
	}
}

// Loopback addresses are refused at connect time unless allowed.
func TestPrivateAddressRefused(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	r, err := NewReceiver(ReceiverConfig{Name: "x", URL: srv.URL, SecretEnv: []string{"S"}}, func(string) (string, bool) { return "secret", true })
	if err != nil {
		t.Fatal(err)
	}
	err = r.Deliver(context.Background(), "msg_1", []byte(`{}`))
	var perm *permanentError
	if err == nil || !strings.Contains(err.Error(), "address not allowed") || !errorsAs(err, &perm) {
		t.Fatalf("err = %v, want a permanent refusal of the loopback address", err)
	}
	if strings.Contains(err.Error(), "secret") {
		t.Fatal("the error shows the secret")
	}
}

func errorsAs(err error, target **permanentError) bool { return errors.As(err, target) }

func TestRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"", 0},
		{"5", 5 * time.Second},
		{"-3", 0},
		{"999999", time.Hour},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{"soon", 0},
	}
	for _, tt := range tests {
		if got := retryAfter(tt.in, now); got != tt.want {
			t.Errorf("retryAfter(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}
