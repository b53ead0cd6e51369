// Package notify is the notify stage: it gets alert changes from ALERTS to people.
//
// A router reads ALERTS, sorts each alert into the groups of the routes that match
// it, and keeps the groups in the KV bucket sluice_notify. When a group is due (by
// group_wait, group_interval, repeat_interval) and what it would say is not
// silenced (bucket sluice_silences) or inhibited, it publishes one NOTIFY message
// per receiver (notify.<receiver>), with an id that is the webhook-id receivers see.
//
// One deliverer per receiver reads its NOTIFY messages, one request at a time, and
// POSTs each in the receiver's format, signed with the Standard Webhooks headers.
// 2xx acks; 5xx, 408, 429, timeouts and connection errors are retried by JetStream
// (NakWithDelay: exponential backoff with jitter, or the receiver's Retry-After);
// other 4xx, or a notification older than the receiver's max_age, goes to the DLQ
// with the receiver's answer; 410 Gone also disables the receiver until it is
// re-enabled (sluice receiver enable NAME).
package notify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/kvfollow"
	"github.com/sluicehq/sluice/services/kit/lease"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// Name is the stage's name in logs, metrics and dead letters.
const Name = "notify"

// StateBucket holds the groups (group.<key>), failing receivers (failing.<name>) and disabled receivers
// (disabled.<receiver>).
const StateBucket = "sluice_notify"

// HeaderNotificationID carries a NOTIFY message's webhook-id.
const HeaderNotificationID = "Sluice-Notification-Id"

// Config configures the stage.
type Config struct {
	Receivers []*Receiver
	Routes    []*Route
	inhibit   []InhibitRule
	// FlushEvery is how often groups are checked for being due.
	FlushEvery time.Duration
	// Replica names this process in the routing lease (default host:pid).
	Replica string
	// LeaseTTL is how long the routing lease lasts unrenewed: after a router dies,
	// another replica takes over within it.
	LeaseTTL time.Duration
	// Replicas is how many copies a NATS cluster keeps of the stage's buckets (0: as
	// they are, 1 when created).
	Replicas int
	// StallAfter is the router's and each deliverer's watchdog (see stage.Config).
	StallAfter time.Duration
}

// DefaultConfig has no receivers.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{FlushEvery: 200 * time.Millisecond, Replica: fmt.Sprintf("%s:%d", host, os.Getpid()), LeaseTTL: 10 * time.Second}
}

// LoadConfig reads the receivers, routes and notify sections of f; secrets come
// through env.
func LoadConfig(f *configfile.File, env func(string) (string, bool)) (Config, error) {
	cfg := DefaultConfig()
	var err error
	if cfg.Receivers, err = LoadReceivers(f, env); err != nil {
		return cfg, err
	}
	cfg.Routes, cfg.inhibit, err = LoadRoutes(f, cfg.Receivers)
	return cfg, err
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Ready      func()
	// Readiness is the process's /readyz, where a stall is reported (nil: not).
	Readiness *telemetry.Readiness
}

type metrics struct {
	sent     *prometheus.CounterVec
	routed   *prometheus.CounterVec
	notified *prometheus.CounterVec
	firing   prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	return &metrics{
		sent: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_notify_requests_total", Help: "Webhook requests by receiver and outcome (delivered, retry, rejected, gone, expired, disabled).",
		}, []string{"receiver", "outcome"})),
		routed: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_notify_alerts_total", Help: "Alert changes read from ALERTS, by outcome (routed, unrouted, unchanged).",
		}, []string{"outcome"})),
		notified: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_notify_notifications_total", Help: "Notifications queued in NOTIFY, by receiver.",
		}, []string{"receiver"})),
		firing: telemetry.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_notify_alerts_firing", Help: "Alerts firing, as the routing replica holds them (0 on the others: sum over replicas).",
		})),
	}
}

