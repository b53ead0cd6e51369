package chconn_test

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/settings"
)

// Wait waits while nothing answers (reporting why), returns at once on an error
// ClickHouse itself answers, and connects when it can.
func TestWait(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	var (
		mu      sync.Mutex
		reports []error
	)
	report := func(err error) { mu.Lock(); reports = append(reports, err); mu.Unlock() }

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := chconn.Wait(ctx, settings.ClickHouse{Addr: closed, Database: "x", User: "default"}, report, log); err == nil || ctx.Err() == nil {
		t.Fatalf("nothing listening: %v after %s, want to wait until the context ends", err, time.Since(start))
	}
	mu.Lock()
	if len(reports) < 2 || reports[0] == nil || !strings.Contains(reports[0].Error(), "connection refused") {
		t.Fatalf("reports while waiting: %v", reports)
	}
	reports = nil
	mu.Unlock()

	srv := chtest.Start(t)
	s, _ := chtest.Database(t, srv)
	bad := s
	bad.Password = "not-the-password"
	start = time.Now()
	if _, err := chconn.Wait(context.Background(), bad, report, log); err == nil || time.Since(start) > 10*time.Second {
		t.Fatalf("wrong password: %v after %s, want an error at once", err, time.Since(start))
	}
	conn, err := chconn.Wait(context.Background(), s, report, log)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	mu.Lock()
	defer mu.Unlock()
	if len(reports) != 1 || reports[0] != nil {
		t.Fatalf("reports: %v, want one nil once connected", reports)
	}
}

// An address that answers in another protocol (ClickHouse's HTTP port, given for
// its native one) is said to be the wrong port.
func TestNotNativeProtocol(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := chconn.Open(ctx, settings.ClickHouse{Addr: srv.Listener.Addr().String(), Database: "x", User: "default"})
	if err == nil || !strings.Contains(err.Error(), "is it ClickHouse's native protocol port, 9000 by default? Its HTTP port, 8123, is not") {
		t.Fatalf("Open of an HTTP server: %v", err)
	}
}
