package compose

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// demoSecret is compose.yaml's default WEBHOOK_SECRET.
const demoSecret = "whsec_c2x1aWNlLWRlbW8tc2VjcmV0LWNoYW5nZS1tZQ=="

// hook is a webhook receiver on the host, reached from the notify container as
// test-host (host-gateway): it counts alerts by webhook-id, and badly signed ones.
type hook struct {
	srv  *http.Server
	port int
	mu   sync.Mutex
	ids  map[string]int
	bad  int
}

func newHook(t *testing.T) *hook {
	t.Helper()
	secret, err := notify.ParseSecret(demoSecret)
	if err != nil {
		t.Fatal(err)
	}
	// Every address: the containers come from the Docker bridge.
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	h := &hook{ids: map[string]int{}, port: ln.Addr().(*net.TCPAddr).Port}
	h.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		h.mu.Lock()
		defer h.mu.Unlock()
		if err := notify.Verify(secret, r.Header, body, time.Now(), 5*time.Minute); err != nil {
			h.bad++
			return
		}
		h.ids[r.Header.Get(notify.HeaderID)]++
	})}
	go func() { _ = h.srv.Serve(ln) }()
	t.Cleanup(func() { _ = h.srv.Close() })
	return h
}

func (h *hook) counts() (ids, bad int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.ids), h.bad
}

// oracleRun is the end-to-end oracle through a stack: a manifest published in parts
// by a producer, checked in ClickHouse and at the webhook receiver.
type oracleRun struct {
	s     *stack
	h     *hook
	m     *oracle.Manifest
	parts int
	// pjs publishes as the producer user; js reads the streams as admin.
	pjs, js jetstream.JetStream
}

// hookConfig is a SLUICE_CONFIG whose rule fires on every thousandth event, to the
// receiver h.
func hookConfig(h *hook) string {
	return fmt.Sprintf(`rules:
  - name: every-thousandth
    filter: 'int(data.n) %% 1000 == 0'
    severity: info
receivers:
  - {name: hook, url: "http://test-host:%d/hook", secret_env: [WEBHOOK_SECRET], allow_private: true}
`, h.port)
}

