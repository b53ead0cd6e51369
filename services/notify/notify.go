// Package notify is the notify stage: it reads ALERTS and POSTs each alert, signed
// with the Standard Webhooks headers, to every receiver in SLUICE_CONFIG. The alert
// message is acked only after every receiver answered 2xx; otherwise JetStream
// redelivers it after a backoff (or the receiver's Retry-After), with the same
// webhook-id, so receivers can drop repeats. A 4xx other than 408 and 429 is final:
// the alert goes to the DLQ with the receiver's answer.
package notify

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"

	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// Name is the stage's name in logs, metrics and dead letters.
const Name = "notify"

// ReceiverConfig is one entry of the receivers section of SLUICE_CONFIG.
type ReceiverConfig struct {
	Name string `yaml:"name"`
	URL  string `yaml:"url"`
	// SecretEnv names environment variables holding signing secrets; the first signs,
	// all sign during a rotation. Secrets are never written in the file.
	SecretEnv []string `yaml:"secret_env"`
	// AllowPrivate permits loopback, private and link-local addresses.
	AllowPrivate bool          `yaml:"allow_private"`
	Timeout      time.Duration `yaml:"timeout"`
}

// Receiver is a loaded receiver.
type Receiver struct {
	Name    string
	URL     string
	secrets []Secret
	client  *http.Client
}

// LoadReceivers decodes the receivers section of f, reading secrets through env.
func LoadReceivers(f *configfile.File, env func(string) (string, bool)) ([]*Receiver, error) {
	var cfgs []ReceiverConfig
	if err := f.Decode("receivers", &cfgs); err != nil {
		return nil, err
	}
	var (
		out  []*Receiver
		errs []error
	)
	for i, c := range cfgs {
		r, err := NewReceiver(c, env)
		if err != nil {
			errs = append(errs, fmt.Errorf("receiver %d (%q): %w", i+1, c.Name, err))
			continue
		}
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

// NewReceiver checks c and builds its HTTP client.
func NewReceiver(c ReceiverConfig, env func(string) (string, bool)) (*Receiver, error) {
	if c.Name == "" {
		return nil, errors.New("name is required")
	}
	u, err := url.Parse(c.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("url %q is not an http(s) URL", c.URL)
	}
	if len(c.SecretEnv) == 0 {
		return nil, errors.New("secret_env is required: name the environment variable holding the signing secret")
	}
	var secrets []Secret
	for _, name := range c.SecretEnv {
		v, ok := env(name)
		if !ok || v == "" {
			return nil, fmt.Errorf("environment variable %s (secret_env) is not set", name)
		}
		s, err := ParseSecret(v)
		if err != nil {
			return nil, fmt.Errorf("environment variable %s: %w", name, err)
		}
		secrets = append(secrets, s)
	}
	if c.Timeout <= 0 {
		c.Timeout = 10 * time.Second
	}
	dialer := &net.Dialer{Timeout: c.Timeout, Control: addressGuard(c.AllowPrivate)}
	transport := &http.Transport{DialContext: dialer.DialContext, MaxConnsPerHost: 1, ResponseHeaderTimeout: c.Timeout, Proxy: nil}
	return &Receiver{
		Name:    c.Name,
		URL:     c.URL,
		secrets: secrets,
		client: &http.Client{
			Transport:     transport,
			Timeout:       c.Timeout,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
	}, nil
}

// ErrForbiddenAddress is returned when a receiver resolves to an address it may not use.
var ErrForbiddenAddress = errors.New("address not allowed for webhooks (loopback, private, link-local or unspecified); set allow_private: true on the receiver to permit it")

// addressGuard refuses, at connect time and on the resolved address, the addresses
// a webhook must not reach unless allowed.
func addressGuard(allowPrivate bool) func(network, address string, _ syscall.RawConn) error {
	return func(_, address string, _ syscall.RawConn) error {
		if allowPrivate {
			return nil
		}
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return err
		}
		ip := net.ParseIP(host)
		if ip == nil || ip.IsLoopback() || ip.IsPrivate() || ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() || ip.IsUnspecified() || ip.IsMulticast() {
			return fmt.Errorf("%s: %w", host, ErrForbiddenAddress)
		}
		return nil
	}
}

// permanentError is an answer that retrying will not change.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }

// Deliver POSTs body to r, signed, with the given webhook-id.
func (r *Receiver) Deliver(ctx context.Context, id string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.URL, bytes.NewReader(body))
	if err != nil {
		return &permanentError{fmt.Errorf("receiver %s: %w", r.Name, err)}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "sluice-notify")
	SetHeaders(req.Header, r.secrets, id, time.Now(), body)
	resp, err := r.client.Do(req)
	if err != nil {
		if errors.Is(err, ErrForbiddenAddress) {
			return &permanentError{fmt.Errorf("receiver %s: %w", r.Name, err)}
		}
		return fmt.Errorf("receiver %s: %w", r.Name, err)
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode == http.StatusTooManyRequests:
		err := fmt.Errorf("receiver %s answered %s: %s", r.Name, resp.Status, strings.TrimSpace(string(snippet)))
		if after := retryAfter(resp.Header.Get("Retry-After"), time.Now()); after > 0 {
			return &stage.RetryAfterError{After: after, Err: err}
		}
		return err
	default:
		return &permanentError{fmt.Errorf("receiver %s answered %s: %s", r.Name, resp.Status, strings.TrimSpace(string(snippet)))}
	}
}

// retryAfter parses a Retry-After header (seconds or an HTTP date), capped at 1 h.
func retryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	var d time.Duration
	if s, err := strconv.Atoi(v); err == nil {
		d = time.Duration(s) * time.Second
	} else if t, err := http.ParseTime(v); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, 0), time.Hour)
}

