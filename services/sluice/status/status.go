// Package status collects `sluice status`: how far each partition and consumer is
// behind, when ClickHouse last took rows, what was dead-lettered, which alerts fire
// and how each receiver fares, from NATS and ClickHouse alone, and judges it
// healthy or not.
package status

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/services/sink"
	"github.com/sluicehq/sluice/streams"
)

// Options are the limits a report is judged by.
type Options struct {
	// MaxLag: input older than this not yet processed makes a partition or
	// consumer unhealthy; a receiver failing for longer is too.
	MaxLag time.Duration
	// MaxStateAge: a partition whose state was saved longer ago is unhealthy.
	MaxStateAge time.Duration
	// StallAfter: a consumer holding unacknowledged messages that has neither
	// acknowledged nor delivered any for this long is stalled (0: not judged).
	StallAfter time.Duration
	// Previous, if set, is the report before, for consumers' input rates.
	Previous *Report
}

// Report is one look at the platform.
type Report struct {
	At       time.Time `json:"at"`
	Healthy  bool      `json:"healthy"`
	Problems []string  `json:"problems"`

	Streams    []Stream    `json:"streams"`
	Partitions []Partition `json:"partitions"`
	Consumers  []Consumer  `json:"consumers"`
	ClickHouse ClickHouse  `json:"clickhouse"`
	// DeadLetters are the last hour's, by stage and reason, most first (at most
	// ten); DeadLettersHour counts them all.
	DeadLetters     []DeadLetters `json:"dead_letters"`
	DeadLettersHour uint64        `json:"dead_letters_last_hour"`
	Firing          []Firing      `json:"alerts_firing"`
	Receivers       []Receiver    `json:"receivers"`
}

// Stream is one of sluice's streams.
type Stream struct {
	Name     string `json:"name"`
	Messages uint64 `json:"messages"`
	LastSeq  uint64 `json:"last_seq"`
	Replicas int    `json:"replicas"`
}

// Partition is one partition of the pipeline stage.
type Partition struct {
	Partition int    `json:"partition"`
	Worker    string `json:"worker"`
	// Seq is the last input decided and stored, as of the last save; Pending is the
	// input after it, LagSeconds how long ago the oldest of that was stored in NATS.
	Seq        uint64  `json:"seq"`
	Pending    uint64  `json:"pending"`
	LagSeconds float64 `json:"lag_seconds"`
	Rate       float64 `json:"rate"`
	// StoredAt is when its output was last known stored in ClickHouse; SavedAt
	// when its state was saved (both zero before its first save).
	StoredAt time.Time `json:"stored_at"`
	SavedAt  time.Time `json:"saved_at"`
	// Stalled is the watchdog's report while the partition holds input and stores
	// none of it (PIPELINE_STALL_AFTER); empty otherwise.
	Stalled      string    `json:"stalled,omitempty"`
	StalledSince time.Time `json:"stalled_since,omitzero"`
}

// Consumer is a durable consumer: a split stage, the sink, notify, a receiver's
// deliverer.
type Consumer struct {
	Stream      string  `json:"stream"`
	Name        string  `json:"name"`
	Pending     uint64  `json:"pending"`
	AckPending  int     `json:"ack_pending"`
	Redelivered int     `json:"redelivered"`
	LagSeconds  float64 `json:"lag_seconds"`
	// Rate is messages delivered a second since the previous report (watch;
	// nil without one).
	Rate       *float64  `json:"rate,omitempty"`
	Delivered  uint64    `json:"delivered_seq"`
	LastActive time.Time `json:"last_active"`
	// Stalled: it holds unacknowledged messages and has neither acknowledged nor
	// delivered any for Options.StallAfter (a stuck stage or consumer).
	Stalled bool `json:"stalled,omitempty"`
	// LastAck is when its acknowledged floor last moved (zero: never).
	LastAck time.Time `json:"last_ack,omitzero"`
	// Unused: nothing ever read from it, and nothing is waiting to (a consumer
	// of the other deployment shape: the split stages' under the fused pipeline).
	Unused bool `json:"unused"`
}

