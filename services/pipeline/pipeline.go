// Package pipeline runs dedup, enrich, alert and the events insert as one stage in
// one process: it reads EVENTS once, in stream order, and writes each unique,
// enriched event to ClickHouse, alert changes to ALERTS and bad input to the DLQ.
// No event is republished between stages, which is what makes it fast (see
// docs/benchmarks.md); the split stages (dedup, enrich, alert, sink) remain for
// those who want each step as its own stream.
//
// Exactly-once without acks. The stage owns its position: an ordered consumer
// reads EVENTS from the sequence after its snapshot. The snapshot (object store
// sluice_pipeline) holds, at one EVENTS sequence S, the dedup keys and the alert
// state, and is written only once every row, dead letter and alert change from
// input up to S is stored. Dedup and alert decisions depend only on the input
// before them, in stream order, so a restart from S decides every later input as
// the run before did; the rows that run inserted after S are found by stream_seq
// and key and not inserted again, and its dead letters and alert changes are found
// by Nats-Msg-Id in DLQ and ALERTS. One replica at a time runs (a lease in KV
// sluice_pipeline); the others wait to take over. See docs/exactly-once.md.
package pipeline

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/semaphore"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/schemas/keyed"
	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/crash"
	"github.com/sluicehq/sluice/services/kit/jspub"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/kit/watchdog"
	"github.com/sluicehq/sluice/services/sink"
	"github.com/sluicehq/sluice/streams"
)

// Name is the stage's name in logs, metrics and dead letters.
const Name = "pipeline"

// Bucket is the object store (the snapshot) and the KV bucket (the lease).
const Bucket = "sluice_pipeline"

// Config configures the stage.
type Config struct {
	Window dedup.WindowConfig
	// Ingest says how payloads become events.
	Ingest events.Ingest
	// Typed are the typed tables filled with events (sink.LoadTypedTables).
	Typed []*sink.TypedTable
	// Enrich is the enrich section (Enrich.Stage is not used).
	Enrich enrich.Config
	// Alert is the alert section and the rules (Alert.Stream is not used).
	Alert alert.Config
	// MaxRows is the most input messages one batch (one insert) holds.
	MaxRows int
	// FlushInterval is the longest a batch waits to fill before it is inserted (it
	// goes on at once when nothing before it is in flight and no input waits).
	FlushInterval time.Duration
	// InsertTimeout bounds one insert.
	InsertTimeout time.Duration
	// SnapshotInterval is how often the state is saved.
	SnapshotInterval time.Duration
	// StallAfter: a partition holding input that stores none of it this long is
	// reported stalled (watchdog).
	StallAfter time.Duration
	// StallRestart: a stalled partition's run also ends and starts again from its
	// state (a new consumer and writer; an insert or publish in flight is
	// cancelled), as after any failure of the run.
	StallRestart bool
	// Partitions divides the input among workers (1: every worker reads EVENTS
	// whole, one at a time; more: a keying step copies EVENTS into PARTITIONS by
	// event key, and each partition has one owner). All workers must agree.
	Partitions int
	// Replica names this worker in the group; LeaseTTL is how long a partition's
	// claim lasts unrenewed (another worker takes it over that long after this one
	// dies).
	Replica  string
	LeaseTTL time.Duration
	// StartAt is where a pipeline without state starts reading EVENTS: "first" (the
	// default: all of it), "end" (only what is stored from now on), or a stream
	// sequence. A stage with state always goes on from it.
	StartAt string
	// Replicas is how many copies a NATS cluster keeps of the stage's buckets (0:
	// as they are, 1 when created).
	Replicas int
	// DataDir holds local state: the dedup keys on disk (dedup.store: disk), under
	// pipeline/keys unless dedup.disk.dir says where, and the alert groups on disk
	// (alert.store: disk), under pipeline/alert.
	DataDir string
	// Crash is fault injection for the crash tests; zero in production.
	Crash crash.Injection
}

// DefaultConfig gives batches of up to 20,000 events, flushed within 200 ms, and
// names the replica host:pid.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	return Config{Replica: fmt.Sprintf("%s-%d", strings.ReplaceAll(host, ".", "_"), os.Getpid()),
		Window: dedup.DefaultWindowConfig(), Enrich: enrich.DefaultConfig(), Alert: alert.DefaultConfig(),
		MaxRows: 20_000, FlushInterval: 200 * time.Millisecond, InsertTimeout: time.Minute,
		SnapshotInterval: 10 * time.Second, StallAfter: 2 * time.Minute, LeaseTTL: 8 * time.Second, Partitions: 1,
	}
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	ClickHouse driver.Conn
	// Shards are where each partition's rows go on a ClickHouse cluster
	// (chconn.OpenShards); nil: one server, ClickHouse.
	Shards     *chconn.Shards
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Ready      *telemetry.Readiness
}

