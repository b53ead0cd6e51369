package notify

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/stage"
)

// ReceiverConfig is one entry of the receivers section of SLUICE_CONFIG.
type ReceiverConfig struct {
	// Name is the receiver's name: letters, digits, - and _.
	Name string `yaml:"name"`
	URL  string `yaml:"url"`
	// URLEnv names an environment variable holding the URL instead, for a URL that
	// is itself a secret (Slack's incoming webhooks: its path is the token).
	URLEnv string `yaml:"url_env"`
	// Format of the body: sluice (default), alertmanager (Alertmanager's webhook
	// JSON, version 4) or slack (an incoming-webhook message).
	Format string `yaml:"format"`
	// SecretEnv names environment variables holding signing secrets; the first signs,
	// all sign during a rotation. Secrets are never written in the file. Required
	// except for slack.
	SecretEnv []string `yaml:"secret_env"`
	// SendResolved: also notify when alerts resolve (default true).
	SendResolved *bool `yaml:"send_resolved"`
	// SendReplayed: also notify alerts raised while re-reading old input.
	SendReplayed bool `yaml:"send_replayed"`
	// AllowPrivate permits loopback, private and link-local addresses.
	AllowPrivate bool          `yaml:"allow_private"`
	Timeout      time.Duration `yaml:"timeout"`
	// MaxAge is how long a notification is retried before it goes to the DLQ with
	// the last error (default 24h).
	MaxAge time.Duration `yaml:"max_age"`
	// MaxAlerts caps the alerts in one request (default 100; the rest are counted
	// as truncated).
	MaxAlerts int `yaml:"max_alerts"`
}

// Receiver is a loaded receiver.
type Receiver struct {
	Name         string
	URL          string
	Format       string
	SendResolved bool
	SendReplayed bool
	MaxAge       time.Duration
	MaxAlerts    int
	secrets      []Secret
	client       *http.Client
	// shownURL is the URL as errors show it: scheme and host (its path and query
	// may hold a token).
	shownURL string
}

// shownURL is u without what may hold a token: user info, path and query.
func shownURL(u *url.URL) string {
	s := u.Scheme + "://" + u.Host
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		s += "/…"
	}
	return s
}

var receiverName = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

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
	seen := map[string]bool{}
	for i, c := range cfgs {
		r, err := NewReceiver(c, env)
		if err == nil && seen[c.Name] {
			err = errors.New("another receiver has this name")
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("receiver %d (%q): %w", i+1, c.Name, err))
			continue
		}
		seen[c.Name] = true
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

// NewReceiver checks c and builds its HTTP client.
func NewReceiver(c ReceiverConfig, env func(string) (string, bool)) (*Receiver, error) {
	if !receiverName.MatchString(c.Name) {
		return nil, errors.New("name is required: letters, digits, - and _")
	}
	if c.URLEnv != "" {
		if c.URL != "" {
			return nil, errors.New("set url or url_env, not both")
		}
		v, ok := env(c.URLEnv)
		if !ok || v == "" {
			return nil, fmt.Errorf("environment variable %s (url_env) is not set", c.URLEnv)
		}
		c.URL = v
	}
	u, err := url.Parse(c.URL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		// The URL is not shown (nor url.Parse's error, which holds it): its path
		// may be a token (a Slack incoming webhook's is).
		what := "url"
		if c.URLEnv != "" {
			what = fmt.Sprintf("environment variable %s (url_env)", c.URLEnv)
		}
		switch {
		case err != nil:
			return nil, fmt.Errorf("%s does not parse as a URL", what)
		case u.Scheme != "http" && u.Scheme != "https":
			return nil, fmt.Errorf("%s: scheme %q, want http or https", what, u.Scheme)
		default:
			return nil, fmt.Errorf("%s has no host (want https://host/path)", what)
		}
	}
	switch c.Format {
	case "":
		c.Format = FormatSluice
	case FormatSluice, FormatAlertmanager, FormatSlack:
	default:
		return nil, fmt.Errorf("format %q: want sluice, alertmanager or slack", c.Format)
	}
	if len(c.SecretEnv) == 0 && c.Format != FormatSlack {
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
	if c.MaxAge <= 0 {
		c.MaxAge = 24 * time.Hour
	}
	if c.MaxAlerts <= 0 {
		c.MaxAlerts = 100
	}
	dialer := &net.Dialer{Timeout: c.Timeout, Control: addressGuard(c.AllowPrivate)}
	transport := &http.Transport{DialContext: dialer.DialContext, MaxConnsPerHost: 1, ResponseHeaderTimeout: c.Timeout, Proxy: nil}
	return &Receiver{
		Name:         c.Name,
		URL:          c.URL,
		shownURL:     shownURL(u),
		Format:       c.Format,
		SendResolved: c.SendResolved == nil || *c.SendResolved,
		SendReplayed: c.SendReplayed,
		MaxAge:       c.MaxAge,
		MaxAlerts:    c.MaxAlerts,
		secrets:      secrets,
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

// PermanentError is an answer that retrying will not change.
type PermanentError struct{ Err error }

func (e *PermanentError) Error() string { return e.Err.Error() }
func (e *PermanentError) Unwrap() error { return e.Err }

// ErrGone is a receiver's 410 Gone: the endpoint is disabled.
var ErrGone = errors.New("410 Gone: the endpoint is disabled")

// Deliver POSTs body to r, signed, with the given webhook-id. An error is a
// *PermanentError when retrying cannot help (wrapping ErrGone for 410), a
// *stage.RetryAfterError when the receiver said when to retry, or else an error
// worth retrying. Errors name the receiver but never its secrets, nor its URL's
// path or query.
func (r *Receiver) Deliver(ctx context.Context, id string, body []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.URL, bytes.NewReader(body))
	if err != nil {
		return &PermanentError{fmt.Errorf("receiver %s: %w", r.Name, err)}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "sluice-notify")
	if len(r.secrets) > 0 {
		SetHeaders(req.Header, r.secrets, id, time.Now(), body)
	} else {
		req.Header.Set(HeaderID, id)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		// Go's error names the whole URL; the receiver's path or query may be a
		// token (Slack's is).
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = r.shownURL
		}
		if errors.Is(err, ErrForbiddenAddress) {
			return &PermanentError{fmt.Errorf("receiver %s: %w", r.Name, err)}
		}
		return fmt.Errorf("receiver %s: %w", r.Name, err)
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	answer := fmt.Errorf("receiver %s answered %s: %s", r.Name, resp.Status, strings.TrimSpace(string(snippet)))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusGone:
		return &PermanentError{fmt.Errorf("receiver %s: %w", r.Name, ErrGone)}
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode == http.StatusTooManyRequests:
		if after := retryAfter(resp.Header.Get("Retry-After"), time.Now()); after > 0 {
			return &stage.RetryAfterError{After: after, Err: answer}
		}
		return answer
	default:
		return &PermanentError{answer}
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