// ClickHouse is whether ClickHouse answers, and when each table last took rows.
type ClickHouse struct {
	Addr       string               `json:"addr"`
	Reachable  bool                 `json:"reachable"`
	Error      string               `json:"error,omitempty"`
	LastInsert map[string]time.Time `json:"last_insert,omitempty"`
	// Held are the months (YYYYMM) `sluice replay` holds: the pipeline's inserts of
	// their rows wait meanwhile (not a problem: it ends by itself).
	Held []uint32 `json:"held_months,omitempty"`
	// MostParts is the partition of a table of the database with the most active
	// parts: at PartsProblem or more, merges are behind or stopped.
	MostParts *Parts `json:"most_parts,omitempty"`
	// PartsError is why the parts were not read (and not judged).
	PartsError string `json:"parts_error,omitempty"`
}

// Parts counts the active parts of one partition of a table.
type Parts struct {
	Table     string `json:"table"`
	Partition string `json:"partition"`
	Active    uint64 `json:"active"`
}

// PartsProblem is as many active parts in one partition as make a problem: two
// thirds of where ClickHouse starts delaying inserts (parts_to_delay_insert, 150 by
// default; it refuses them at 300). The pipeline's tables hold a few tens at most
// while merges keep up.
const PartsProblem = 100

// DeadLetters counts one stage's dead letters of one reason.
type DeadLetters struct {
	Stage  string `json:"stage"`
	Reason string `json:"reason"`
	Count  uint64 `json:"count"`
}

// Firing counts a rule's firing alerts.
type Firing struct {
	Rule  string `json:"rule"`
	Count uint64 `json:"count"`
}

// Receiver is a webhook receiver: delivering, backing off (with its last error),
// disabled (after 410), or idle.
type Receiver struct {
	Name      string    `json:"name"`
	State     string    `json:"state"`
	Pending   uint64    `json:"pending"`
	LastError string    `json:"last_error,omitempty"`
	Since     time.Time `json:"since,omitempty"`
	Disabled  string    `json:"disabled,omitempty"`
}

// Receiver states.
const (
	Delivering = "delivering"
	BackingOff = "backing off"
	Disabled   = "disabled"
	Idle       = "idle"
)

// Collect looks at NATS through js and at ClickHouse through ch (nil when it could
// not be opened; chErr then says why), and judges what it sees by opts. An error
// is NATS not answering; anything else is in the report.
func Collect(ctx context.Context, js jetstream.JetStream, ch driver.Conn, chAddr string, chErr error, opts Options) (*Report, error) {
	r := &Report{At: time.Now().UTC(), ClickHouse: ClickHouse{Addr: chAddr}}
	topo, err := streams.Load()
	if err != nil {
		return nil, err
	}
	handles := map[string]jetstream.Stream{}
	for _, s := range topo.Streams {
		st, err := js.Stream(ctx, s.Config.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			r.problem("stream %s does not exist (sluice streams apply creates it)", s.Config.Name)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("status: stream %s: %w", s.Config.Name, err)
		}
		handles[s.Config.Name] = st
		info := st.CachedInfo()
		r.Streams = append(r.Streams, Stream{Name: info.Config.Name, Messages: info.State.Msgs, LastSeq: info.State.LastSeq, Replicas: info.Config.Replicas})
	}
	if err := r.partitions(ctx, js, handles, opts); err != nil {
		return nil, err
	}
	if err := r.consumers(ctx, handles, opts); err != nil {
		return nil, err
	}
	if err := r.receivers(ctx, js, opts); err != nil {
		return nil, err
	}
	r.stalls(opts)
	r.clickhouse(ctx, ch, chErr)
	r.Healthy = len(r.Problems) == 0
	return r, nil
}

func (r *Report) problem(format string, args ...any) {
	r.Problems = append(r.Problems, fmt.Sprintf(format, args...))
}