// newOracleRun connects to the stack up now and waits until the pipeline saved
// its first state: input stored before that is a replay, whose alerts reach no
// receiver (docs/alerting.md).
func newOracleRun(t *testing.T, s *stack, h *hook, spec oracle.Spec, parts int) *oracleRun {
	t.Helper()
	// Events come from a producer; the checks read the streams as an operator.
	producer, err := s.connect("producer", nats.MaxReconnects(-1), nats.ReconnectWait(500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(producer.Close)
	pjs, err := jetstream.New(producer, jetstream.WithPublishAsyncTimeout(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	nc, err := s.connect("admin", nats.MaxReconnects(-1), nats.ReconnectWait(500*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 2*time.Minute, func() error {
		kv, err := js.KeyValue(context.Background(), pipeline.Bucket)
		if err != nil {
			return err
		}
		o, err := partition.Owner(context.Background(), kv, 0)
		if err == nil && o.State == "" {
			err = errors.New("no pipeline state saved yet")
		}
		return err
	})
	m := oracle.NewManifest(spec)
	m.MayRepeat = map[string]int{}
	return &oracleRun{s: s, h: h, m: m, parts: parts, pjs: pjs, js: js}
}

// part is the i-th of r.parts parts of the manifest.
func (r *oracleRun) part(i int) *oracle.Manifest {
	sub := *r.m
	per := len(r.m.Publishes) / r.parts
	sub.Publishes = r.m.Publishes[i*per : min((i+1)*per, len(r.m.Publishes))]
	if i == r.parts-1 {
		sub.Publishes = r.m.Publishes[i*per:]
	}
	return &sub
}

// publish publishes p as the producer, each message until acknowledged.
func (r *oracleRun) publish(p *oracle.Manifest) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// About 4,000 publishes a second, so each part outlasts its fault (the pause
	// paces the producer; it waits on no condition).
	return p.PublishAcked(ctx, r.pjs, 200, func() { time.Sleep(50 * time.Millisecond) })
}

// during publishes part i while fault runs, a second into it.
func (r *oracleRun) during(t *testing.T, i int, what string, fault func()) {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- r.publish(r.part(i)) }()
	time.Sleep(time.Second) // the fault's timing: into the part, not a condition
	fault()
	if err := <-done; err != nil {
		t.Fatalf("publishing while %s: %v", what, err)
	}
	t.Logf("%s", what)
}

// check waits until everything published is stored and every alert delivered,
// then checks ClickHouse against the manifest and the receiver's counts.
func (r *oracleRun) check(t *testing.T, ch driver.Conn) {
	t.Helper()
	ctx := context.Background()
	wantAlerts := (len(r.m.Events) + 999) / 1000 // data.n is the event's index
	err := oracle.WaitFor(ctx, 5*time.Minute, func() error {
		c, err := oracle.ReadCounts(ctx, ch)
		if err != nil {
			return err
		}
		if c.Events < uint64(len(r.m.Events)) || c.DeadLetters < uint64(len(r.m.Invalid)) {
			return fmt.Errorf("events %d/%d, dead letters %d/%d", c.Events, len(r.m.Events), c.DeadLetters, len(r.m.Invalid))
		}
		if ids, _ := r.h.counts(); ids < wantAlerts {
			var stored, replayed uint64
			_ = ch.QueryRow(ctx, "SELECT count(), countIf(replay = 1) FROM alerts").Scan(&stored, &replayed)
			return fmt.Errorf("%d/%d alerts at the receiver (the alerts table: %d, %d of them marked replay)", ids, wantAlerts, stored, replayed)
		}
		for _, c := range [][2]string{{streams.Alerts, "notify"}, {streams.Alerts, "sink"}, {streams.DLQ, "sink"}} {
			if err := natstest.Idle(ctx, r.js, c[0], c[1]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := r.m.Check(ctx, ch); err != nil {
		t.Fatal(err)
	}
	if ids, bad := r.h.counts(); ids != wantAlerts || bad != 0 {
		t.Fatalf("receiver: %d alerts (want %d), %d badly signed", ids, wantAlerts, bad)
	}
}

// TestComposeStack brings compose.yaml up and runs the end-to-end oracle through it
// from outside (publishes as the nats CLI does, as the producer user, with repeats
// and invalid input; a rule firing to a webhook receiver on the host), with faults:
// docker kill of the pipeline, notify, NATS and ClickHouse mid-run, each started
// again; docker compose down and up with the named volumes (repeats of what came
// before are still dropped); a config error (the pipeline exits saying what is
// wrong, in docker compose logs); ClickHouse not ready (the pipeline waits, /readyz
// says why, no crash loop). Every unique event lands once, every invalid one in
// dead_letters, every alert reaches the receiver signed. Then what secures it: NATS
// takes TLS clients with a password only, each user only its own subjects, and no
// secret is in the logs.
func TestComposeStack(t *testing.T) {
	s := newStack(t, "stack")
	h := newHook(t)
	password := s.Passwords["CLICKHOUSE_PASSWORD"]
	s.env = append(s.env, fmt.Sprintf("SLUICE_TEST_NATS_PORT=%d", testnet.FreePort(t)), fmt.Sprintf("SLUICE_TEST_CLICKHOUSE_PORT=%d", testnet.FreePort(t)),
		fmt.Sprintf("SLUICE_TEST_PIPELINE_PORT=%d", testnet.FreePort(t)))
	good := hookConfig(h)
	s.writeConfig(good)
	s.up()
	ctx := context.Background()
	ch := openClickHouse(t, s.addr("clickhouse", 9000), password)
	// The migrate step applied the migrations before the pipeline and the sink
	// started: each is recorded once (the two applying them at start, at once, could
	// each record them, as they did in sluice up).
	var rows, versions uint64
	if err := ch.QueryRow(ctx, "SELECT count(), uniqExact(version) FROM schema_migrations").Scan(&rows, &versions); err != nil {
		t.Fatal(err)
	}
	ms, err := chmigrate.Migrations()
	if err != nil {
		t.Fatal(err)
	}
	if rows != versions || versions != uint64(len(ms)) {
		t.Fatalf("schema_migrations holds %d rows of %d versions, want one row of each of %d migrations", rows, versions, len(ms))
	}
	const parts = 6
	r := newOracleRun(t, s, h, oracle.Spec{Total: 24_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 41}, parts)
	if err := r.publish(r.part(0)); err != nil {
		t.Fatal(err)
	}
	// Each fault mid-run: a part is being published when the service is killed.
	for i, service := range []string{"pipeline", "notify", "nats", "clickhouse"} {
		r.during(t, i+1, "killed and started "+service, func() {
			s.kill(service)
			s.up(service)
		})
	}
	// Down and up with the named volumes: the state and the tables stay. Repeats of
	// the first part, published again, are still dropped.
	s.noViolations("nats")
	s.saveLogs("before-down")
	s.must("down", "--timeout", "10")
	s.up()
	ch = openClickHouse(t, s.addr("clickhouse", 9000), password)
	again := r.part(0)
	again.Publishes = nil
	for _, p := range r.part(0).Publishes {
		if p.Event >= 0 {
			p.Repeat = true
			again.Publishes = append(again.Publishes, p)
		}
	}
	if err := r.publish(again); err != nil {
		t.Fatal(err)
	}
	if err := r.publish(r.part(parts - 1)); err != nil {
		t.Fatal(err)
	}
	r.check(t, ch)
	s.noViolations("nats")

	t.Run("secrets", func(t *testing.T) {
		// ClickHouse refuses its open default user and a wrong password.
		for _, auth := range []clickhouse.Auth{{Database: "sluice", Username: "default"}, {Database: "sluice", Username: "sluice", Password: "wrong"}} {
			conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{s.addr("clickhouse", 9000)}, Auth: auth})
			if err != nil {
				t.Fatal(err)
			}
			err = conn.Ping(ctx)
			conn.Close()
			if err == nil {
				t.Fatalf("ClickHouse took user %q with password %q", auth.Username, auth.Password)
			}
		}
		// No password is in any container's log.
		logs := s.must("logs", "--no-color")
		for name, secret := range s.Passwords {
			if strings.Contains(logs, secret) {
				t.Fatalf("%s appears in docker compose logs", name)
			}
		}
	})

	t.Run("nats", func(t *testing.T) {
		addr := s.addr("nats", 4222)
		// A plaintext client, a TLS client without a user, and a wrong password are
		// refused.
		if nc, err := nats.Connect("nats://"+addr, nats.MaxReconnects(0)); err == nil {
			nc.Close()
			t.Fatal("NATS took a plaintext client")
		}
		ca := nats.RootCAs(filepath.Join(s.CertsDir, "ca.pem"))
		if nc, err := nats.Connect("tls://"+addr, ca, nats.MaxReconnects(0)); err == nil || !errors.Is(err, nats.ErrAuthorization) {
			if nc != nil {
				nc.Close()
			}
			t.Fatalf("a TLS client without a user: %v, want an authorization error", err)
		}
		if nc, err := nats.Connect("tls://"+addr, ca, nats.UserInfo("pipeline", "wrong"), nats.MaxReconnects(0)); err == nil || !errors.Is(err, nats.ErrAuthorization) {
			if nc != nil {
				nc.Close()
			}
			t.Fatalf("a wrong password: %v, want an authorization error", err)
		}
		// A client that does not know the CA does not take the server.
		if nc, err := nats.Connect("tls://"+addr, nats.UserInfo("producer", s.Passwords["NATS_PRODUCER_PASSWORD"]), nats.MaxReconnects(0)); err == nil {
			nc.Close()
			t.Fatal("a client without the CA trusted the server")
		}
		// The keys are root's alone; the services run as another user, so they
		// cannot read them.
		for _, f := range []string{"ca-key.pem", "server-key.pem"} {
			info, err := os.Stat(filepath.Join(s.CertsDir, f))
			if err != nil {
				t.Fatal(err)
			}
			if st, ok := info.Sys().(*syscall.Stat_t); info.Mode().Perm() != 0o600 || !ok || st.Uid != 0 {
				t.Fatalf("%s: mode %v, owner %v; want 0600 and root", f, info.Mode().Perm(), info.Sys())
			}
		}
		for _, service := range []string{"pipeline", "notify", "sink"} {
			if user := s.inspect(service, "{{.Config.User}}"); user == "" || user == "0" || strings.HasPrefix(user, "0:") || strings.HasPrefix(user, "root") {
				t.Fatalf("%s runs as %q, which can read the keys", service, user)
			}
		}
		// Each user is refused what is not its own: the server answers a subscribe
		// or publish outside the user's permissions with a permissions violation.
		for _, c := range []struct{ user, sub, pub string }{
			{user: "producer", sub: "events.>"},
			{user: "producer", pub: "alerts.forged"},
			{user: "producer", pub: "$JS.API.STREAM.INFO.EVENTS"},
			{user: "notify", sub: "events.>"},
			{user: "notify", pub: "$JS.API.CONSUMER.MSG.NEXT.EVENTS.dedup"},
			{user: "sink", pub: "alerts.forged"},
			{user: "sink", pub: "$JS.API.STREAM.DELETE.EVENTS"},
			{user: "pipeline", sub: "notify.>"},
			{user: "pipeline", pub: "$JS.API.STREAM.PURGE.EVENTS"},
			{user: "pipeline", pub: "$KV.sluice_notify.lease"},
		} {
			violations := make(chan error, 4)
			nc, err := s.connect(c.user, nats.MaxReconnects(0), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
				violations <- err
			}))
			if err != nil {
				t.Fatalf("%s: %v", c.user, err)
			}
			if c.sub != "" {
				_, err = nc.SubscribeSync(c.sub)
			} else {
				err = nc.Publish(c.pub, []byte("{}"))
			}
			if err == nil {
				err = nc.Flush()
			}
			if err != nil {
				nc.Close()
				t.Fatal(err)
			}
			select {
			case err := <-violations:
				if !errors.Is(err, nats.ErrPermissionViolation) {
					t.Fatalf("%s, subscribe %q publish %q: %v, want a permissions violation", c.user, c.sub, c.pub, err)
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("%s, subscribe %q publish %q: no permissions violation within 30 s", c.user, c.sub, c.pub)
			}
			nc.Close()
		}
	})

	t.Run("config error", func(t *testing.T) {
		s.writeConfig("ingest:\n  mappings:\n    - {subjects: 'events..x', envelope: raw}\n")
		defer func() {
			s.writeConfig(good)
			s.must("up", "--detach", "--no-deps", "--force-recreate", "--wait", "pipeline")
		}()
		s.must("up", "--detach", "--no-deps", "--force-recreate", "pipeline")
		// The services log JSON (LOG_FORMAT=json in compose.yaml): quotes come escaped.
		want := `ingest.mappings[0]: subjects \"events..x\" is not a subject pattern`
		poll.Until(t, 2*time.Minute, func() error {
			logs := s.must("logs", "--no-color", "pipeline")
			if !strings.Contains(logs, want) {
				return fmt.Errorf("docker compose logs pipeline does not say %q yet", want)
			}
			return nil
		})
		// The log line comes before the exit, and a restart resets the exit
		// code while the container runs: read it while the container is down
		// (exited, or restarting under compose's restart policy).
		var state string
		poll.Until(t, 2*time.Minute, func() error {
			state = s.inspect("pipeline", "{{.State.Status}} {{.State.ExitCode}}")
			if !strings.HasPrefix(state, "exited ") && !strings.HasPrefix(state, "restarting ") {
				return fmt.Errorf("the pipeline's container is %q, not down yet", state)
			}
			return nil
		})
		if strings.HasSuffix(state, " 0") {
			t.Fatalf("the pipeline exited with 0 on a config error (%s)", state)
		}
	})

	t.Run("clickhouse not ready", func(t *testing.T) {
		s.must("stop", "clickhouse")
		s.must("restart", "pipeline")
		readyz := "http://" + s.addr("pipeline", 9306) + "/readyz"
		restarts := s.inspect("pipeline", "{{.RestartCount}}")
		poll.Until(t, 2*time.Minute, func() error {
			code, body := get(readyz)
			if code != http.StatusServiceUnavailable || !strings.Contains(strings.ToLower(body), "clickhouse") {
				return fmt.Errorf("/readyz: %d %q, want 503 naming ClickHouse", code, body)
			}
			return nil
		})
		s.must("start", "clickhouse")
		poll.Until(t, 3*time.Minute, func() error {
			if code, body := get(readyz); code != http.StatusOK {
				return fmt.Errorf("/readyz: %d %q", code, body)
			}
			return nil
		})
		if now := s.inspect("pipeline", "{{.RestartCount}}"); now != restarts {
			t.Fatalf("the pipeline restarted %s times while ClickHouse was down (was %s): a crash loop", now, restarts)
		}
	})
}

func get(url string) (int, string) {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// randomSecret is a password made for one run.
func randomSecret(t *testing.T) string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// openClickHouse connects to the stack's ClickHouse as compose.yaml's user, waiting
// for it to answer.
func openClickHouse(t *testing.T, addr, password string) driver.Conn {
	t.Helper()
	conn, err := clickhouse.Open(&clickhouse.Options{Addr: []string{addr}, Auth: clickhouse.Auth{Database: "sluice", Username: "sluice", Password: password}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	poll.Until(t, 2*time.Minute, func() error { return conn.Ping(context.Background()) })
	return conn
}