// Run applies the migrations, then takes part in the group of workers, running the
// partitions it owns, until ctx is done. A stop asked for while it starts is no
// error.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	err := runWorker(ctx, cfg, deps)
	if ctx.Err() != nil && errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func runWorker(ctx context.Context, cfg Config, deps Deps) error {
	if cfg.MaxRows <= 0 || cfg.FlushInterval <= 0 || cfg.InsertTimeout <= 0 || cfg.SnapshotInterval <= 0 || cfg.StallAfter <= 0 || cfg.LeaseTTL <= 0 {
		return errors.New("pipeline: batch size, flush interval, insert timeout, snapshot interval and lease TTL must be positive")
	}
	if cfg.Partitions < 1 || cfg.Partitions > maxPartitions {
		return fmt.Errorf("pipeline: partitions must be between 1 and %d, got %d", maxPartitions, cfg.Partitions)
	}
	if err := cfg.Window.Validate(); err != nil {
		return err
	}
	if cfg.Window.Disk.Dir == "" && cfg.DataDir != "" {
		cfg.Window.Disk.Dir = filepath.Join(cfg.DataDir, "pipeline", "keys")
	}
	if cfg.Window.Store == dedup.StoreDisk && cfg.Window.Disk.Dir == "" {
		return errNoKeysDir
	}
	if cfg.Alert.GroupsDir == "" && cfg.DataDir != "" {
		cfg.Alert.GroupsDir = filepath.Join(cfg.DataDir, "pipeline", "alert")
	}
	if _, err := startSeq(cfg.StartAt, 0); err != nil {
		return err
	}
	shards, target, err := sink.Prepare(ctx, deps.ClickHouse, deps.Shards, cfg.Typed, deps.Logger)
	if err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	if err := sink.CheckColumns(ctx, deps.ClickHouse, sink.EventsTable()); err != nil {
		return err
	}
	js, err := jetstream.New(deps.NATS, jetstream.WithPublishAsyncMaxPending(4096), jetstream.WithPublishAsyncTimeout(stage.DefaultPublishTimeout))
	if err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	store, err := streams.ObjectStore(ctx, js, jetstream.ObjectStoreConfig{
		Bucket: Bucket, Description: "The pipeline stage's snapshot: dedup keys, alert state, input position.", Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("pipeline: state bucket %s: %w", Bucket, err)
	}
	kv, err := streams.KeyValue(ctx, js, jetstream.KeyValueConfig{
		Bucket: Bucket, Description: "The pipeline workers: heartbeats, the partition count, each partition's claim (owner and state) and progress.", Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("pipeline: lease bucket %s: %w", Bucket, err)
	}
	log := deps.Logger.With("stage", Name)
	live, err := enrich.Start(ctx, cfg.Enrich, js, log, deps.Registerer)
	if err != nil {
		return err
	}
	defer live.Close()
	p := &pipeline{cfg: cfg, js: js, ch: deps.ClickHouse, shards: shards, events: target.LocalName("events"), store: store, kv: kv, live: live, log: log,
		m: newMetrics(deps.Registerer), maxPayload: deps.NATS.MaxPayload(), ready: deps.Ready}
	p.inserts = sink.NewCombiner(cfg.MaxRows, p.m.combined.Inc)
	p.inflightMax = int64(inflightBatches * cfg.MaxRows)
	p.inflight = semaphore.NewWeighted(p.inflightMax)
	for _, t := range cfg.Typed {
		p.typed = append(p.typed, target.LocalName(t.Name))
	}
	keyer, err := p.newKeyer()
	if err != nil {
		return err
	}
	g := &partition.Group{KV: kv, Partitions: cfg.Partitions, Worker: cfg.Replica, TTL: cfg.LeaseTTL, Log: log}
	var wg sync.WaitGroup
	defer wg.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if keyer != nil {
		wg.Go(func() { keyer.run(ctx) })
	}
	if cfg.Partitions == 1 {
		return g.Run(ctx, p.lead)
	}
	// A rule's group (per user, per device) is not aligned with the partitions: each
	// partition hands the events its rules' filters match to RULES, and one alert
	// runner, claimed like a partition of a group of one, evaluates them all.
	rkv, err := streams.KeyValue(ctx, js, jetstream.KeyValueConfig{
		Bucket: RulesBucket, Description: "The pipeline workers' alert runner: heartbeats and its claim (owner and state).", Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("pipeline: rules bucket %s: %w", RulesBucket, err)
	}
	rules := &partition.Group{KV: rkv, Partitions: 1, Worker: cfg.Replica, TTL: cfg.LeaseTTL, Log: log.With("group", "rules")}
	errs := make(chan error, 1)
	wg.Go(func() {
		err := rules.Run(ctx, func(ctx context.Context, claim *partition.Claim) { p.runRules(ctx, claim, deps) })
		if ctx.Err() == nil {
			errs <- err
			cancel()
		}
	})
	err = g.Run(ctx, p.lead)
	select {
	case rerr := <-errs:
		return errors.Join(err, rerr)
	default:
		return err
	}
}

// RulesBucket is the KV bucket of the partitioned pipeline's alert runner claim.
const RulesBucket = "sluice_rules"

// runRules runs the alert runner on RULES while this worker holds its claim,
// starting again after a failure, its state saved in the pipeline's object store
// (objects rules.0.<gen>.<n>) and pointed at by the claim.
func (p *pipeline) runRules(ctx context.Context, claim *partition.Claim, deps Deps) {
	const check = "alert runner"
	defer p.ready.Set(check, nil)
	cfg := p.cfg.Alert
	cfg.Stream, cfg.Replicas, cfg.Partitions = streams.Rules, p.cfg.Replicas, p.cfg.Partitions
	if cfg.GroupsDir != "" {
		cfg.GroupsDir = filepath.Join(cfg.GroupsDir, "rules")
	}
	state := claimedState{partition.NewStates(p.store, claim, "rules", p.log), claim, p.store}
	for attempt := uint64(1); ctx.Err() == nil; attempt++ {
		err := alert.RunWith(ctx, cfg, alert.Deps{NATS: deps.NATS, Logger: p.log, Registerer: deps.Registerer,
			Ready: func() { p.ready.Set(check, nil) }}, state)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, partition.ErrLost) {
			p.log.Warn("the alert runner's claim is lost; stopping it", "err", err)
			return
		}
		delay := stage.Backoff(attempt)
		p.ready.Set(check, err)
		p.log.Error("the alert runner stopped; starting again from its state", "retry_in", delay, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
	}
}

// claimedState keeps the alert runner's state under its claim, its checkpoints'
// files as the claim's objects rules-groups.<partition>.*.
type claimedState struct {
	states *partition.States
	claim  *partition.Claim
	store  jetstream.ObjectStore
}

func (c claimedState) Files(cache string, log *slog.Logger) alert.SegmentFiles {
	return partition.NewFiles(c.store, c.claim, "rules-groups", func(string) bool { return true }, cache, log)
}

func (c claimedState) Load(ctx context.Context) ([]byte, error) { return c.states.Load(ctx, "") }

func (c claimedState) Save(ctx context.Context, b []byte) error {
	return c.states.Save(ctx, bytes.NewReader(b))
}

func (c claimedState) Valid() error { return c.claim.Valid() }

// maxPartitions bounds the partition count: each partition is a claim renewed
// every quarter TTL and a filtered consumer.
const maxPartitions = 1024

type pipeline struct {
	cfg Config
	js  jetstream.JetStream
	// ch is the server the worker started on; each partition's run writes to
	// its shard (shards.For) and the events table there (events: events, or
	// events_local on a cluster).
	ch     driver.Conn
	shards *chconn.Shards
	events string
	// typed is the table each typed table's rows are in on the shard (cfg.Typed's
	// order): the typed table, or its local table on a cluster.
	typed      []string
	store      jetstream.ObjectStore
	kv         jetstream.KeyValue
	live       *enrich.Live
	log        *slog.Logger
	m          *metrics
	maxPayload int64
	ready      *telemetry.Readiness
	// inserts joins the partitions' events inserts made at the same time.
	inserts *sink.Combiner
	// inflight bounds the events the worker's partitions hold read and not yet
	// stored, together (inflightMax): a worker's memory does not grow with the
	// partitions it owns.
	inflight    *semaphore.Weighted
	inflightMax int64
}

// savePace is how fast (bytes a second) a periodic save uploads each of its files
// at least; faster when that would take more than half the snapshot interval. At
// 8 MiB/s the dedup keys admitted in 10 s at full speed (about 14 MB) take under 2 s.
const savePace = 8 << 20

// The decide loop's steps: at each save tick it encodes the alert windows'
// changed groups (a capture at once held the loop up to 117 ms at half load) and
// sweeps the dedup keys for those whose window ended (at once: 30 ms at a million
// keys on the benchmark's busy machine), a little at a time between its other work
// (docs/benchmarks.md). A step takes alert.CaptureStep groups, then sweepStep slots
// of the keys, again and again until alert.StepTime has passed.
const sweepStep = 16 << 10

// inflightBatches is how many full batches (MaxRows events) a worker holds read
// and not yet stored, across its partitions: one inserting while the next is read,
// prepared and decided. Most of a worker's memory under a backlog is these events
// (four batches held about 0.8 GiB at the defaults, two under 0.5 GiB, for the
// same throughput: docs/benchmarks.md).
const inflightBatches = 2

// startSeq is the first EVENTS sequence a stage without state reads, for StartAt
// and the stream's last sequence.
func startSeq(at string, last uint64) (uint64, error) {
	switch at {
	case "", "first":
		return 1, nil
	case "end":
		return last + 1, nil
	}
	seq, err := strconv.ParseUint(at, 10, 64)
	if err != nil || seq == 0 {
		return 0, fmt.Errorf("pipeline: start at %q: want first, end or a stream sequence (1 or more)", at)
	}
	return seq, nil
}

// lead runs one partition while this worker owns it, starting again after a
// failure.
func (p *pipeline) lead(ctx context.Context, claim *partition.Claim) {
	in := p.input(claim.Partition)
	defer p.ready.Set(in.name, nil) // a partition handed over is not this worker's to report
	defer p.m.forget(in.label)      // nor its gauges
	// The claim's states, kept across the runs of this ownership.
	states := partition.NewStates(p.store, claim, "state", p.log)
	for attempt := uint64(1); ctx.Err() == nil; attempt++ {
		r := &run{pipeline: p, ch: p.shards.For(claim.Partition), in: in, claim: claim, states: states, spare: newSpares(p.cfg.MaxRows / 2 * int(unsafe.Sizeof(prep{}))), stalled: make(chan error, 1),
			released: make(chan struct{}, 1)}
		err := r.run(ctx)
		if r.keys != nil {
			if cerr := r.keys.Close(); cerr != nil {
				p.log.Warn("close the dedup keys", "partition", in.id, "err", cerr)
			}
		}
		if r.engine != nil {
			if cerr := r.engine.Close(); cerr != nil {
				p.log.Warn("close the alert groups on disk", "partition", in.id, "err", cerr)
			}
		}
		if r.alertCP != nil {
			_ = r.alertCP.Close()
		}
		if r.alertTemp != "" {
			_ = os.RemoveAll(r.alertTemp)
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, partition.ErrLost) {
			p.log.Warn("the partition's claim is lost; stopping its run", "partition", in.id, "err", err)
			return
		}
		delay := stage.Backoff(attempt)
		p.ready.Set(in.name, err)
		p.log.Error("the pipeline stopped; starting again from its snapshot", "partition", in.id, "retry_in", delay, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
		}
	}
}

// snapshot is the header of the state object; the dedup keys follow it.
type snapshot struct {
	// StreamCreated tells a snapshot of a deleted and recreated EVENTS stream.
	StreamCreated time.Time `json:"stream_created"`
	// Seq is the last EVENTS sequence the state covers.
	Seq uint64 `json:"seq"`
	// Clock is the dedup store's time at Seq (the latest receive time, Unix s).
	Clock uint32 `json:"clock"`
	// ReplayUntil: alerts caused by input up to this sequence are replays.
	ReplayUntil uint64    `json:"replay_until"`
	SavedAt     time.Time `json:"saved_at"`
	// AlertCheckpoint is the alert engine's state, in files (alert.Checkpoints;
	// with one partition: with more, the alert runner keeps the windows).
	// AlertBinary (alert.State.MarshalBinary) and Alert (its JSON form) are the
	// state as earlier releases wrote it, which a restore still reads.
	AlertCheckpoint []alert.Segment `json:"alert_checkpoint,omitempty"`
	AlertBinary     []byte          `json:"alert_binary,omitempty"`
	Alert           *alert.State    `json:"alert,omitempty"`
}

// input is where a partition's events come from.
type input struct {
	id     int
	label  string // id, for metrics
	name   string // in readiness
	stream string
	// filter selects the partition in stream; empty for all of it.
	filter string
	// keyed input was copied by the keying step: the subject is partitioned, and the
	// key and the time EVENTS stored the event are headers.
	keyed bool
}

// input is partition p's input: EVENTS itself when there is one partition.
func (p *pipeline) input(id int) input {
	in := input{id: id, label: strconv.Itoa(id), name: "partition " + strconv.Itoa(id), stream: streams.Events}
	if p.cfg.Partitions > 1 {
		in.stream, in.filter, in.keyed = streams.Partitions, partition.Filter(id), true
	}
	return in
}

// run is one ownership of a partition: restore, then read, decide and write until
// ctx ends.
type run struct {
	*pipeline
	// ch reaches the partition's shard (on one server, pipeline.ch).
	ch    driver.Conn
	in    input
	claim *partition.Claim
	// states are the claim's saved states, shared by every run of it.
	states  *partition.States
	created time.Time
	seq     uint64 // last EVENTS sequence decided
	clock   uint32
	replay  uint64
	keys    keyStore
	// prepDedup decodes and keys, without a store: the keys are checked in order.
	prepDedup *dedup.Handler
	// rulesRead is what the rules read of events' data (nil: there are no rules);
	// set before the engine gets the rules, read by the preparing goroutines.
	rulesRead atomic.Pointer[events.DataFields]
	engine    *alert.Engine
	// alertCP keeps the engine's checkpoints (nil with more than one partition).
	alertCP *alert.Checkpoints
	// alertTemp is the checkpoints' directory made for the run (none: "").
	alertTemp string
	// matcher, with more than one partition, picks the rule input handed to the
	// alert runner (RULES); the engine then has no rules.
	matcher *alert.Matcher
	// progress is the latest event time of the unique events decided (moved on by
	// idle time); progressSent is the last handed to the alert runner.
	progress, progressSent time.Time
	published              map[string]bool // DLQ, ALERTS and RULES ids stored since the snapshot
	// spare holds the memory of stored batches, for batches to come.
	spare *spares
	// stored is when every output of input up to seq was last known stored.
	stored time.Time
	// hwm is the highest stream_seq in events when the run began: rows up to it may
	// be there already. typedHWM is the same for each typed table (cfg.Typed).
	hwm      uint64
	typedHWM []uint64
	// fence drops this run's inserts in the server once a later owner fenced the
	// partition.
	fence *sink.Fence
	// typedOf is the index in cfg.Typed of each type's table.
	typedOf map[string]int
	// lastProgress is the progress reported at the last save.
	lastProgress *Progress
	// dog watches that input read is stored.
	dog watchdog.Dog
	// stalled carries the watchdog's report to the run when cfg.StallRestart.
	stalled chan error
	// keysErr, once set, ends the run: the dedup keys failed.
	keysErr error
	// held is what the run holds of the worker's events in flight.
	held atomic.Int64
	// released is signalled (never blocking) when the run gives events in flight
	// back: a batch was stored.
	released chan struct{}
}

// weightOf is what msg weighs in flight: its events, at most all there is.
func (r *run) weightOf(msg jetstream.Msg) int64 {
	return min(int64(r.eventsIn(msg)), r.inflightMax)
}

// hold counts n more of the worker's events in flight as the run's; they were
// acquired from r.inflight.
func (r *run) hold(n int64) {
	r.held.Add(n)
	r.m.inflight.Add(float64(n))
}

// release gives back n of the worker's events in flight.
func (r *run) release(n int64) {
	if n > 0 {
		r.held.Add(-n)
		r.m.inflight.Sub(float64(n))
		r.inflight.Release(n)
		select {
		case r.released <- struct{}{}:
		default:
		}
	}
}

func (r *run) restore(ctx context.Context) error {
	stream, err := r.js.Stream(ctx, r.in.stream)
	if err != nil {
		return fmt.Errorf("pipeline: stream %s: %w", r.in.stream, err)
	}
	info := stream.CachedInfo()
	r.created = info.Created
	snap, err := r.loadKeys(ctx)
	if err != nil {
		return err
	}
	if snap == nil {
		from, _ := startSeq(r.cfg.StartAt, info.State.LastSeq)
		snap = &snapshot{StreamCreated: r.created, Seq: from - 1, ReplayUntil: info.State.LastSeq}
		r.log.Info("no pipeline state; reading EVENTS from the start sequence, alerts from input already there are marked replay",
			"from_seq", from, "replay_until", snap.ReplayUntil)
		if r.keys, err = r.openKeys(ctx, nil, 0); err != nil {
			return err
		}
	}
	if snap.Seq+1 < info.State.FirstSeq {
		r.log.Warn("input after the state's position has aged out of its stream; dedup and windows miss it", "stream", r.in.stream, "partition", r.in.id, "state_seq", snap.Seq, "first_seq", info.State.FirstSeq)
	}
	r.seq, r.clock, r.replay = snap.Seq, snap.Clock, snap.ReplayUntil
	if r.cfg.Partitions > 1 {
		r.engine, r.matcher = alert.NewEngine(nil, nil), alert.NewMatcher(r.cfg.Alert.Rules)
		r.readRules(r.matcher.Rules())
	} else {
		if r.engine == nil {
			if err := r.openAlert(ctx, snap); err != nil {
				return err
			}
		}
		r.readRules(r.engine.Rules())
	}
	r.prepDedup, err = dedup.NewHandler(dedup.HandlerConfig{MaxPayload: r.maxPayload, Window: r.cfg.Window, Ingest: r.cfg.Ingest, NonStandard: r.m.nonStandard})
	if err != nil {
		return err
	}
	// Everything stored since shortly before the snapshot (everything, without
	// one) may come again from the replay of the input after it.
	since := time.Unix(0, 0)
	if !snap.SavedAt.IsZero() {
		since = snap.SavedAt.Add(-5 * time.Second)
	}
	r.published = map[string]bool{}
	outputs := []string{streams.Alerts, streams.DLQ}
	if r.matcher != nil {
		outputs = append(outputs, streams.Rules)
	}
	for _, s := range outputs {
		ids, err := jspub.PublishedSince(ctx, r.js, s, since)
		if err != nil {
			return fmt.Errorf("pipeline: %w", err)
		}
		for id := range ids {
			r.published[id] = true
		}
	}
	qctx, cancel := context.WithTimeout(ctx, r.cfg.InsertTimeout)
	defer cancel()
	// Fenced first: an earlier owner's insert that reaches the server from now on
	// stores nothing, and those that passed already are stored when NewFence
	// returns, so the high-water marks read next are final for every earlier owner.
	// The run's own generation: a run started again with the claim kept (a stall
	// restart) fences out the run before it too.
	gen, err := r.claim.NextGeneration(qctx)
	if err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	var running uint64
	var unreached int
	replicas := r.shards.Replicas(r.in.id)
	if r.fence, running, unreached, err = sink.NewFenceOn(qctx, r.ch, replicas, uint32(r.in.id), gen, r.cfg.Replica, r.cfg.LeaseTTL); err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	if running > 0 {
		r.log.Warn("an earlier owner or run of the partition is still sending inserts (a paused process, a cut network, a stalled run); they will store nothing",
			"partition", r.in.id, "inserts", running, "waited", r.cfg.LeaseTTL)
	}
	if unreached > 0 {
		r.log.Warn("replicas of the partition's shard did not answer the fence; they are left out", "partition", r.in.id, "replicas", unreached)
	}
	rd, err := sink.ReadReplica(qctx, r.ch, replicas, r.events)
	if err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	if err := rd.QueryRow(qctx, "SELECT max(stream_seq) FROM "+r.events).Scan(&r.hwm); err != nil {
		return fmt.Errorf("pipeline: high-water mark of %s: %w", r.events, err)
	}
	r.typedHWM, r.typedOf = make([]uint64, len(r.cfg.Typed)), map[string]int{}
	for i, t := range r.cfg.Typed {
		trd, err := sink.ReadReplica(qctx, r.ch, replicas, r.typed[i])
		if err != nil {
			return fmt.Errorf("pipeline: %w", err)
		}
		if err := trd.QueryRow(qctx, "SELECT max(stream_seq) FROM "+r.typed[i]).Scan(&r.typedHWM[i]); err != nil {
			return fmt.Errorf("pipeline: high-water mark of %s: %w", r.typed[i], err)
		}
		r.typedOf[t.Type] = i
	}
	r.log.Info("pipeline state restored", "partition", r.in.id, "stream", r.in.stream, "seq", r.seq, "keys", r.keys.Stats().Keys, "events_hwm", r.hwm, "published_since", len(r.published))
	// Written at once, so that a crash before the first periodic save does not lose
	// where replayed input ends (ReplayUntil) for the next run.
	r.stored = snap.SavedAt
	return r.write(ctx)
}

// legacyState is the one state object of releases before partitions; a single
// partition takes it over.
const legacyState = "state"

// load reads the snapshot the claim points at and the keys part that follows its
// header; nil when there is none, or it is of another stream.
func (r *run) load(ctx context.Context) (*snapshot, []byte, error) {
	legacy := ""
	if r.cfg.Partitions == 1 {
		legacy = legacyState
	}
	b, err := r.states.Load(ctx, legacy)
	if err != nil {
		return nil, nil, fmt.Errorf("pipeline: %w", err)
	}
	return r.decode(b)
}

// decode reads a state's header and the keys part that follows it; nil when b is,
// or the state is of another stream.
func (r *run) decode(b []byte) (*snapshot, []byte, error) {
	if b == nil {
		return nil, nil, nil
	}
	if len(b) < 4 || int(binary.BigEndian.Uint32(b)) > len(b)-4 {
		return nil, nil, fmt.Errorf("pipeline: the state in %s is truncated (delete it to start over)", Bucket)
	}
	n := binary.BigEndian.Uint32(b)
	var snap snapshot
	if err := json.Unmarshal(b[4:4+n], &snap); err != nil {
		return nil, nil, fmt.Errorf("pipeline: the state in %s does not decode (delete it to start over): %w", Bucket, err)
	}
	if !snap.StreamCreated.Equal(r.created) {
		r.log.Warn("the state is of an earlier EVENTS stream; starting over")
		return nil, nil, nil
	}
	return &snap, b[4+n:], nil
}

// loadKeys reads the partition's state and opens its dedup keys (r.keys); nil
// when there is no state (r.keys not opened then). With one partition it opens
// the alert engine too (r.engine). A state whose keys or alert windows cannot be
// restored because a checkpoint file it names is lost gives way to the newest
// older state that can be (States.Older): the input after it comes again, and
// what was stored of it is found, as after a state that cannot be read.
func (r *run) loadKeys(ctx context.Context) (*snapshot, error) {
	snap, savedKeys, err := r.load(ctx)
	for snap != nil {
		// Keys are dropped as of the snapshot's own time, not now: the input after
		// it is decided at its own (earlier) times, as it was before the restart.
		r.keys, err = r.openKeys(ctx, savedKeys, snap.Clock)
		if err == nil && r.cfg.Partitions == 1 {
			if err = r.openAlert(ctx, snap); err != nil {
				_ = r.keys.Close()
				r.keys = nil
			}
		}
		if !errors.Is(err, jetstream.ErrObjectNotFound) {
			break
		}
		older, b, oerr := r.states.Older(ctx)
		if oerr != nil || older == "" {
			return nil, fmt.Errorf("%w (a checkpoint file the partition's state names is lost from %s, and no older state restores: see docs/dedup.md, a lost checkpoint file)", errors.Join(err, oerr), Bucket)
		}
		r.log.Warn("a checkpoint file of the partition's state is lost; restoring the state before it", "partition", r.in.id, "err", err, "older", older)
		snap, savedKeys, err = r.decode(b)
	}
	return snap, err
}

// openAlert makes the alert engine (one partition) from the state snap.
func (r *run) openAlert(ctx context.Context, snap *snapshot) error {
	if r.alertCP == nil {
		var err error
		if r.alertCP, err = r.alertCheckpoints(); err != nil {
			return err
		}
	}
	var err error
	if r.engine, err = r.alertCP.Open(ctx, r.cfg.Alert.Settings, r.cfg.Alert.Rules, snap.AlertCheckpoint, snap.AlertBinary, snap.Alert, r.cfg.Alert.GroupsDir); err != nil {
		if errors.Is(err, alert.ErrCorruptState) {
			return fmt.Errorf("pipeline: the alert windows in %s: %w (delete the state to start over)", Bucket, err)
		}
		return fmt.Errorf("pipeline: %w", err)
	}
	return nil
}

// alertCheckpoints keeps the alert engine's checkpoints as the claim's objects
// alert.<partition>.*, working under the alert groups' directory (or a temporary
// one, removed at close).
func (r *run) alertCheckpoints() (*alert.Checkpoints, error) {
	dir := r.cfg.Alert.GroupsDir
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "sluice-alert-"); err != nil {
			return nil, fmt.Errorf("pipeline: %w", err)
		}
		r.alertTemp = dir
	}
	files := partition.NewFiles(r.store, r.claim, "alert", func(string) bool { return true }, filepath.Join(dir, "cache"), r.log)
	return alert.NewCheckpoints(files, filepath.Join(dir, "segments"), r.log), nil
}

// save writes the state as of r.seq. Every output of input up to r.seq must be
// stored already.
func (r *run) save(ctx context.Context) error {
	r.stored = time.Now().UTC()
	return r.write(ctx)
}

// write writes the state. Its SavedAt is when every output up to its position was
// last known stored (not when it is written): a restart looks for dead letters and
// alert changes published since then, and the state written at start must not move
// that on past what the run before it published.
func (r *run) write(ctx context.Context) error {
	st, err := r.capture(r.stored)
	if err != nil {
		return err
	}
	st.stored = r.stored
	return r.upload(ctx, st)
}

// captured is the partition's state at one position: its header, its alert
// windows and dedup keys captured (uploaded by the saver); it is uploaded once
// every output of input up to that position is stored.
type captured struct {
	head  snapshot
	alert *alert.Capture // nil: the alert runner keeps the windows
	keys  keysCapture
	seq   uint64
	// stored is when every output up to seq was known stored (for progress).
	stored time.Time
}

// capture encodes the state as of r.seq, with since as its SavedAt: a restore
// looks for dead letters and alert changes published since then (less a margin),
// so it must be no later than the first output of input after r.seq.
// The alert windows are captured at once (alert.Checkpoints.Capture).
func (r *run) capture(since time.Time) (*captured, error) {
	st := r.newCaptured(since)
	if r.alertCP != nil {
		var err error
		if st.alert, err = r.alertCP.Capture(r.engine); err != nil {
			return nil, fmt.Errorf("pipeline: %w", err)
		}
	}
	st.keys = r.keys.capture(r.clock)
	return st, nil
}

// newCaptured is the state's header as of r.seq, with since as its SavedAt.
func (r *run) newCaptured(since time.Time) *captured {
	return &captured{head: snapshot{StreamCreated: r.created, Seq: r.seq, Clock: r.clock, ReplayUntil: r.replay, SavedAt: since}, seq: r.seq}
}

// begin is capture in steps: the alert windows' part (p; nil: none) is ended by
// end, the decide loop going on meanwhile (alert.Checkpoints.Begin).
func (r *run) begin(since time.Time) (st *captured, p *alert.Pending, err error) {
	st = r.newCaptured(since)
	if r.alertCP != nil {
		if p, err = r.alertCP.Begin(r.engine); err != nil {
			return nil, nil, fmt.Errorf("pipeline: %w", err)
		}
	}
	st.keys = r.keys.capture(r.clock)
	return st, p, nil
}

// end ends the alert part p of st, begun by begin.
func (r *run) end(st *captured, p *alert.Pending) error {
	if p == nil {
		return nil
	}
	var err error
	if st.alert, err = p.End(); err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	return nil
}

// upload saves a captured state and points the claim at it. Every output up to
// its position must be stored. Uploads of one run are one at a time.
func (r *run) upload(ctx context.Context, st *captured) error {
	start := time.Now()
	if st.alert != nil {
		list, err := st.alert.Upload(ctx)
		if err != nil {
			return fmt.Errorf("pipeline: %w", err)
		}
		st.head.AlertCheckpoint = list
	}
	head, err := json.Marshal(st.head)
	if err != nil {
		return fmt.Errorf("pipeline: encode state: %w", err)
	}
	// The rows up to st.seq are stored only if no newer generation fenced them out
	// (another platform on this database): the position is not moved past them
	// then, and the run starts again from the last one saved.
	if err := r.fence.Check(ctx); err != nil {
		if lost := r.claim.Valid(); lost != nil {
			return lost // another worker took it over: the usual hand-over
		}
		return err
	}
	var data bytes.Buffer
	data.Write(binary.BigEndian.AppendUint32(nil, uint32(len(head))))
	data.Write(head)
	if err := st.keys.encode(ctx, &data); err != nil {
		return fmt.Errorf("pipeline: encode state: %w", err)
	}
	if err := r.states.Save(ctx, &data); err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	if st.alert != nil {
		st.alert.Saved(ctx)
	}
	st.keys.saved(ctx)
	r.reportProgress(ctx, st.seq, st.stored, time.Now().UTC())
	r.m.snapshot.Observe(time.Since(start).Seconds())
	r.m.snapshotSeq.WithLabelValues(r.in.label).Set(float64(st.seq))
	r.m.savedAt.WithLabelValues(r.in.label).SetToCurrentTime()
	keys := r.keys.Stats()
	r.m.keys.WithLabelValues(r.in.label).Set(float64(keys.Keys))
	r.m.keysBytes.WithLabelValues(r.in.label).Set(float64(keys.Bytes))
	return nil
}

// batch is one batch of input, prepared, and what it produced, written by the
// writer. Its memory is used again by a batch to come (run.recycle).
type batch struct {
	preps []prep      // the input, prepared; the rows point into it
	rows  []row       // in stream order
	out   []*nats.Msg // dead letters and alert changes
	// typed holds the rows of each typed table (by index in cfg.Typed), in stream order.
	typed [][]typedRow
	// done, if set, is closed once the batch and all before it are stored.
	done chan error
	// save, if set, is a state captured after the batch was decided: the writer
	// hands it to the saver once the batch and all before it are stored.
	save *captured
	// weight is what the batch holds of the worker's events in flight (inflight),
	// its parts' included.
	weight int64
	// more: the batch is a part of one, more of whose input is coming (collected.more).
	more bool
	// parts are the batch's later parts, decided into it: their memory (the
	// prepared input its rows point into) is the batch's until it is stored.
	parts []*batch
}

// inputs is how many input messages the batch holds, its parts' included.
func (b *batch) inputs() int {
	n := len(b.preps)
	for _, p := range b.parts {
		n += len(p.preps)
	}
	return n
}

// collected is a batch of input messages and their weight in flight, or a part of
// one (more).
type collected struct {
	msgs   []jetstream.Msg
	weight int64
	// more: the batch goes on with the next collected; it is one insert with it.
	more bool
}

// typedRow is one row of a typed table: its values, and its sequence and key (the
// identity the replay check compares).
type typedRow struct {
	values []any
	seq    uint64
	key    string
}

// row is one events row and where it comes from.
type row struct {
	rec    *sink.EventRecord
	seq    uint64    // EVENTS sequence
	stored time.Time // when EVENTS stored the event
	msg    jetstream.Msg
	// el places the event in its batch message (nil: the message is the event);
	// data is then the element's payload.
	el   *events.Element
	data []byte
}

func (r *run) run(ctx context.Context) error {
	if err := r.restore(ctx); err != nil {
		return err
	}
	occ := jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: r.seq + 1}
	if r.in.filter != "" {
		occ.FilterSubjects = []string{r.in.filter}
	}
	cons, err := r.js.OrderedConsumer(ctx, r.in.stream, occ)
	if err != nil {
		return fmt.Errorf("pipeline: read %s: %w", r.in.stream, err)
	}
	// The client's buffer holds messages beyond the worker's bound in flight: one
	// batch's worth keeps reads ahead of the batches.
	var pull jetstream.PullMessagesOpt = jetstream.PullMaxMessages(r.cfg.MaxRows)
	if r.in.keyed {
		// Envelopes hold many events each: the buffer is bounded by bytes, about
		// two batches of events across the P partitions (a worker owning all of them
		// holds two batches, as with one), and at least two envelopes.
		pull = jetstream.PullMaxBytes(max(2*r.cfg.MaxRows*envelopeEventBytes/r.cfg.Partitions, 2*int(r.maxPayload)))
	}
	it, err := cons.Messages(pull)
	if err != nil {
		return fmt.Errorf("pipeline: read %s: %w", r.in.stream, err)
	}
	// Four steps overlap, each a goroutine handing the next a batch: read and
	// collect, prepare (decode, key, enrich, build the row: per message, in
	// parallel), decide (dedup and rules, in stream order: this goroutine, which
	// owns the state), write (insert and publish, in order). While a batch fills
	// during an insert, its parts go through prepare and decide as they come, so
	// that when it is cut only its insert is left.
	// What the run still holds in flight once its steps stopped (batches read and
	// dropped) goes back to the worker.
	defer func() { r.release(r.held.Load()) }()
	var wg sync.WaitGroup
	defer wg.Wait()
	inCtx, stopInput := context.WithCancel(ctx)
	defer stopInput()
	wg.Go(func() {
		<-inCtx.Done()
		it.Stop()
	})
	collected := make(chan collected, 1)
	wg.Go(func() { r.collect(inCtx, it, collected) })
	prepared := make(chan *batch, 1)
	wg.Go(func() { r.prepareAll(inCtx, collected, prepared) })

	// The writer outlives ctx long enough to store what was decided (bounded by a
	// third of the lease: the next leader starts no sooner).
	wctx, stopWriter := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWriter()
	batches := make(chan *batch, 1)
	var closeOnce sync.Once
	closeBatches := func() { closeOnce.Do(func() { close(batches) }) }
	defer closeBatches()
	writerDone := make(chan struct{})
	var writerErr error
	// The saver uploads the states the writer hands it, while input goes on. A
	// stop lets an upload in flight end (a cancelled claim write leaves it unsure
	// whether the claim moved) within its time, then the final save supersedes it.
	saves := make(chan *captured, 1)
	keysFailed := make(chan error, 1)
	var saving atomic.Bool // a state is captured and not yet uploaded
	saverCtx, stopSaver := context.WithCancel(context.WithoutCancel(ctx))
	defer stopSaver()
	saverQuit, saverDone := make(chan struct{}), make(chan struct{})
	wg.Go(func() {
		defer close(saverDone)
		for {
			select {
			case <-saverQuit:
				return
			case <-saverCtx.Done():
				return
			case st := <-saves:
				// Paced (the stop's final save is not, and hurries this one).
				err := r.upload(partition.WithUploadPace(saverCtx, savePace, r.cfg.SnapshotInterval/2, saverQuit), st)
				if err != nil && saverCtx.Err() == nil {
					r.log.Warn("save state", "partition", r.in.id, "err", err)
				}
				saving.Store(false)
				if errors.Is(err, errKeysDisk) || errors.Is(err, sink.ErrFenced) {
					// The keys' disk failed (full, or an I/O error), or a newer
					// generation fenced this run's inserts out (they store nothing):
					// the run ends as after a crash, holding nothing more in memory;
					// it starts again from its last state, not ready meanwhile.
					select {
					case keysFailed <- err:
					default:
					}
				}
			}
		}
	})
	w := &writer{run: r, pub: jspub.New(r.js, 4096, r.log), types: map[string]int{}, saves: saves}
	wg.Go(func() {
		defer close(writerDone)
		writerErr = w.write(wctx, batches)
	})
	// writerFailed is why the writer stopped; call it once writerDone is closed.
	writerFailed := func() error {
		if writerErr != nil {
			return writerErr
		}
		return errors.New("pipeline: the writer stopped")
	}

	reloads := make(chan []*alert.Rule)
	if r.cfg.Alert.ConfigPath != "" {
		// Noted before the partition reports ready: a change made after that is seen.
		w := configfile.NewWatcher(r.cfg.Alert.ConfigPath)
		wg.Go(func() {
			alert.WatchRules(inCtx, w, r.cfg.Alert.ReloadInterval, r.log,
				func(result string) { r.m.reloads.WithLabelValues(result).Inc() },
				func(rules []*alert.Rule) {
					select {
					case reloads <- rules:
					case <-inCtx.Done():
					}
				})
		})
	}
	wg.Go(func() { r.watch(inCtx) })
	r.ready.Set(r.in.name, nil)
	r.log.Info("pipeline running", "partition", r.in.id, "stream", r.in.stream, "from_seq", r.seq+1, "rules", len(r.engine.Rules()))

	// send hands b to the writer; wait also waits until it and all before are stored.
	send := func(b *batch, wait bool) error {
		var done chan error
		if wait {
			done = make(chan error, 1)
			b.done = done
		}
		select {
		case batches <- b:
		case <-writerDone:
			return writerFailed()
		case err := <-r.stalled: // the writer holds up this hand-off
			return r.stallRestart(err)
		}
		if !wait {
			return nil
		}
		select {
		case err := <-done:
			return err
		case <-writerDone:
			return writerFailed()
		}
	}
	// unsent are batches decided (the state covers them) and not handed to the
	// writer yet: a send the watchdog's report ended leaves its batch here, and the
	// stop hands them on before it saves the state (dropped, their events were lost:
	// TestWatchdogRestartsStalledPartition).
	var unsent []*batch
	flush := func() error {
		for len(unsent) > 0 {
			if err := send(unsent[0], false); err != nil {
				return err
			}
			unsent[0], unsent = nil, unsent[1:]
		}
		return nil
	}
	hand := func(b *batch) error {
		unsent = append(unsent, b)
		return flush()
	}
	// open is a batch decided in part, the rest of its input to come (collect):
	// handed on whole once that is decided, or as it is before any other.
	var open *batch
	sendOpen := func() error {
		if open == nil {
			return nil
		}
		b := open
		open = nil
		r.sendProgress(b)
		return hand(b)
	}
	// stop stores what was decided and saves the state, within a third of the lease.
	stop := func(cause error) error {
		stopInput()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.LeaseTTL/3)
		defer cancel()
		stored := make(chan error, 1)
		go func() {
			err := flush()
			if err == nil {
				err = sendOpen()
			}
			if err == nil {
				err = send(&batch{}, true)
			}
			stored <- err
		}()
		var err error
		select {
		case err = <-stored:
		case <-sctx.Done():
			// Stop the writer; the send returns once it has (it never outlives stop).
			stopWriter()
			err = errors.Join(fmt.Errorf("pipeline: stopping: output not stored in time: %w", sctx.Err()), <-stored)
		}
		stopWriter()
		close(saverQuit)
		select {
		case <-saverDone:
		case <-sctx.Done():
			stopSaver()
			<-saverDone
		}
		if err == nil {
			err = r.save(sctx)
		}
		closeBatches()
		return errors.Join(cause, err)
	}

	snapTick := time.NewTicker(r.cfg.SnapshotInterval)
	defer snapTick.Stop()
	// capturing is a save's state begun at a tick, its alert windows' part
	// (capturePart) encoded in steps while no input waits (or a step between
	// batches from a second after the tick: stepsBegun) and as input changes them;
	// sweeping, the dedup keys' sweep begun at the tick, likewise. stepping is the
	// always-ready channel that runs the steps.
	var capturing *captured
	var capturePart *alert.Pending
	var sweeping bool
	var stepsBegun time.Time
	always := make(chan struct{})
	close(always)
	endCapture := func() error {
		st, p := capturing, capturePart
		capturing, capturePart = nil, nil
		if err := r.end(st, p); err != nil {
			saving.Store(false)
			r.log.Warn("save state", "partition", r.in.id, "err", err)
			return nil
		}
		return send(&batch{save: st}, false)
	}
	idleTick := time.NewTicker(time.Second)
	defer idleTick.Stop()
	lastInput, lastIdle := time.Now(), time.Now()
	for {
		var stepping chan struct{}
		if (capturePart != nil || sweeping) && (len(prepared) == 0 || time.Since(stepsBegun) > time.Second) {
			stepping = always
		}
		select {
		case <-stepping:
			for began := time.Now(); time.Since(began) < alert.StepTime; {
				if capturePart != nil {
					if !capturePart.Step(alert.CaptureStep) {
						if err := endCapture(); err != nil {
							return stop(err)
						}
					}
				} else if sweeping {
					sweeping = r.keys.sweep(r.clock, sweepStep)
				} else {
					break
				}
			}
		case <-ctx.Done():
			return stop(nil)
		case <-writerDone:
			return writerFailed()
		case err := <-r.stalled:
			return stop(r.stallRestart(err))
		case err := <-keysFailed:
			return fmt.Errorf("pipeline: partition %d: %w", r.in.id, err)
		case part, ok := <-prepared:
			if !ok {
				return stop(errors.New("pipeline: the input ended"))
			}
			lastInput = time.Now()
			// A part of a batch is decided into its batch (open), which keeps it.
			b := part
			if open != nil {
				b = open
				b.parts = append(b.parts, part)
				b.weight += part.weight
			}
			b.rows = slices.Grow(b.rows, max(len(part.preps), int(part.weight))) // weight: its events
			for i := range part.preps {
				r.decide(&part.preps[i], b)
			}
			// The batch's metrics, once: per event they took a fifth of the loop at
			// half load (docs/benchmarks.md).
			for i := len(part.preps) - 1; i >= 0; i-- {
				if part.preps[i].seq != 0 {
					r.m.lag.WithLabelValues(r.in.label).Set(float64(part.preps[i].pending))
					break
				}
			}
			r.engine.DrainLate(func(rule string, n int) { r.m.late.WithLabelValues(rule).Add(float64(n)) })
			if r.keysErr != nil {
				// As a crash: nothing of this batch is written and no state saved past
				// what is stored; the run starts again from its last state.
				return fmt.Errorf("pipeline: partition %d: %w", r.in.id, r.keysErr)
			}
			if err := r.engine.Err(); err != nil {
				// The alert windows are not whole (their groups on disk failed): as
				// the keys' failure above.
				return fmt.Errorf("pipeline: partition %d: %w", r.in.id, err)
			}
			open = b
			if part.more {
				r.m.parts.Inc()
				continue
			}
			if err := sendOpen(); err != nil {
				return stop(err)
			}
		case now := <-idleTick.C:
			if now.Sub(lastInput) >= r.cfg.Alert.IdleAfter && len(prepared) == 0 {
				since := lastIdle
				if lastInput.After(since) {
					since = lastInput
				}
				if err := sendOpen(); err != nil {
					return stop(err)
				}
				if r.matcher != nil {
					// The partition's progress moves on with idle time, as one engine's
					// latest time would (from now, for a partition that had no input).
					if r.progress.IsZero() {
						r.progress = now.UTC()
					} else {
						r.progress = r.progress.Add(now.Sub(since))
					}
					b := &batch{}
					if r.sendProgress(b) {
						if err := hand(b); err != nil {
							return stop(err)
						}
					}
				} else if err := r.emitNow(r.engine.Idle(now.Sub(since)), hand); err != nil {
					return stop(err)
				}
			}
			lastIdle = now
		case rules := <-reloads:
			if err := sendOpen(); err != nil {
				return stop(err)
			}
			r.readRules(rules)
			if r.matcher != nil {
				r.matcher = alert.NewMatcher(rules)
			} else if err := r.emitNow(r.engine.SetRules(rules), hand); err != nil {
				return stop(err)
			}
			r.log.Info("alert rules reloaded", "rules", len(rules))
		case <-snapTick.C:
			// Capture the state as of what is decided, and go on deciding: the
			// writer hands it to the saver once everything decided before it is
			// stored (input is not held up by the save; a save still in flight
			// skips this one).
			if !saving.CompareAndSwap(false, true) {
				continue
			}
			if err := sendOpen(); err != nil {
				return stop(err)
			}
			st, p, err := r.begin(time.Now().UTC())
			if err != nil {
				saving.Store(false)
				r.log.Warn("save state", "partition", r.in.id, "err", err)
				continue
			}
			capturing, capturePart, sweeping, stepsBegun = st, p, true, time.Now()
			if p == nil {
				if err := endCapture(); err != nil {
					return stop(err)
				}
			}
		}
	}
}