// Run runs the router, the flusher and one deliverer per receiver until ctx is done.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	log := deps.Logger.With("stage", Name)
	def := DefaultConfig()
	if cfg.FlushEvery <= 0 {
		cfg.FlushEvery = def.FlushEvery
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = def.LeaseTTL
	}
	if cfg.Replica == "" {
		cfg.Replica = def.Replica
	}
	js, err := jetstream.New(deps.NATS)
	if err != nil {
		return fmt.Errorf("notify: %w", err)
	}
	state, err := streams.KeyValue(ctx, js, jetstream.KeyValueConfig{
		Bucket: StateBucket, Description: "The notify stage's alert groups and disabled receivers.", Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("notify: bucket %s: %w", StateBucket, err)
	}
	silenceKV, err := SilenceStore(ctx, js, cfg.Replicas)
	if err != nil {
		return err
	}
	// The goroutines started below end with ctx: cancelled (deferred last, so run
	// first) on every return, an error while starting them included.
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	silences, stopSilences, err := WatchSilences(ctx, silenceKV, log)
	if err != nil {
		return err
	}
	defer stopSilences()
	disabled, stopDisabled, err := watchDisabled(ctx, state, log)
	if err != nil {
		return err
	}
	defer stopDisabled()
	m := newMetrics(deps.Registerer)
	s := &stageRun{js: js, state: state, log: log, m: m, silences: silences, wake: make(chan struct{}, 1), maxPayload: deps.NATS.MaxPayload()}
	log.Info("notify loaded", "receivers", len(cfg.Receivers), "routes", len(cfg.Routes), "replica", cfg.Replica)

	errc := make(chan error, len(cfg.Receivers))
	for _, rc := range cfg.Receivers {
		d := &deliverer{rc: rc, js: js, state: state, disabled: disabled, log: deps.Logger.With("receiver", rc.Name), m: m,
			maxPayload: deps.NATS.MaxPayload(), lastErr: map[uint64]string{}}
		runner, err := d.runner(ctx, deps.NATS, deps.Registerer, stage.Config{Ready: deps.Readiness, StallAfter: cfg.StallAfter})
		if err != nil {
			return err
		}
		wg.Go(func() { errc <- runner.Run(ctx, nil) })
	}
	if deps.Ready != nil {
		deps.Ready()
	}
	// Every replica delivers; one at a time routes and flushes, holding the lease.
	l := &lease.Lease{KV: state, Key: "lease.router", Holder: cfg.Replica, TTL: cfg.LeaseTTL, What: "routes alerts", Log: log}
	wg.Go(func() {
		l.Run(ctx, func(ctx context.Context) { s.leadUntilDone(ctx, cfg, deps) })
	})
	select {
	case <-ctx.Done():
		return nil
	case err := <-errc:
		cancel()
		return err
	}
}

