// Package telemetry holds what every service exposes: a slog logger, and an HTTP
// server for the status page (/, package dashboard), /metrics (Prometheus), /healthz
// and /readyz.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sluicehq/sluice/services/kit/telemetry/dashboard"
)

// NewLogger returns a logger writing to w at level (debug, info, warn, error) in
// format text or json.
func NewLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text", "":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	default:
		return nil, fmt.Errorf("log format %q: want text or json", format)
	}
}

// Readiness collects named conditions; the service is ready when all are met.
// The zero value is ready to use, and reports not ready until something is set.
type Readiness struct {
	mu    sync.Mutex
	state map[string]error
}

// Set records the condition name as met (err nil) or not.
func (r *Readiness) Set(name string, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.state == nil {
		r.state = make(map[string]error)
	}
	r.state[name] = err
}

// Check returns nil when every condition is met.
func (r *Readiness) Check() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.state) == 0 {
		return errors.New("starting")
	}
	names := make([]string, 0, len(r.state))
	for n := range r.state {
		names = append(names, n)
	}
	sort.Strings(names)
	var bad []string
	for _, n := range names {
		if err := r.state[n]; err != nil {
			bad = append(bad, n+": "+err.Error())
		}
	}
	if len(bad) > 0 {
		return errors.New(strings.Join(bad, "; "))
	}
	return nil
}

// Handler serves /metrics from g, /healthz, and /readyz from ready.
func Handler(g prometheus.Gatherer, ready *Readiness) http.Handler {
	mux := http.NewServeMux()
	dashboard.Register(mux, g)
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if err := ready.Check(); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ready\n")
	})
	return mux
}

// Serve listens on addr and serves Handler until ctx is done. An empty addr serves
// nothing and waits for ctx. A listen error returns at once.
func Serve(ctx context.Context, addr string, g prometheus.Gatherer, ready *Readiness, log *slog.Logger) error {
	if addr == "" {
		<-ctx.Done()
		return nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("metrics listener (METRICS_ADDR, --metrics-addr; empty turns it off): %w", err)
	}
	srv := &http.Server{Handler: Handler(g, ready), ReadHeaderTimeout: 5 * time.Second}
	log.Info("serving /metrics, /healthz, /readyz and the status page /", "addr", ln.Addr().String())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("metrics server: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdownCtx)
	<-errc
	return nil
}

// Register registers c with reg and returns it, or the collector already registered
// under the same description (so stages sharing a process share their metrics). A
// nil reg registers nothing: the metric works and is not exported.
func Register[T prometheus.Collector](reg prometheus.Registerer, c T) T {
	if reg == nil {
		return c
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(T); ok {
				return existing
			}
		}
		panic(fmt.Sprintf("telemetry: register metric: %v", err)) // a programming error: two metrics with one name
	}
	return c
}