// stallRestart is the error that ends a run the watchdog found stalled
// (cfg.StallRestart), counted.
func (r *run) stallRestart(stalled error) error {
	r.m.stallRestarts.WithLabelValues(r.in.label).Inc()
	return fmt.Errorf("pipeline: %w; its run starts again (stall_restart)", stalled)
}

// readRules notes what rules read of events' data, for the messages prepared
// from now on.
func (r *run) readRules(rules []*alert.Rule) {
	if len(rules) == 0 {
		r.rulesRead.Store(nil)
		return
	}
	read := alert.DataFields(rules)
	r.rulesRead.Store(&read)
}

// emitNow hands alert changes not caused by input (idle time, a rule reload) to
// the writer.
func (r *run) emitNow(out []*alerts.Alert, hand func(*batch) error) error {
	if err := r.engine.Err(); err != nil {
		return fmt.Errorf("pipeline: partition %d: %w", r.in.id, err)
	}
	if len(out) == 0 {
		return nil
	}
	b := &batch{}
	r.emit(out, false, b)
	return hand(b)
}

// collect reads the input into batches of up to MaxRows events (an envelope counts
// the events it holds), each handed on when full, FlushInterval after its first
// message, or as soon as nothing else of the run's is in flight (every batch before
// it stored) and no more input is waiting: at low load a batch does not wait for
// rows, and while an insert runs the next batch fills (a group commit). While it
// fills, what it holds is handed on in parts (collected.more) whenever no input
// waits and prepare takes it: the batch is prepared and decided as it comes, and
// once cut, only its insert is left (a serial cycle of prepare, decide and insert
// made the half-load tail: docs/benchmarks.md).
func (r *run) collect(ctx context.Context, it jetstream.MessagesContext, out chan<- collected) {
	defer close(out)
	buffered := 1024 // a hand-over from the client's buffer, not a buffer of its own
	if r.in.keyed {
		// Envelopes of many events each: the pull buffer holds the backlog.
		buffered = envelopesBuffered
	}
	msgs := make(chan jetstream.Msg, buffered)
	var reader sync.WaitGroup
	defer reader.Wait()
	reader.Go(func() { stage.Pump(ctx, it, msgs, r.log) })
	// next was read when the worker had no room in flight for it: it begins the
	// next batch.
	var next jetstream.Msg
	for {
		if next == nil {
			select {
			case <-ctx.Done():
				return
			case msg, ok := <-msgs:
				if !ok {
					return
				}
				next = msg
			}
		}
		// Waits for room in flight while this partition holds no partial batch:
		// the batches holding it are stored, or handed on at their flush interval.
		w := r.weightOf(next)
		if err := r.inflight.Acquire(ctx, w); err != nil {
			return
		}
		r.hold(w)
		// c is the part of the batch not yet handed on; weight is the whole batch's.
		c := collected{msgs: append(make([]jetstream.Msg, 0, 1024), next), weight: w}
		weight := w
		n := r.eventsIn(next)
		next = nil
		flush := time.NewTimer(r.cfg.FlushInterval)
	fill:
		for n < r.cfg.MaxRows {
			if len(msgs) == 0 && r.held.Load() <= weight {
				break fill // the writer has nothing of this run's but this batch's: hand it on now
			}
			// The batch fills while an insert before it runs: while no input
			// waits, what it holds so far goes on as a part whenever prepare takes
			// it, to be prepared and decided now rather than after the insert (the
			// batch is still inserted whole, at the same point).
			var parts chan<- collected
			if len(msgs) == 0 && len(c.msgs) > 0 {
				parts = out
			}
			part := c
			part.more = true
			select {
			case parts <- part:
				r.dog.Read(len(c.msgs))
				c = collected{msgs: make([]jetstream.Msg, 0, 256)}
			case msg, ok := <-msgs:
				if !ok {
					break fill
				}
				w := r.weightOf(msg)
				if !r.inflight.TryAcquire(w) {
					next = msg // no room: this batch goes on now
					break fill
				}
				r.hold(w)
				c.msgs, c.weight, weight = append(c.msgs, msg), c.weight+w, weight+w
				n += r.eventsIn(msg)
			case <-r.released:
				// An earlier batch was stored: look again whether this one goes on.
			case <-flush.C:
				break fill
			case <-ctx.Done():
				flush.Stop()
				return
			}
		}
		flush.Stop()
		r.dog.Read(len(c.msgs))
		select {
		case out <- c:
		case <-ctx.Done():
			return
		}
	}
}