// leadUntilDone runs lead until ctx ends, starting it again after a backoff when
// it fails: a cluster electing leaders answers nothing for seconds, which must not
// end routing (nor the process) while this replica holds the lease.
func (s *stageRun) leadUntilDone(ctx context.Context, cfg Config, deps Deps) {
	const maxBackoff = 30 * time.Second
	backoff := time.Second
	for {
		started := time.Now()
		err := s.lead(ctx, cfg, deps)
		if ctx.Err() != nil {
			return
		}
		if time.Since(started) > maxBackoff {
			backoff = time.Second
		}
		s.log.Error("routing stopped; starting it again", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// lead routes and flushes until ctx ends, starting from the groups in the bucket.
func (s *stageRun) lead(ctx context.Context, cfg Config, deps Deps) error {
	groups, err := loadGroups(ctx, s.state)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.router, s.unsaved, s.stale = NewRouter(cfg.Routes, cfg.inhibit, groups), nil, false
	s.mu.Unlock()
	s.log.Info("routing", "groups", len(groups))
	router, err := stage.New(deps.NATS, stage.Config{Name: Name, Stream: streams.Alerts, Consumer: "notify", MaxInFlight: 64, PullBatch: 64, Ready: deps.Readiness,
		StallAfter: cfg.StallAfter},
		s.route(), deps.Logger, deps.Registerer)
	if err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	// The flusher ends with the router, whatever ends it: a router that failed
	// (its consumer not found while the cluster elects) must not leave lead
	// waiting for a flusher that only a lost lease would stop.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wg.Go(func() { s.flushLoop(ctx, cfg.FlushEvery) })
	return router.Run(ctx, nil)
}

type stageRun struct {
	js       jetstream.JetStream
	state    jetstream.KeyValue
	log      *slog.Logger
	m        *metrics
	silences *Silences
	mu       sync.Mutex // guards router, unsaved, stale and the group keys in state
	router   *Router
	// unsaved are groups the router changed whose save failed: saved before any
	// alert is acked. (A redelivered alert the router holds already changes no
	// group; acking it without saving would lose it when routing restarts from the
	// bucket.)
	unsaved map[string]*Group
	// stale: a flush marked notifications sent that it could not queue (its lead
	// ended): the router's groups are ahead of NOTIFY, and none may be saved again
	// (a group saved as sent would never be sent). Routing starts over from the
	// bucket.
	stale bool
	wake  chan struct{}
	// maxPayload is the largest message NATS takes.
	maxPayload int64
}

// route is the router's handler: it adds an alert to its groups and saves them
// before the alert is acked.
func (s *stageRun) route() stage.Handler {
	return func(msg jetstream.Msg) ([]*nats.Msg, error) {
		a, err := alerts.Decode(msg.Data())
		if err != nil {
			return []*nats.Msg{stage.DeadLetter(Name, msg, err.Error(), s.maxPayload)}, nil
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.stale {
			return nil, errStale
		}
		changed, routed := s.router.Add(a, time.Now())
		switch {
		case !routed:
			s.m.routed.WithLabelValues("unrouted").Inc()
		case len(changed) == 0:
			s.m.routed.WithLabelValues("unchanged").Inc()
		default:
			s.m.routed.WithLabelValues("routed").Inc()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if s.unsaved == nil {
			s.unsaved = map[string]*Group{}
		}
		for _, g := range changed {
			s.unsaved[g.Key] = g
		}
		var tooLarge error
		for key, g := range s.unsaved {
			err := saveGroup(ctx, s.state, g, s.maxPayload)
			switch {
			case errors.Is(err, errGroupTooLarge):
				// It never will be saved: the alert goes to the DLQ (it stays in the
				// group in memory and is notified while routing runs).
				if slices.Contains(changed, g) {
					tooLarge = err
				}
			case err != nil:
				return nil, err
			}
			delete(s.unsaved, key)
		}
		if len(changed) > 0 {
			select {
			case s.wake <- struct{}{}:
			default:
			}
		}
		if tooLarge != nil {
			s.log.Error("alert group too large to save; the alert goes to the DLQ", "err", tooLarge)
			return []*nats.Msg{stage.DeadLetter(Name, msg, tooLarge.Error(), s.maxPayload)}, nil
		}
		return nil, nil
	}
}

func (s *stageRun) flushLoop(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	// Only the replica routing counts the alerts firing.
	defer s.m.firing.Set(0)
	var counted time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.wake:
		}
		if err := s.flush(ctx); err != nil && ctx.Err() == nil {
			s.log.Warn("flush", "err", err)
		}
		if time.Since(counted) >= time.Second {
			s.mu.Lock()
			s.m.firing.Set(float64(s.router.Firing()))
			s.mu.Unlock()
			counted = time.Now()
		}
	}
}

// flush queues the due notifications in NOTIFY, then saves the groups. A crash in
// between queues them again with the same ids, which NOTIFY's duplicate window and
// receivers (by webhook-id) drop.
func (s *stageRun) flush(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stale {
		return errStale
	}
	out, save, deleted := s.router.Flush(time.Now(), s.silences.List())
	for _, o := range out {
		body, err := Render(o.Receiver.Format, o.Notification)
		if err != nil {
			return err
		}
		if int64(len(body)) > s.maxPayload-headroom {
			// It never will be queued; its alerts are in the DLQ (route) and in
			// ClickHouse's alerts table.
			s.log.Error("notification too large to queue; not sent (narrow the route's group_by)", "receiver", o.Receiver.Name,
				"id", o.ID, "bytes", len(body), "max_payload", s.maxPayload)
			continue
		}
		msg := nats.NewMsg("notify." + o.Receiver.Name)
		msg.Header.Set(nats.MsgIdHdr, o.ID)
		msg.Header.Set(HeaderNotificationID, o.ID)
		msg.Data = body
		for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 5*time.Second) {
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := s.js.PublishMsg(pctx, msg)
			cancel()
			if err == nil {
				break
			}
			s.log.Warn("queue notification; retrying", "receiver", o.Receiver.Name, "err", err)
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				s.stale = true
				return ctx.Err()
			}
		}
		s.m.notified.WithLabelValues(o.Receiver.Name).Inc()
	}
	for _, g := range save {
		if err := saveGroup(ctx, s.state, g, s.maxPayload); errors.Is(err, errGroupTooLarge) {
			s.log.Error("alert group too large to save", "err", err)
		} else if err != nil {
			return err
		}
		delete(s.unsaved, g.Key)
	}
	for _, g := range deleted {
		if err := s.state.Delete(ctx, "group."+g.Key); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("notify: delete group: %w", err)
		}
		delete(s.unsaved, g.Key)
	}
	return nil
}

