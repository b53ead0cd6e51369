// Package natstest starts an embedded JetStream server for tests.
package natstest

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natsserver"
)

// Server is a running embedded JetStream server on a free loopback port.
type Server struct {
	*server.Server
	// URL is the client URL, for processes and for Connect.
	URL string
}

// Run starts a JetStream server with a temporary store; it stops when t ends.
func Run(t testing.TB) *Server {
	t.Helper()
	return RunIn(t, t.TempDir())
}

// RunIn starts a JetStream server storing in dir, so a test can restart it on the
// same store.
func RunIn(t testing.TB, dir string) *Server {
	t.Helper()
	return RunWith(t, natsserver.Config{StoreDir: dir})
}

// RunWith starts a JetStream server with cfg on a free loopback port (a temporary
// store when cfg.StoreDir is empty).
func RunWith(t testing.TB, cfg natsserver.Config) *Server {
	t.Helper()
	cfg.Host, cfg.Port = "127.0.0.1", -1
	if cfg.StoreDir == "" {
		cfg.StoreDir = t.TempDir()
	}
	srv, err := natsserver.Start(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	return &Server{Server: srv, URL: srv.ClientURL()}
}

// Connect returns a connection closed when t ends.
func (s *Server) Connect(t testing.TB) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(s.URL, nats.MaxReconnects(-1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// Idle returns nil when the consumer has nothing pending and nothing unacked.
func Idle(ctx context.Context, js jetstream.JetStream, stream, consumer string) error {
	c, err := js.Consumer(ctx, stream, consumer)
	if err != nil {
		return err
	}
	info, err := c.Info(ctx)
	if err != nil {
		return err
	}
	if info.NumPending != 0 || info.NumAckPending != 0 {
		return fmt.Errorf("consumer %s on %s: %d pending, %d unacked", consumer, stream, info.NumPending, info.NumAckPending)
	}
	return nil
}

// publishWindow is how many async publishes PublishAll has outstanding at most: well
// under nats.go's pending limit (4,000), so the publisher never stalls on it however
// slow the machine is.
const publishWindow = 1000

// PublishAll publishes msg(i) to subject for every i in [from, to) and returns once
// JetStream acked each of them, or with the first error. It publishes asynchronously in
// windows and waits for a window's acks before the next.
func PublishAll(ctx context.Context, js jetstream.JetStream, subject string, from, to int, msg func(i int) []byte) error {
	futures := make([]jetstream.PubAckFuture, 0, publishWindow)
	for start := from; start < to; start += publishWindow {
		futures = futures[:0]
		for i := start; i < min(start+publishWindow, to); i++ {
			f, err := js.PublishAsync(subject, msg(i))
			if err != nil {
				return fmt.Errorf("publish %d to %s: %w", i, subject, err)
			}
			futures = append(futures, f)
		}
		for j, f := range futures {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				return fmt.Errorf("publish %d to %s: %w", start+j, subject, err)
			case <-ctx.Done():
				return fmt.Errorf("publish %d to %s: %w", start+j, subject, ctx.Err())
			}
		}
	}
	return nil
}

// EachMsg calls f with every message of stream, in order (deleted ones skipped).
func EachMsg(ctx context.Context, js jetstream.JetStream, stream string, f func(m *jetstream.RawStreamMsg)) error {
	s, err := js.Stream(ctx, stream)
	if err != nil {
		return err
	}
	info, err := s.Info(ctx)
	if err != nil {
		return err
	}
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		f(m)
	}
	return nil
}

// MsgIDs is the Nats-Msg-Id of every message in stream.
func MsgIDs(ctx context.Context, js jetstream.JetStream, stream string) ([]string, error) {
	var ids []string
	err := EachMsg(ctx, js, stream, func(m *jetstream.RawStreamMsg) { ids = append(ids, m.Header.Get(nats.MsgIdHdr)) })
	return ids, err
}