// eventsIn is how many events a message of the input holds, as far as a batch's
// size goes: an envelope's count, else 1.
func (r *run) eventsIn(msg jetstream.Msg) int {
	if !r.in.keyed {
		return 1
	}
	if n, err := strconv.Atoi(msg.Headers().Get(keyed.HeaderCount)); err == nil && n > 1 {
		return n
	}
	return 1
}

// prep is one input message prepared for the decision: its events decoded, keyed,
// enriched, their rows built. The dedup store is not consulted yet.
type prep struct {
	msg      jetstream.Msg
	seq      uint64
	pending  uint64
	received time.Time
	// one is the message's event (or why it is invalid); items holds them all when
	// the message is a batch of several.
	one   [1]item
	items []item
}

// item is one event of an input message, prepared.
type item struct {
	d dedup.Decision
	// src is the message the event came in (or, from an envelope, its entry), for
	// its dead letter; received is when EVENTS stored it.
	src      jetstream.Msg
	received time.Time
	// id places the event's outputs (rule input) in its message: the element's
	// index in its batch, the entry's in its envelope, or -1.
	id     int
	rec    sink.EventRecord
	rowErr error
	env    *alert.EventEnv
	// envRead is what env holds of data: the rules' needs when it was made.
	envRead *events.DataFields
	// typed is the event's row in its type's typed table (typedIdx), if it has one.
	typed    []any
	typedIdx int
}