// errStale: the router's groups are ahead of what NOTIFY holds (stageRun.stale).
var errStale = errors.New("notify: routing is starting over from the bucket")

// headroom is what a message's headers may take of NATS's max_payload.
const headroom = 4096

// errGroupTooLarge: a group's encoding is more than a NATS message holds.
var errGroupTooLarge = errors.New("more than a NATS message holds (narrow the route's group_by)")

// saveGroup writes g to kv; errGroupTooLarge if it is over maxPayload bytes.
func saveGroup(ctx context.Context, kv jetstream.KeyValue, g *Group, maxPayload int64) error {
	b, err := json.Marshal(g)
	if err != nil {
		return fmt.Errorf("notify: encode group: %w", err)
	}
	if int64(len(b)) > maxPayload-headroom {
		return fmt.Errorf("notify: alert group %s is %d bytes, %w", g.Key, len(b), errGroupTooLarge)
	}
	if _, err := kv.Put(ctx, "group."+g.Key, b); err != nil {
		return fmt.Errorf("notify: save group: %w", err)
	}
	return nil
}

func loadGroups(ctx context.Context, kv jetstream.KeyValue) ([]*Group, error) {
	keys, err := kv.ListKeysFiltered(ctx, "group.*")
	if err != nil {
		return nil, fmt.Errorf("notify: list groups: %w", err)
	}
	var out []*Group
	for key := range keys.Keys() {
		e, err := kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("notify: group %s: %w", key, err)
		}
		var g Group
		if err := json.Unmarshal(e.Value(), &g); err != nil {
			return nil, fmt.Errorf("notify: group %s does not decode: %w", key, err)
		}
		out = append(out, &g)
	}
	return out, nil
}

// disabledSet is the receivers disabled by a 410, kept current by a watch.
type disabledSet struct {
	mu  sync.Mutex
	why map[string]string
}

func (d *disabledSet) get(name string) (string, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	why, ok := d.why[name]
	return why, ok
}

// watchDisabled keeps the returned set current with the bucket's disabled.* keys
// until ctx is done or stop is called; it returns once they are loaded.
func watchDisabled(ctx context.Context, kv jetstream.KeyValue, log *slog.Logger) (d *disabledSet, stop func(), err error) {
	d = &disabledSet{why: map[string]string{}}
	stop, err = kvfollow.Follow(ctx, kvfollow.Config{KV: kv, Keys: []string{"disabled.*"}, Log: log}, func(e jetstream.KeyValueEntry) {
		name := strings.TrimPrefix(e.Key(), "disabled.")
		d.mu.Lock()
		defer d.mu.Unlock()
		if e.Operation() == jetstream.KeyValuePut {
			d.why[name] = string(e.Value())
			log.Warn("receiver disabled", "receiver", name, "why", string(e.Value()))
		} else {
			delete(d.why, name)
			log.Info("receiver enabled", "receiver", name)
		}
	})
	if err != nil {
		return nil, nil, fmt.Errorf("notify: disabled receivers: %w", err)
	}
	return d, stop, nil
}

// DisableReceiver and EnableReceiver change whether a receiver is sent anything.
func DisableReceiver(ctx context.Context, kv jetstream.KeyValue, name, why string) error {
	_, err := kv.Put(ctx, "disabled."+name, []byte(why))
	return err
}

// EnableReceiver re-enables a receiver a 410 disabled.
func EnableReceiver(ctx context.Context, kv jetstream.KeyValue, name string) error {
	return kv.Delete(ctx, "disabled."+name)
}

// deliverer sends one receiver's notifications.
type deliverer struct {
	rc         *Receiver
	js         jetstream.JetStream
	state      jetstream.KeyValue
	disabled   *disabledSet
	log        *slog.Logger
	m          *metrics
	maxPayload int64
	mu         sync.Mutex
	// lastErr is the last error of each notification being retried, by sequence.
	lastErr map[uint64]string
	// failing is this deliverer's record of the receiver failing (nil: it is not).
	failing *Failing
}

