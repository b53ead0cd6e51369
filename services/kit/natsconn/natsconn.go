// Package natsconn connects to NATS with the shared settings.
package natsconn

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/services/kit/settings"
)

// ConnectWait is Connect retried, for at most wait, while it fails for a reason
// other than refused credentials: a service starting while NATS restarts waits for
// it; a wrong URL still fails, after wait.
func ConnectWait(ctx context.Context, s settings.NATS, name string, log *slog.Logger, wait time.Duration) (*nats.Conn, error) {
	deadline := time.Now().Add(wait)
	for {
		nc, err := Connect(s, name, log)
		// Refused credentials will not change; anything else (no server yet, a
		// connection reset mid-handshake) may.
		if err == nil || errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || time.Now().After(deadline) {
			return nc, err
		}
		log.Warn("waiting for NATS", "url", Redacted(s.URL), "err", err)
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(time.Second):
		}
	}
}

// Redacted is a list of server URLs (NATS_URL) without the passwords some carry
// (nats://user:password@host).
func Redacted(urls string) string {
	parts := strings.Split(urls, ",")
	for i, p := range parts {
		if u, err := url.Parse(strings.TrimSpace(p)); err == nil && u.User != nil {
			parts[i] = u.Redacted()
		}
	}
	return strings.Join(parts, ",")
}

// PingInterval and MaxPingsOutstanding bound how long a connection to a server
// that went silent (a dead host, a cut network: no reset, no close) stays open
// before the client reconnects to another node: about 30 s, where nats.go's
// defaults (2 minutes, 2 pings) leave it open for 4 to 6 minutes, pulls and
// publishes waiting meanwhile.
const (
	PingInterval        = 10 * time.Second
	MaxPingsOutstanding = 3
)

// Connect dials NATS with s and reconnects forever; name identifies the client in
// the server's monitoring.
func Connect(s settings.NATS, name string, log *slog.Logger) (*nats.Conn, error) {
	return connect(s, name, log, PingInterval)
}

func connect(s settings.NATS, name string, log *slog.Logger, ping time.Duration) (*nats.Conn, error) {
	opts := []nats.Option{
		nats.Name(name),
		nats.PingInterval(ping),
		nats.MaxPingsOutstanding(MaxPingsOutstanding),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(500 * time.Millisecond),
		nats.RetryOnFailedConnect(false),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted()) }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Warn("nats async error", "subject", subject, "err", err)
		}),
	}
	if s.Creds != "" {
		opts = append(opts, nats.UserCredentials(s.Creds))
	}
	if s.User != "" || s.Password != "" {
		opts = append(opts, nats.UserInfo(s.User, s.Password))
	}
	if s.Token != "" {
		opts = append(opts, nats.Token(s.Token))
	}
	if s.TLSCA != "" {
		opts = append(opts, nats.RootCAs(s.TLSCA))
	}
	if s.TLSCert != "" || s.TLSKey != "" {
		if s.TLSCert == "" || s.TLSKey == "" {
			return nil, fmt.Errorf("nats: --nats-tls-cert and --nats-tls-key go together")
		}
		opts = append(opts, nats.ClientCert(s.TLSCert, s.TLSKey))
	}
	nc, err := nats.Connect(s.URL, opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w%s", Redacted(s.URL), err, hint(err))
	}
	return nc, nil
}

// hint is what a connection error that names no cause suggests: something at the
// address that is no NATS server (an HTTP port such as NATS's monitoring 8222 waits
// for a request and sends nothing), or none reachable.
func hint(err error) string {
	var ne net.Error
	switch {
	case errors.Is(err, nats.ErrNoInfoReceived):
		return " (what answered there is not a NATS server: is the port a NATS client port, 4222 by default?)"
	case errors.As(err, &ne) && ne.Timeout():
		return " (no NATS greeting in time: is the port a NATS client port, 4222 by default, not the monitoring port 8222 or another service's, and the host reachable?)"
	}
	return ""
}