// all returns the message's events.
func (p *prep) all() []item {
	if p.items != nil {
		return p.items
	}
	return p.one[:]
}

// next returns the place of the message's nth event (from 0).
func (p *prep) next(n int) *item {
	if n == 0 {
		return &p.one[0]
	}
	if n == 1 {
		p.items = append(p.items[:0], p.one[0])
	}
	p.items = append(p.items, item{})
	return &p.items[n]
}

// prepareAll prepares each batch (or part of one), its messages split among
// GOMAXPROCS goroutines.
func (r *run) prepareAll(ctx context.Context, in <-chan collected, out chan<- *batch) {
	defer close(out)
	workers := runtime.GOMAXPROCS(0)
	for c := range in {
		msgs := c.msgs
		b := r.spare.get()
		b.weight, b.more = c.weight, c.more
		b.preps = slices.Grow(b.preps, len(msgs))[:len(msgs)]
		ps := b.preps
		// What enrichment and the rules read of data, decoded once for both.
		read := r.live.DataFields()
		if rules := r.rulesRead.Load(); rules != nil {
			read = read.Union(*rules)
		}
		var wg sync.WaitGroup
		// A part of a batch may be a few messages: at least 16 to a goroutine.
		chunk := max((len(msgs)+workers-1)/workers, 16)
		for lo := 0; lo < len(msgs); lo += chunk {
			hi := min(lo+chunk, len(msgs))
			wg.Go(func() {
				for i := lo; i < hi; i++ {
					r.prepare(msgs[i], &ps[i], read)
				}
			})
		}
		wg.Wait()
		select {
		case out <- b:
		case <-ctx.Done():
			return
		}
	}
}