// maxLastErrors bounds the last errors a deliverer remembers.
const maxLastErrors = 10_000

// DelivererConsumer is the durable consumer of a receiver's NOTIFY messages.
func DelivererConsumer(receiver string) string { return "deliver_" + receiver }

// runner is the deliverer's stage runner; watch holds its watchdog's settings.
func (d *deliverer) runner(ctx context.Context, nc *nats.Conn, reg prometheus.Registerer, watch stage.Config) (*stage.Runner, error) {
	name := DelivererConsumer(d.rc.Name)
	// Asked again while JetStream does not answer in time (a server just restarted).
	err := streams.Retry(ctx, func(ctx context.Context) error {
		_, err := d.js.CreateOrUpdateConsumer(ctx, streams.Notify, jetstream.ConsumerConfig{
			Durable: name, Description: "Delivers notifications to receiver " + d.rc.Name + ".",
			FilterSubject: "notify." + d.rc.Name, AckPolicy: jetstream.AckExplicitPolicy, AckWait: 30 * time.Second,
			// One notification in flight per receiver, across every replica.
			MaxDeliver: -1, MaxAckPending: 1, DeliverPolicy: jetstream.DeliverAllPolicy,
		})
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("notify: consumer %s: %w", name, err)
	}
	return stage.New(nc, stage.Config{Name: Name + "_" + d.rc.Name, Stream: streams.Notify, Consumer: name, MaxInFlight: 1, PullBatch: 1,
		Ready: watch.Ready, StallAfter: watch.StallAfter},
		func(msg jetstream.Msg) ([]*nats.Msg, error) { return d.handle(ctx, msg) }, d.log, reg)
}

func (d *deliverer) handle(ctx context.Context, msg jetstream.Msg) ([]*nats.Msg, error) {
	md, err := msg.Metadata()
	if err != nil {
		return nil, err
	}
	seq := md.Sequence.Stream
	dead := func(outcome, reason string) []*nats.Msg {
		d.m.sent.WithLabelValues(d.rc.Name, outcome).Inc()
		d.mu.Lock()
		delete(d.lastErr, seq)
		d.mu.Unlock()
		return []*nats.Msg{stage.DeadLetter(Name, msg, reason, d.maxPayload)}
	}
	if why, off := d.disabled.get(d.rc.Name); off {
		return dead("disabled", fmt.Sprintf("receiver %s is disabled (%s); enable it with `sluice receiver enable %s`", d.rc.Name, why, d.rc.Name)), nil
	}
	if age := time.Since(md.Timestamp); age > d.rc.MaxAge {
		d.mu.Lock()
		last := d.lastErr[seq]
		d.mu.Unlock()
		if last == "" {
			last = "none recorded by this process"
		}
		return dead("expired", fmt.Sprintf("receiver %s: not delivered within max_age %s; last error: %s", d.rc.Name, d.rc.MaxAge, last)), nil
	}
	id := msg.Headers().Get(HeaderNotificationID)
	err = d.rc.Deliver(ctx, id, msg.Data())
	var perm *PermanentError
	switch {
	case err == nil:
		d.m.sent.WithLabelValues(d.rc.Name, "delivered").Inc()
		d.mu.Lock()
		delete(d.lastErr, seq)
		d.mu.Unlock()
		d.delivered(ctx)
		return nil, nil
	case errors.Is(err, ErrGone):
		why := fmt.Sprintf("410 Gone at %s", time.Now().UTC().Format(time.RFC3339))
		if derr := DisableReceiver(ctx, d.state, d.rc.Name, why); derr != nil {
			return nil, fmt.Errorf("receiver %s answered 410; disabling it: %w", d.rc.Name, derr)
		}
		return dead("gone", err.Error()), nil
	case errors.As(err, &perm):
		return dead("rejected", err.Error()), nil
	default:
		d.m.sent.WithLabelValues(d.rc.Name, "retry").Inc()
		d.mu.Lock()
		if len(d.lastErr) >= maxLastErrors {
			// Entries of notifications another replica finished are never removed
			// here: start over rather than grow (only the detail of a DLQ reason is lost).
			clear(d.lastErr)
		}
		d.lastErr[seq] = err.Error()
		d.mu.Unlock()
		d.failed(ctx, err)
		return nil, err
	}
}