// Config configures the stage.
type Config struct {
	Stage     stage.Config
	Receivers []*Receiver
}

// DefaultConfig reads the notify consumer of ALERTS, with no receivers.
func DefaultConfig() Config {
	return Config{Stage: stage.Config{Name: Name, Stream: streams.Alerts, Consumer: "notify", MaxInFlight: 64, PullBatch: 64}}
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Ready      func()
}

type handler struct {
	receivers  []*Receiver
	maxPayload int64
	sent       *prometheus.CounterVec
}

// WebhookID is the id a notification keeps across retries: the alert's stream and
// sequence and the receiver.
func WebhookID(stream string, seq uint64, receiver string) string {
	return "msg_" + stream + "_" + strconv.FormatUint(seq, 10) + "_" + receiver
}

// handle delivers one alert to every receiver. If any receiver failed in a way a
// retry may mend, the alert is redelivered later to all of them (with the same
// webhook-id, so receivers drop what they already have). Otherwise, if a receiver
// refused it for good, it is dead-lettered with that answer.
func (h *handler) handle(ctx context.Context, msg jetstream.Msg) ([]*nats.Msg, error) {
	md, err := msg.Metadata()
	if err != nil {
		return nil, err
	}
	var retry, refused []error
	for _, r := range h.receivers {
		err := r.Deliver(ctx, WebhookID(md.Stream, md.Sequence.Stream, r.Name), msg.Data())
		h.sent.WithLabelValues(r.Name, outcome(err)).Inc()
		var perm *permanentError
		switch {
		case err == nil:
		case errors.As(err, &perm):
			refused = append(refused, err)
		default:
			retry = append(retry, err)
		}
	}
	if len(retry) > 0 {
		return nil, errors.Join(retry...)
	}
	if len(refused) > 0 {
		return []*nats.Msg{stage.DeadLetter(Name, msg, errors.Join(refused...).Error(), h.maxPayload)}, nil
	}
	return nil, nil
}

func outcome(err error) string {
	var perm *permanentError
	switch {
	case err == nil:
		return "delivered"
	case errors.As(err, &perm):
		return "rejected"
	default:
		return "retry"
	}
}

// Run runs the stage until ctx is done.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	h := &handler{
		receivers:  cfg.Receivers,
		maxPayload: deps.NATS.MaxPayload(),
		sent: telemetry.Register(deps.Registerer, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_notify_requests_total", Help: "Webhook requests by receiver and outcome (delivered, retry, rejected).",
		}, []string{"receiver", "outcome"})),
	}
	deps.Logger.Info("receivers loaded", "receivers", len(cfg.Receivers))
	handle := func(msg jetstream.Msg) ([]*nats.Msg, error) { return h.handle(ctx, msg) }
	r, err := stage.New(deps.NATS, cfg.Stage, handle, deps.Logger, deps.Registerer)
	if err != nil {
		return err
	}
	return r.Run(ctx, deps.Ready)
}