func (r *run) prepare(msg jetstream.Msg, p *prep, read events.DataFields) {
	p.msg = msg
	p.one[0].src, p.one[0].id = msg, -1 // for a dead letter of the whole message
	md, err := msg.Metadata()
	if err != nil {
		p.one[0].d.Invalid = fmt.Errorf("message without JetStream metadata: %w", err)
		return
	}
	p.seq, p.pending, p.received = md.Sequence.Stream, md.NumPending, md.Timestamp
	m := events.Message{Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data(), Received: md.Timestamp}
	var key string
	if r.in.keyed && msg.Headers().Get(keyed.HeaderEnvelope) != "" {
		r.prepareEnvelope(msg, p, read)
		return
	}
	if r.in.keyed {
		if m, key, err = unkeyed(msg); err != nil {
			p.one[0].d.Invalid = err
			return
		}
		p.received = m.Received
	}
	n := 0
	r.prepDedup.DecideAll(m, func(d dedup.Decision) {
		it := p.next(n)
		n++
		it.d, it.src, it.received, it.id = d, msg, p.received, -1
		if d.Element != nil {
			it.id = d.Element.Index
		}
		r.prepareItem(it, p.seq, key, read)
	})
}

// prepareEnvelope prepares the events of an envelope of the keying step
// (schemas/keyed), each as the event it copied from EVENTS: an event's dead letter
// is that of its EVENTS message (entryMsg), its outputs' ids are placed by its index
// in the envelope. An envelope that cannot be read is dead-lettered whole.
func (r *run) prepareEnvelope(msg jetstream.Msg, p *prep, read events.DataFields) {
	var entries []keyed.Entry
	if err := keyed.Decode(msg.Data(), func(_ int, x keyed.Entry) bool {
		entries = append(entries, x)
		return true
	}); err != nil {
		p.one[0] = item{src: msg, id: -1}
		p.one[0].d.Invalid = err
		return
	}
	if len(entries) > 1 {
		// Room for every entry at once: grown one by one, the items (large) were
		// copied again at each doubling, a tenth of a worker's CPU. (Items stay nil
		// for one entry: all() reads one then.)
		p.items = slices.Grow(p.items[:0], len(entries))
	}
	n := 0
	for i, x := range entries {
		m := events.Message{Subject: x.Subject, Header: nats.Header(x.Header), Data: x.Data, Received: x.Received}
		if x.Element >= 0 {
			m.Element = &events.Element{Index: x.Element}
		}
		src := &entryMsg{Msg: msg, x: x}
		r.prepDedup.DecideAll(m, func(d dedup.Decision) {
			it := p.next(n)
			n++
			it.d, it.src, it.received, it.id = d, src, x.Received, i
			r.prepareItem(it, p.seq, x.Key, read)
		})
	}
	if n == 0 {
		p.one[0] = item{src: msg, id: -1}
		p.one[0].d.Invalid = errors.New("an envelope without events")
	}
}