// partitions reads the pipeline's claims and progress; none when the pipeline
// never ran (its bucket is missing: the split stages run instead).
func (r *Report) partitions(ctx context.Context, js jetstream.JetStream, handles map[string]jetstream.Stream, opts Options) error {
	kv, err := js.KeyValue(ctx, pipeline.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("status: bucket %s: %w", pipeline.Bucket, err)
	}
	n, err := partition.Count(ctx, kv)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	progress, err := pipeline.ReadProgress(ctx, kv)
	if err != nil {
		return err
	}
	stalls, err := pipeline.ReadStalls(ctx, kv)
	if err != nil {
		return err
	}
	for id := range n {
		p := Partition{Partition: id}
		own, err := partition.Owner(ctx, kv, id)
		if err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return err
		}
		p.Worker = own.Worker
		if p.Worker == "" {
			r.problem("partition %d: no worker holds it", id)
		}
		if s, ok := stalls[id]; ok {
			p.Stalled, p.StalledSince = s.Reason, s.Since
			r.problem("partition %d: stalled since %s (worker %s): %s", id, s.Since.Format(time.RFC3339), s.Worker, s.Reason)
		}
		pr, ok := progress[id]
		if !ok {
			r.problem("partition %d: no state saved yet", id)
			r.Partitions = append(r.Partitions, p)
			continue
		}
		p.Seq, p.Rate, p.StoredAt, p.SavedAt = pr.Seq, pr.Rate, pr.StoredAt, pr.SavedAt
		if st := handles[pr.Stream]; st != nil {
			if p.Pending, p.LagSeconds, err = behind(ctx, st, pr.Filter, pr.Seq, r.At); err != nil {
				return err
			}
		}
		if lag := seconds(p.LagSeconds); lag > opts.MaxLag {
			r.problem("partition %d: %d messages behind, the oldest stored %s ago (more than %s)", id, p.Pending, lag.Round(time.Second), opts.MaxLag)
		}
		if age := r.At.Sub(p.SavedAt); age > opts.MaxStateAge {
			r.problem("partition %d: state saved %s ago (more than %s)", id, age.Round(time.Second), opts.MaxStateAge)
		}
		r.Partitions = append(r.Partitions, p)
	}
	return nil
}

// behind counts the messages of stream (those matching filter; all when empty)
// after seq, and how long ago the oldest of them was stored.
func behind(ctx context.Context, st jetstream.Stream, filter string, seq uint64, now time.Time) (uint64, float64, error) {
	info := st.CachedInfo()
	if seq >= info.State.LastSeq {
		return 0, 0, nil
	}
	subject := filter
	if subject == "" {
		subject = ">"
	}
	var pending uint64
	if filter == "" {
		pending = info.State.LastSeq - max(seq, info.State.FirstSeq-1)
	} else {
		// A short-lived consumer from seq on counts them.
		c, err := st.CreateConsumer(ctx, jetstream.ConsumerConfig{FilterSubject: filter, DeliverPolicy: jetstream.DeliverByStartSequencePolicy,
			OptStartSeq: seq + 1, AckPolicy: jetstream.AckNonePolicy, InactiveThreshold: 10 * time.Second, MemoryStorage: true})
		if err != nil {
			return 0, 0, fmt.Errorf("status: count %s after %d: %w", filter, seq, err)
		}
		pending = c.CachedInfo().NumPending
		_ = st.DeleteConsumer(ctx, c.CachedInfo().Name)
	}
	if pending == 0 {
		return 0, 0, nil
	}
	msg, err := st.GetMsg(ctx, seq+1, jetstream.WithGetMsgSubject(subject))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return pending, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("status: the message after %d: %w", seq, err)
	}
	return pending, max(now.Sub(msg.Time).Seconds(), 0), nil
}

// consumers reads every durable consumer of sluice's streams.
func (r *Report) consumers(ctx context.Context, handles map[string]jetstream.Stream, opts Options) error {
	prev := map[string]Consumer{}
	if opts.Previous != nil {
		for _, c := range opts.Previous.Consumers {
			prev[c.Stream+"/"+c.Name] = c
		}
	}
	for _, name := range slices.Sorted(maps.Keys(handles)) {
		st := handles[name]
		list := st.ListConsumers(ctx)
		var infos []*jetstream.ConsumerInfo
		for info := range list.Info() {
			if info.Config.Durable != "" {
				infos = append(infos, info)
			}
		}
		if err := list.Err(); err != nil {
			return fmt.Errorf("status: consumers of %s: %w", name, err)
		}
		slices.SortFunc(infos, func(a, b *jetstream.ConsumerInfo) int { return strings.Compare(a.Name, b.Name) })
		for _, info := range infos {
			c := Consumer{Stream: name, Name: info.Name, Pending: info.NumPending, AckPending: info.NumAckPending,
				Redelivered: info.NumRedelivered, Delivered: info.Delivered.Stream,
				Unused: info.Delivered.Stream == 0 && info.NumWaiting == 0}
			if info.Delivered.Last != nil {
				c.LastActive = *info.Delivered.Last
			}
			if p, ok := prev[name+"/"+info.Name]; ok && r.At.After(opts.Previous.At) && c.Delivered >= p.Delivered {
				rate := float64(c.Delivered-p.Delivered) / r.At.Sub(opts.Previous.At).Seconds()
				c.Rate = &rate
			}
			if !c.Unused && c.Pending+uint64(c.AckPending) > 0 {
				subject := info.Config.FilterSubject
				if subject == "" {
					subject = ">"
				}
				msg, err := st.GetMsg(ctx, info.AckFloor.Stream+1, jetstream.WithGetMsgSubject(subject))
				if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
					return fmt.Errorf("status: consumer %s of %s: %w", info.Name, name, err)
				}
				if err == nil {
					c.LagSeconds = max(r.At.Sub(msg.Time).Seconds(), 0)
				}
				if lag := seconds(c.LagSeconds); lag > opts.MaxLag {
					r.problem("consumer %s of %s: %d messages behind, the oldest stored %s ago (more than %s)", info.Name, name, c.Pending+uint64(c.AckPending), lag.Round(time.Second), opts.MaxLag)
				}
			}
			if info.AckFloor.Last != nil {
				c.LastAck = *info.AckFloor.Last
			}
			r.Consumers = append(r.Consumers, c)
		}
	}
	return nil
}