// entryMsg is one event of an envelope as the message EVENTS stored: its subject,
// headers, payload and position in EVENTS; the rest is the envelope's.
type entryMsg struct {
	jetstream.Msg
	x keyed.Entry
}

func (e *entryMsg) Subject() string      { return e.x.Subject }
func (e *entryMsg) Headers() nats.Header { return e.x.Header }
func (e *entryMsg) Data() []byte         { return e.x.Data }
func (e *entryMsg) Metadata() (*jetstream.MsgMetadata, error) {
	return &jetstream.MsgMetadata{Stream: streams.Events, Sequence: jetstream.SequencePair{Stream: e.x.Seq}, Timestamp: e.x.Received}, nil
}

// prepareItem keys (key, when the keying step made it), enriches and builds the
// row of one event of a message.
func (r *run) prepareItem(it *item, seq uint64, key string, read events.DataFields) {
	if it.d.Invalid != nil {
		return
	}
	if key != "" && key != it.d.Event.Key {
		k, ok := dedup.ParseKey(key)
		if !ok {
			it.d.Invalid = fmt.Errorf("header %s: %q is not a key", HeaderKey, key)
			return
		}
		it.d.Key = k
		it.d.Event.Key = key
	}
	e := it.d.Event
	_, _ = e.DecodeDataFields(read) // kept for enrichment and the rules; an error is theirs to meet
	r.live.Enrich(e)
	var err error
	if it.rec, err = sink.EventRecordOf(e, seq); err != nil {
		it.rowErr = fmt.Errorf("cannot be a row of events: %w", err)
		return
	}
	if i, ok := r.typedOf[e.Type]; ok {
		t := r.cfg.Typed[i]
		if it.typed, err = t.Values(e, seq); err != nil {
			it.rowErr = fmt.Errorf("cannot be a row of %s: %w", t.Name, err)
			return
		}
		it.typedIdx = i
	}
	if read := r.rulesRead.Load(); read != nil {
		it.env, it.envRead = alert.EnvFor(e, *read), read
	}
}

// decide applies dedup and the rules to one prepared message, in stream order,
// adding what it produces to b.
func (r *run) decide(p *prep, b *batch) {
	if p.seq == 0 {
		r.log.Warn("message without metadata", "err", p.one[0].d.Invalid)
		return
	}
	r.seq = p.seq
	items := p.all()
	for i := range items {
		r.decideItem(p, &items[i], b)
		items[i].decided()
	}
}

// decided drops what only deciding reads (the decoded event, the rules' view of
// it): a decided batch waits for its insert holding its rows and messages alone.
func (it *item) decided() { it.d.Event, it.env, it.envRead = nil, nil, nil }

func (r *run) decideItem(p *prep, it *item, b *batch) {
	d := it.d
	r.clock = max(r.clock, d.Now)
	switch {
	case d.Invalid != nil:
		r.deadLetter(it.src, d.Element, d.Data, typeOf(&d), d.Invalid.Error(), b)
		return
	}
	if repeat, err := dedup.Admit(r.keys, &d, p.seq); err != nil {
		// The keys cannot be read or written (a disk store's disk): the run ends
		// and starts again from its state.
		r.keysErr = err
		return
	} else if repeat {
		r.m.duplicates.Inc()
		r.m.event(typeOf(&d), outcomeRepeat, 1)
		return
	}
	if it.rowErr != nil {
		r.deadLetter(it.src, d.Element, d.Data, d.Event.Type, it.rowErr.Error(), b)
		return
	}
	b.rows = append(b.rows, row{rec: &it.rec, seq: p.seq, stored: it.received, msg: it.src, el: d.Element, data: d.Data})
	if it.typed != nil {
		if b.typed == nil {
			b.typed = make([][]typedRow, len(r.cfg.Typed))
		}
		b.typed[it.typedIdx] = append(b.typed[it.typedIdx], typedRow{values: it.typed, seq: p.seq, key: d.Event.Key})
	}
	rules := r.engine.Rules()
	if r.matcher != nil {
		rules = r.matcher.Rules()
		if d.Event.Time.After(r.progress) {
			r.progress = d.Event.Time
		}
	}
	if len(rules) == 0 {
		return
	}
	env := it.env
	if read := r.rulesRead.Load(); it.envRead != read { // rules were loaded after the message was prepared
		env = alert.EnvFor(d.Event, *read)
	}
	if r.matcher != nil {
		if r.matcher.Any(env) {
			r.ruleInput(p, it.id, &d, b)
		}
		return
	}
	out, errs := r.engine.Observe(env)
	for range errs {
		r.m.exprErrors.Inc()
	}
	r.emit(out, p.seq <= r.replay, b)
}

// sendProgress adds the partition's progress for the alert runner to b when it
// moved on since the last (and there are rules), and reports whether it did.
func (r *run) sendProgress(b *batch) bool {
	if r.matcher == nil || len(r.matcher.Rules()) == 0 || !r.progress.After(r.progressSent) {
		return false
	}
	m := nats.NewMsg(alerts.RuleInputSubject(r.in.id))
	m.Header.Set(alerts.HeaderProgress, r.progress.UTC().Format(time.RFC3339Nano))
	if r.seq <= r.replay {
		m.Header.Set(alerts.HeaderReplay, "true")
	}
	b.out = append(b.out, m)
	r.progressSent = r.progress
	return true
}

// ruleInput adds the rule input of d (its event, enriched) to b, unless it was
// stored before a restart.
func (r *run) ruleInput(p *prep, el int, d *dedup.Decision, b *batch) {
	id := alerts.RuleInputMsgID(r.in.stream, p.seq, el)
	if r.published[id] {
		return
	}
	body, err := d.Event.Marshal()
	if err != nil {
		r.log.Error("encode rule input", "key", d.Event.Key, "err", err)
		return
	}
	m := nats.NewMsg(alerts.RuleInputSubject(r.in.id))
	m.Header.Set(nats.MsgIdHdr, id)
	if p.seq <= r.replay {
		m.Header.Set(alerts.HeaderReplay, "true")
	}
	m.Data = body
	b.out = append(b.out, m)
}

// deadLetter adds the dead letter of msg (or of its batch element el, whose
// payload is data; of event type typ, if known) to b, unless it was stored before
// a restart.
func (r *run) deadLetter(msg jetstream.Msg, el *events.Element, data []byte, typ, reason string, b *batch) {
	var dl *nats.Msg
	if el != nil {
		dl = stage.ElementDeadLetter(Name, msg, el.Index, data, reason, r.maxPayload)
	} else {
		dl = stage.DeadLetter(Name, msg, reason, r.maxPayload)
	}
	if r.published[dl.Header.Get(nats.MsgIdHdr)] {
		return
	}
	r.m.deadLetter(typ, reason)
	b.out = append(b.out, dl)
}

// emit adds alert changes to b, leaving out those stored before a restart.
func (r *run) emit(out []*alerts.Alert, replay bool, b *batch) {
	for _, a := range out {
		a.Replay = replay
		id := alerts.MsgID(a)
		if r.published[id] {
			r.m.republishSkipped.Inc()
			continue
		}
		m, err := alert.ChangeMsg(a)
		if err != nil {
			r.log.Error("encode alert", "rule", a.Rule, "err", err)
			continue
		}
		b.out = append(b.out, m)
		r.m.alerts.WithLabelValues(a.Rule, a.Status).Inc()
	}
}

// writer inserts batches in order and publishes their output.
type writer struct {
	*run
	pub *jspub.Publisher
	// saves takes captured states to the saver, one at a time.
	saves chan<- *captured
	// cols holds the rows of one insert; reused by each.
	cols sink.EventColumns
	// types counts the rows of one insert by event type; reused by each.
	types map[string]int
}

func (w *writer) write(ctx context.Context, batches <-chan *batch) error {
	for b := range batches {
		err := w.store(ctx, b)
		if err == nil {
			w.dog.Done(b.inputs(), time.Now())
		}
		if err == nil && (b.done != nil || b.save != nil) {
			err = w.pub.Settle(ctx)
		}
		if err == nil && b.save != nil {
			b.save.stored = time.Now().UTC()
			w.saves <- b.save // never blocks: the decide loop captures one at a time
		}
		if b.done != nil {
			b.done <- err
		}
		if err != nil {
			return err
		}
		w.release(b.weight)
		w.recycle(b)
	}
	return nil
}

// recycle keeps the memory of a stored batch for one to come (if not enough are
// kept already): a batch of prepared input is large, and allocating it anew each
// time made much of the stage's garbage.
func (r *run) recycle(b *batch) {
	for _, p := range b.parts {
		r.recycle(p)
	}
	if b.preps == nil {
		return
	}
	clear(b.preps)
	clear(b.rows)
	clear(b.out)
	for i := range b.typed {
		clear(b.typed[i])
		b.typed[i] = b.typed[i][:0]
	}
	*b = batch{preps: b.preps[:0], rows: b.rows[:0], out: b.out[:0], typed: b.typed}
	r.spare.put(b)
}

// spares keeps stored batches' memory (prepared input, rows) for batches to come:
// one batch of any size, as a single spare did before, and more while their bytes
// together fit in room. A batch cut in parts is several batch objects; keeping only
// one of them left each part of the next batch to allocate its own, a fifth of a
// worker's garbage at half load (docs/benchmarks.md).
type spares struct {
	mu    sync.Mutex
	one   *batch
	free  []*batch
	bytes int // of free
	room  int
}

func newSpares(room int) *spares { return &spares{room: room} }

// bytesOf is the memory of b's prepared input and rows.
func bytesOf(b *batch) int {
	return cap(b.preps)*int(unsafe.Sizeof(prep{})) + cap(b.rows)*int(unsafe.Sizeof(row{}))
}

// get returns a kept batch, or a new one.
func (s *spares) get() *batch {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := len(s.free); n > 0 {
		b := s.free[n-1]
		s.free[n-1], s.free = nil, s.free[:n-1]
		s.bytes -= bytesOf(b)
		return b
	}
	if b := s.one; b != nil {
		s.one = nil
		return b
	}
	return &batch{}
}

// put keeps b (emptied) for a batch to come, if there is room.
func (s *spares) put(b *batch) {
	size := bytesOf(b)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.one == nil:
		s.one = b
	case s.bytes+size <= s.room:
		s.free = append(s.free, b)
		s.bytes += size
	}
}

// store inserts b's rows (those not in the table already), retrying until
// ClickHouse takes them or ctx ends, then publishes b's output.
func (w *writer) store(ctx context.Context, b *batch) error {
	// A worker that lost the partition must not write: its next owner may be
	// writing the same rows already.
	if err := w.claim.Valid(); err != nil {
		return err
	}
	if len(b.rows) > 0 && b.rows[0].seq <= w.hwm {
		if err := w.retry(ctx, "check", func(ctx context.Context) error { return w.dropPresent(ctx, b) }); err != nil {
			return err
		}
	}
	if len(b.rows) > 0 {
		w.cfg.Crash.At(crash.BeforeInsert)
		w.cfg.Crash.At(crash.DuringInsert)
		start := time.Now()
		var (
			refused map[int]error
			// partial: a failed insert may have stored some rows (a half of a split,
			// or all of them with the answer lost); the next try checks first.
			partial bool
		)
		err := w.retry(ctx, "insert", func(ctx context.Context) error {
			if err := w.claim.Valid(); err != nil {
				return err
			}
			if partial {
				// The failed insert may still be running in the server (its answer
				// lost, its rows all sent): stored after the check, its rows would
				// be stored twice. Wait for it, or fail this try and wait again.
				wctx, cancel := context.WithTimeout(ctx, 2*w.cfg.InsertTimeout)
				running, err := w.fence.WaitInserts(wctx, w.cfg.InsertTimeout)
				cancel()
				if err == nil && running > 0 {
					err = fmt.Errorf("pipeline: an insert that failed is still running in ClickHouse (%d of the partition's)", running)
				}
				if err != nil {
					return err
				}
				if err := w.dropPresent(ctx, b); err != nil {
					return err
				}
				partial = false
			}
			refused = nil
			if len(b.rows) == 0 {
				return nil
			}
			var err error
			refused, err = sink.Isolate(b.rows, func(rows []row) error {
				// Emptied after each insert: it holds no row's strings past it.
				defer w.cols.Reset()
				for i := range rows {
					w.cols.Append(rows[i].rec)
				}
				ictx, cancel := context.WithTimeout(ctx, w.cfg.InsertTimeout)
				defer cancel()
				return w.inserts.Insert(ictx, w.ch, &w.cols, w.fence)
			}, func(n int, err error) {
				w.log.Warn("ClickHouse refused a batch for its data; isolating the rows at fault", "rows", n, "err", err)
			})
			partial = err != nil
			return err
		})
		if err != nil {
			return err
		}
		w.cfg.Crash.At(crash.AfterInsert)
		if err := w.claim.Valid(); err != nil {
			return err
		}
		now := time.Now()
		w.m.insert.Observe(now.Sub(start).Seconds())
		w.m.rows.Add(float64(len(b.rows) - len(refused)))
		clear(w.types)
		for i, r := range b.rows {
			if rerr, bad := refused[i]; bad {
				w.deadLetter(r.msg, r.el, r.data, r.rec.Type, fmt.Sprintf("ClickHouse refused the row for events: %v", rerr), b)
				dropTyped(b, r.seq, r.rec.Key)
				continue
			}
			w.types[r.rec.Type]++
			w.m.e2e.Observe(now.Sub(r.stored).Seconds())
		}
		for typ, n := range w.types {
			w.m.event(typ, outcomeStored, n)
		}
	}
	for i, rows := range b.typed {
		if err := w.storeTyped(ctx, i, rows); err != nil {
			return err
		}
	}
	for _, m := range b.out {
		if m.Header.Get(alerts.HeaderProgress) != "" {
			// A progress message tells the alert runner that the partition's rule
			// input up to it is in RULES: it goes only once every publish before it
			// is stored. (Asynchronous publishes can fail one by one, when a node
			// leading RULES dies, and are published again at the next settle: a
			// rule input retried after a later progress would be late for its
			// windows.)
			if err := w.pub.Settle(ctx); err != nil {
				return fmt.Errorf("pipeline: publish before progress: %w", err)
			}
		}
		if err := w.pub.Publish(ctx, m); err != nil {
			return fmt.Errorf("pipeline: publish %s: %w", m.Subject, err)
		}
	}
	return nil
}

// dropTyped removes the typed row of the event seq, key from b: its events row was
// refused, and the event is dead-lettered whole.
func dropTyped(b *batch, seq uint64, key string) {
	for i := range b.typed {
		b.typed[i] = slices.DeleteFunc(b.typed[i], func(r typedRow) bool { return r.seq == seq && r.key == key })
	}
}

// storeTyped inserts the rows of typed table i not in it already, after the
// events rows of the same input: a run that stopped between the two finds the
// events rows present and inserts only these (each table is checked on its own,
// by stream_seq and key, up to its own high-water mark).
func (w *writer) storeTyped(ctx context.Context, i int, rows []typedRow) error {
	if len(rows) == 0 {
		return nil
	}
	t := w.cfg.Typed[i]
	check := rows[0].seq <= w.typedHWM[i]
	return w.retry(ctx, "insert", func(ctx context.Context) error {
		if err := w.claim.Valid(); err != nil {
			return err
		}
		if check {
			ictx, cancel := context.WithTimeout(ctx, w.cfg.InsertTimeout)
			defer cancel()
			rd, err := sink.ReadReplica(ictx, w.ch, w.shards.Replicas(w.in.id), w.typed[i])
			if err != nil {
				return fmt.Errorf("pipeline: %w", err)
			}
			present, err := sink.Present(ictx, rd, w.typed[i], t.Identity, rows[0].seq, rows[len(rows)-1].seq)
			if err != nil {
				return err
			}
			rows = slices.DeleteFunc(rows, func(r typedRow) bool { return slices.Contains(present[r.seq], r.key) })
			if len(rows) == 0 {
				return nil
			}
		}
		// A failed insert may have stored the rows; the next try checks first.
		check = true
		w.cfg.Crash.At(crash.DuringTypedInsert)
		values := make([][]any, len(rows))
		for j, r := range rows {
			values[j] = r.values
		}
		ictx, cancel := context.WithTimeout(ctx, w.cfg.InsertTimeout)
		defer cancel()
		if err := sink.InsertTypedFenced(ictx, w.ch, t, values, w.fence); err != nil {
			return err
		}
		w.m.typedRows.WithLabelValues(t.Name).Add(float64(len(rows)))
		return nil
	})
}

// retry runs f until it succeeds or ctx ends, with a growing pause between tries.
func (w *writer) retry(ctx context.Context, kind string, f func(context.Context) error) error {
	for attempt := uint64(1); ; attempt++ {
		err := f(ctx)
		if err == nil {
			w.ready.Set("clickhouse", nil)
			return nil
		}
		if errors.Is(err, partition.ErrLost) {
			return err
		}
		w.m.errors.WithLabelValues(kind).Inc()
		w.ready.Set("clickhouse", err)
		delay := stage.Backoff(attempt)
		w.log.Warn("ClickHouse failed; will retry", "op", kind, "retry_in", delay, "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("pipeline: %s: %w", kind, err)
		case <-time.After(delay):
		}
	}
}

// dropPresent removes from b the rows the events table holds already (same
// stream_seq and key): rows a run before this one inserted, or a failed insert of
// this one stored before it failed.
func (w *writer) dropPresent(ctx context.Context, b *batch) error {
	ctx, cancel := context.WithTimeout(ctx, w.cfg.InsertTimeout)
	defer cancel()
	if len(b.rows) == 0 {
		return nil
	}
	rd, err := sink.ReadReplica(ctx, w.ch, w.shards.Replicas(w.in.id), w.events)
	if err != nil {
		return fmt.Errorf("pipeline: %w", err)
	}
	present, err := sink.Present(ctx, rd, w.events, "key", b.rows[0].seq, b.rows[len(b.rows)-1].seq)
	if err != nil {
		return err
	}
	b.rows = slices.DeleteFunc(b.rows, func(r row) bool {
		if slices.Contains(present[r.seq], r.rec.Key) {
			w.m.replays.Inc()
			return true
		}
		return false
	})
	return nil
}