// stalls marks each consumer that holds unacknowledged messages and has neither
// acknowledged nor delivered any for opts.StallAfter (redeliveries of naked
// messages are work going on). A receiver's deliverer is left out while the
// receiver backs off or is disabled: its naks wait out the receiver's delays
// (Retry-After up to an hour), and the receiver's own state says so.
func (r *Report) stalls(opts Options) {
	if opts.StallAfter <= 0 {
		return
	}
	waiting := map[string]bool{}
	for _, rc := range r.Receivers {
		if rc.State == BackingOff || rc.State == Disabled {
			waiting[notify.DelivererConsumer(rc.Name)] = true
		}
	}
	for i := range r.Consumers {
		c := &r.Consumers[i]
		if c.AckPending == 0 || (c.Stream == streams.Notify && waiting[c.Name]) {
			continue
		}
		last := c.LastActive
		if c.LastAck.After(last) {
			last = c.LastAck
		}
		if idle := r.At.Sub(last); idle > opts.StallAfter {
			c.Stalled = true
			r.problem("consumer %s of %s: stalled: holds %d unacknowledged messages and acknowledged or delivered none for %s (more than %s)", c.Name, c.Stream, c.AckPending, idle.Round(time.Second), opts.StallAfter)
		}
	}
}

// receivers reads each receiver's deliverer (NOTIFY's deliver_<name> consumers,
// already among r.Consumers) and health; none when notify never ran.
func (r *Report) receivers(ctx context.Context, js jetstream.JetStream, opts Options) error {
	health := map[string]notify.ReceiverHealth{}
	kv, err := js.KeyValue(ctx, notify.StateBucket)
	if err != nil && !errors.Is(err, jetstream.ErrBucketNotFound) {
		return fmt.Errorf("status: bucket %s: %w", notify.StateBucket, err)
	}
	if err == nil {
		if health, err = notify.ReadReceivers(ctx, kv); err != nil {
			return err
		}
	}
	byName := map[string]*Receiver{}
	get := func(name string) *Receiver {
		if byName[name] == nil {
			byName[name] = &Receiver{Name: name, State: Idle}
		}
		return byName[name]
	}
	for _, c := range r.Consumers {
		if name, ok := strings.CutPrefix(c.Name, notify.DelivererConsumer("")); ok && c.Stream == streams.Notify {
			rc := get(name)
			rc.Pending = c.Pending + uint64(c.AckPending)
			if rc.Pending > 0 {
				rc.State = Delivering
			}
		}
	}
	for name, h := range health {
		rc := get(name)
		switch {
		case h.Disabled != "":
			rc.State, rc.Disabled = Disabled, h.Disabled
			r.problem("receiver %s is disabled (%s): `sluice receiver enable %s`", name, h.Disabled, name)
		case h.Failing != nil:
			rc.State = BackingOff
		}
		if h.Failing != nil {
			rc.LastError, rc.Since = h.Failing.Error, h.Failing.Since
			if d := r.At.Sub(h.Failing.Since); rc.State == BackingOff && d > opts.MaxLag {
				r.problem("receiver %s: failing for %s (%d attempts): %s", name, d.Round(time.Second), h.Failing.Attempts, h.Failing.Error)
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(byName)) {
		r.Receivers = append(r.Receivers, *byName[name])
	}
	return nil
}

// The queries status runs, on ClickHouse 18.16 and current releases alike.
const (
	// mostPartsQuery is the partition with the most active parts of the database's
	// tables.
	mostPartsQuery = "SELECT table, partition, count() AS n FROM system.parts WHERE database = currentDatabase() AND active GROUP BY table, partition ORDER BY n DESC, table, partition LIMIT 1"
	// lastInsertQuery, then a table's name.
	lastInsertQuery  = "SELECT count(), max(inserted_at) FROM "
	deadLettersQuery = `SELECT stage, reason, count() AS n FROM dead_letters WHERE received_at >= now() - 3600
GROUP BY stage, reason ORDER BY n DESC, stage, reason`
	// An alert fires while its fingerprint's last row says so.
	firingQuery = `SELECT rule, count() AS n FROM (
    SELECT fingerprint, any(rule) AS rule, argMax(status, stream_seq) AS last FROM alerts GROUP BY fingerprint
) WHERE last = 'firing' GROUP BY rule ORDER BY n DESC, rule`
)

// clickhouse reads the tables' last inserts, the last hour's dead letters and the
// alerts firing.
func (r *Report) clickhouse(ctx context.Context, ch driver.Conn, chErr error) {
	// A read that fails part way leaves no part of its counts: they are unknown.
	fail := func(err error) {
		r.ClickHouse.Reachable, r.ClickHouse.Error = false, err.Error()
		r.DeadLettersHour, r.DeadLetters, r.Firing = 0, nil, nil
		r.problem("ClickHouse at %s: %v", r.ClickHouse.Addr, err)
	}
	if ch == nil {
		fail(chErr)
		return
	}
	if err := ch.Ping(ctx); err != nil {
		fail(err)
		return
	}
	r.ClickHouse.Reachable = true
	r.ClickHouse.LastInsert = map[string]time.Time{}
	for _, table := range []string{"events", "dead_letters", "alerts"} {
		var rows uint64
		var last time.Time
		if err := ch.QueryRow(ctx, lastInsertQuery+table).Scan(&rows, &last); err != nil {
			fail(fmt.Errorf("table %s: %w", table, err))
			return
		}
		if rows > 0 {
			r.ClickHouse.LastInsert[table] = last.UTC()
		}
	}
	// Before migration 0004 there are no holds (and no table of them).
	held, err := sink.HeldMonths(ctx, ch)
	if err != nil && !isUnknownTable(err) {
		fail(err)
		return
	}
	r.ClickHouse.Held = held
	// The parts, one more sign of trouble: not read (a user without access to
	// system.parts), they are not judged, and the report says why.
	var most Parts
	switch err := ch.QueryRow(ctx, mostPartsQuery).Scan(&most.Table, &most.Partition, &most.Active); {
	case errors.Is(err, sql.ErrNoRows): // no parts, nothing to judge
	case err != nil:
		r.ClickHouse.PartsError = err.Error()
	default:
		r.ClickHouse.MostParts = &most
		if most.Active >= PartsProblem {
			r.problem("ClickHouse at %s: table %s, partition %s has %d active parts (inserts are delayed at 150 and refused at 300 by default): merges are behind, or stopped (a `sluice replay` killed during its swap leaves them stopped; the next run, `SYSTEM START MERGES %s` or a restart of the server starts them)",
				r.ClickHouse.Addr, most.Table, most.Partition, most.Active, most.Table)
		}
	}
	rows, err := ch.Query(ctx, deadLettersQuery)
	if err != nil {
		fail(fmt.Errorf("dead letters: %w", err))
		return
	}
	for rows.Next() {
		var d DeadLetters
		if err := rows.Scan(&d.Stage, &d.Reason, &d.Count); err != nil {
			rows.Close()
			fail(fmt.Errorf("dead letters: %w", err))
			return
		}
		r.DeadLettersHour += d.Count
		if len(r.DeadLetters) < 10 {
			r.DeadLetters = append(r.DeadLetters, d)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		fail(fmt.Errorf("dead letters: %w", err))
		return
	}
	rows, err = ch.Query(ctx, firingQuery)
	if err != nil {
		fail(fmt.Errorf("alerts: %w", err))
		return
	}
	defer rows.Close()
	for rows.Next() {
		var f Firing
		if err := rows.Scan(&f.Rule, &f.Count); err != nil {
			fail(fmt.Errorf("alerts: %w", err))
			return
		}
		r.Firing = append(r.Firing, f)
	}
	if err := rows.Err(); err != nil {
		fail(fmt.Errorf("alerts: %w", err))
	}
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// isUnknownTable is ClickHouse's UNKNOWN_TABLE (60).
func isUnknownTable(err error) bool {
	var ex *clickhouse.Exception
	return errors.As(err, &ex) && ex.Code == 60
}
