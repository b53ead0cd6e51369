// Package alert is the alert stage: it evaluates the rules of SLUICE_CONFIG on the
// ENRICHED stream in event time and publishes each alert change (firing, resolved)
// to ALERTS (alerts.<rule>.<severity>) with a Nats-Msg-Id derived from the change
// itself, so a retry, a restart or a second replica never makes a second one.
//
// The stage's state (windows, firing alerts, the latest event time) is a function
// of the input it read: it is saved as a snapshot, with the ENRICHED sequence it
// covers, in the JetStream object store bucket sluice_alert, and a restart reads
// ENRICHED again from there. Changes it recomputes that were published before the
// restart are recognised by their Nats-Msg-Id among the ALERTS messages published
// since the snapshot, and not published again.
package alert

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/jspub"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// Name is the stage's name in logs, metrics and dead letters.
const Name = "alert"

// StateBucket is the object store bucket holding the stage's snapshot.
const StateBucket = "sluice_alert"

// Settings is the alert section of SLUICE_CONFIG.
type Settings struct {
	// IdleAfter: when no input arrived for this long, event time is moved on with
	// the wall clock, so windows close and absence rules fire when events stop.
	IdleAfter time.Duration `yaml:"idle_after"`
	// SnapshotInterval is how often the state is saved.
	SnapshotInterval time.Duration `yaml:"snapshot_interval"`
	// ReloadInterval is how often the config file is checked for changed rules.
	ReloadInterval time.Duration `yaml:"reload_interval"`
	// Store is where the groups of windowed rules live: memory (StoreMemory, the
	// default), or disk (StoreDisk: those beyond HotGroups in an LSM under
	// SLUICE_DATA_DIR, see Spill).
	Store string `yaml:"store"`
	// HotGroups bounds the groups kept in memory with the disk store.
	HotGroups int `yaml:"hot_groups"`
}

// Group stores (alert.store).
const (
	StoreMemory = "memory"
	StoreDisk   = "disk"
)

// DefaultSettings are the settings of an absent alert section.
func DefaultSettings() Settings {
	return Settings{IdleAfter: 30 * time.Second, SnapshotInterval: 10 * time.Second, ReloadInterval: 2 * time.Second,
		Store: StoreMemory, HotGroups: DefaultHotGroups}
}

// LoadSettings decodes the alert section of f over the defaults.
func LoadSettings(f *configfile.File) (Settings, error) {
	s := DefaultSettings()
	if err := f.Decode("alert", &s); err != nil {
		return s, err
	}
	if s.IdleAfter <= 0 || s.SnapshotInterval <= 0 || s.ReloadInterval <= 0 {
		return s, fmt.Errorf("config %s: alert: idle_after, snapshot_interval and reload_interval must be positive", f.Path)
	}
	if s.Store != StoreMemory && s.Store != StoreDisk {
		return s, fmt.Errorf("config %s: alert.store must be %q or %q, got %q", f.Path, StoreMemory, StoreDisk, s.Store)
	}
	if s.HotGroups <= 0 {
		return s, fmt.Errorf("config %s: alert.hot_groups must be positive, got %d", f.Path, s.HotGroups)
	}
	return s, nil
}

// Config configures the stage.
type Config struct {
	Settings
	Rules []*Rule
	// ConfigPath, if set, is watched: a change reloads the rules.
	ConfigPath string
	// Stream is the input stream (ENRICHED).
	Stream string
	// Partitions, when not 0, is how many partitions the input interleaves (the
	// partitioned pipeline's RULES: rule input and progress, by partition): a window
	// closes once every partition's progress passed it, and no idle time is added.
	Partitions int
	// Replicas is how many copies a NATS cluster keeps of the state bucket (0: as
	// it is, 1 when created).
	Replicas int
	// GroupsDir holds the groups on disk (Store disk).
	GroupsDir string
}

// DefaultConfig reads ENRICHED, with no rules.
func DefaultConfig() Config {
	return Config{Settings: DefaultSettings(), Stream: streams.Enriched}
}

// LoadConfig reads the rules and the alert section of f, and watches f's file for
// rule changes. Rules that do not compile are left out and reported as a
// *RuleError next to the config of the rest.
func LoadConfig(f *configfile.File) (Config, error) {
	cfg := DefaultConfig()
	var err error
	if cfg.Settings, err = LoadSettings(f); err != nil {
		return cfg, err
	}
	cfg.ConfigPath = f.Path
	cfg.Rules, err = LoadRules(f)
	return cfg, err
}

// Deps are what the stage needs from its host.
type Deps struct {
	NATS       *nats.Conn
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	Ready      func()
}

// StateStore keeps the stage's snapshot.
type StateStore interface {
	// Load reads the snapshot; nil when there is none.
	Load(ctx context.Context) ([]byte, error)
	// Save replaces the snapshot.
	Save(ctx context.Context, snapshot []byte) error
	// Valid is nil while the stage may write (publish and save).
	Valid() error
	// Files keeps the files of the state's checkpoints (see Checkpoints), this
	// machine's copies of them in cache.
	Files(cache string, log *slog.Logger) SegmentFiles
}

// objectState is the split stage's snapshot: the object "state" of its bucket,
// which every replica saves (the last save is the state), and its checkpoints'
// files, objects groups.0.0.<replica's nonce>.*, shared by the replicas: each
// deletes its own, and those of a replica that wrote none for stale.
type objectState struct {
	store jetstream.ObjectStore
	stale time.Duration
}

func (o objectState) Files(cache string, log *slog.Logger) SegmentFiles {
	return partition.NewSharedFiles(o.store, "groups", func(string) bool { return true }, cache, o.stale, log)
}

// replicaEnded is how long the split stage's replicas keep the checkpoint files
// of a replica that saved nothing since: long past any pause of a live one.
func replicaEnded(snapshotInterval time.Duration) time.Duration {
	return max(15*time.Minute, 30*snapshotInterval)
}

func (o objectState) Load(ctx context.Context) ([]byte, error) {
	b, err := o.store.GetBytes(ctx, "state")
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, nil
	}
	return b, err
}

func (o objectState) Save(ctx context.Context, snapshot []byte) error {
	_, err := o.store.PutBytes(ctx, "state", snapshot)
	return err
}

func (objectState) Valid() error { return nil }

// snapshot is what the state bucket holds.
type snapshot struct {
	// StreamCreated tells a snapshot of a deleted and recreated stream.
	StreamCreated time.Time `json:"stream_created"`
	// Seq is the last input sequence the state covers.
	Seq uint64 `json:"seq"`
	// ReplayUntil: alerts caused by input up to this sequence are replays (input
	// that was in the stream before the stage had any state).
	ReplayUntil uint64    `json:"replay_until"`
	SavedAt     time.Time `json:"saved_at"`
	// Checkpoint is the engine's state, in files (Checkpoints). Binary
	// (State.MarshalBinary) and State (its JSON form) are the state as earlier
	// releases wrote it, which a restore still reads.
	Checkpoint []Segment `json:"checkpoint,omitempty"`
	Binary     []byte    `json:"state_binary,omitempty"`
	State      *State    `json:"state,omitempty"`
}

type metrics struct {
	alerts   *prometheus.CounterVec
	late     *prometheus.CounterVec
	reloads  *prometheus.CounterVec
	filter   prometheus.Counter
	skipped  prometheus.Counter
	lastSeq  prometheus.Gauge
	maxEvent prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	return &metrics{
		alerts: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_alert_changes_total", Help: "Alert changes published, by rule and status (firing, resolved).",
		}, []string{"rule", "status"})),
		late: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_alert_late_events_total", Help: "Events that arrived after a window holding them was evaluated, by rule.",
		}, []string{"rule"})),
		reloads: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_alert_rule_reloads_total", Help: "Reloads of the rules, by result (ok, failed: rules that failed are left out).",
		}, []string{"result"})),
		filter: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_alert_expression_errors_total", Help: "Filter, group_by or value expressions that failed on an event (the event does not count for that rule).",
		})),
		skipped: telemetry.Register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "sluice_alert_republish_skipped_total", Help: "Alert changes recomputed after a restart that were already published.",
		})),
		lastSeq: telemetry.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_alert_input_sequence", Help: "The last ENRICHED sequence evaluated.",
		})),
		maxEvent: telemetry.Register(reg, prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "sluice_alert_event_time_seconds", Help: "The latest event time the rules have seen (unix seconds).",
		})),
	}
}

// stageRun is one run of the stage.
type stageRun struct {
	cfg     Config
	js      jetstream.JetStream
	state   StateStore
	log     *slog.Logger
	m       *metrics
	engine  *Engine
	cp      *Checkpoints
	created time.Time
	seq     uint64
	replay  uint64
	// published holds the Nats-Msg-Ids of alert changes published since the
	// snapshot this run started from.
	published  map[string]bool
	pub        *jspub.Publisher
	maxPayload int64
	// settled is when every change up to seq was last known published.
	settled time.Time
	// invalid, once set, is why the run may no longer write.
	invalid error
}

// Run runs the stage until ctx is done, then saves its state, in the object
// "state" of the bucket sluice_alert.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	js, err := jetstream.New(deps.NATS)
	if err != nil {
		return fmt.Errorf("alert: %w", err)
	}
	store, err := streams.ObjectStore(ctx, js, jetstream.ObjectStoreConfig{
		Bucket: StateBucket, Description: "The alert stage's snapshot: windows, firing alerts, input position.", Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return fmt.Errorf("alert: state bucket %s: %w", StateBucket, err)
	}
	return RunWith(ctx, cfg, deps, objectState{store, replicaEnded(cfg.SnapshotInterval)})
}

// RunWith runs the rules on cfg.Stream until ctx is done or state stops being
// valid (the runner's claim moved to another worker), keeping its snapshot in
// state; at the end it saves its state. It is the alert runner both the split
// alert stage and the partitioned pipeline's rule runner run.
func RunWith(ctx context.Context, cfg Config, deps Deps, state StateStore) error {
	log := deps.Logger.With("stage", Name)
	js, err := jetstream.New(deps.NATS, jetstream.WithPublishAsyncMaxPending(4096), jetstream.WithPublishAsyncTimeout(stage.DefaultPublishTimeout))
	if err != nil {
		return fmt.Errorf("alert: %w", err)
	}
	s := &stageRun{cfg: cfg, js: js, state: state, log: log, m: newMetrics(deps.Registerer), maxPayload: deps.NATS.MaxPayload(),
		pub: jspub.New(js, 1000, log)}
	// The checkpoints' files: under the groups' directory, or in one of the run's.
	dir := cfg.GroupsDir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "sluice-alert-"); err != nil {
			return fmt.Errorf("alert: %w", err)
		}
		defer os.RemoveAll(dir)
	}
	s.cp = NewCheckpoints(state.Files(filepath.Join(dir, "cache"), log), filepath.Join(dir, "segments"), log)
	defer s.cp.Close()
	// Restored again while JetStream does not answer in time (a server just
	// restarted): the state's reads, the changes published since, the first save.
	again := false
	err = streams.Again(ctx, func(ctx context.Context) error {
		if again {
			log.Warn("JetStream did not answer in time while the state was restored; restoring it again")
		}
		again = true
		if s.engine != nil {
			if err := s.engine.Close(); err != nil {
				log.Warn("close the groups on disk", "err", err)
			}
			s.engine = nil
		}
		return s.restore(ctx)
	})
	if s.engine != nil {
		defer func() {
			if err := s.engine.Close(); err != nil {
				log.Warn("close the groups on disk", "err", err)
			}
		}()
	}
	if err != nil {
		return err
	}
	return s.run(ctx, deps.Ready)
}

// restore loads the snapshot (or starts fresh) and the ids published since it.
func (s *stageRun) restore(ctx context.Context) error {
	// Asked again while JetStream does not answer in time (a server just restarted).
	stream, err := streams.OpenStream(ctx, s.js, s.cfg.Stream)
	if err != nil {
		return fmt.Errorf("alert: stream %s: %w", s.cfg.Stream, err)
	}
	info := stream.CachedInfo()
	s.created = info.Created
	var snap snapshot
	var fresh bool
	for attempt := 1; ; attempt++ {
		if snap, fresh, err = s.load(ctx, info); err != nil {
			return err
		}
		// The windows are decoded here, by the engine (with the groups on disk,
		// those beyond the ones kept in memory go to disk as they are read).
		s.engine, err = s.cp.Open(ctx, s.cfg.Settings, s.cfg.Rules, snap.Checkpoint, snap.Binary, snap.State, s.cfg.GroupsDir)
		if err == nil {
			break
		}
		if errors.Is(err, ErrCorruptState) {
			return fmt.Errorf("alert: state in %s does not decode (delete it to start over): %w", StateBucket, err)
		}
		// Another replica's save replaced the state and deleted a file of the one
		// read (a slow read, or that replica ended): the state is read again.
		if !errors.Is(err, jetstream.ErrObjectNotFound) || attempt == 5 {
			return err
		}
		s.log.Warn("a file of the alert state went while it was read (another replica saved since); reading the state again", "err", err)
	}
	if fresh {
		s.log.Info("no alert state; reading the input from its start, alerts from input already there are marked replay",
			"replay_until", snap.ReplayUntil)
	} else {
		s.log.Info("alert state restored", "seq", snap.Seq, "saved_at", snap.SavedAt, "max_event_time", s.engine.State().MaxTime)
	}
	if snap.Seq < info.State.FirstSeq-1 && info.State.FirstSeq > 0 {
		s.log.Warn("input after the state's position has aged out of the stream; windows miss it", "state_seq", snap.Seq, "first_seq", info.State.FirstSeq)
	}
	s.seq, s.replay = snap.Seq, snap.ReplayUntil
	if s.cfg.Partitions > 0 {
		s.engine.Partition(s.cfg.Partitions)
	}
	s.published = map[string]bool{}
	if !snap.SavedAt.IsZero() {
		if s.published, err = jspub.PublishedSince(ctx, s.js, streams.Alerts, snap.SavedAt.Add(-5*time.Second)); err != nil {
			return fmt.Errorf("alert: %w", err)
		}
		s.log.Info("alert changes published since the snapshot", "count", len(s.published))
	}
	s.settled = snap.SavedAt
	return s.write(ctx)
}

// load reads the snapshot; fresh: there is none (or it is of an earlier stream),
// so everything already in the input is a replay.
func (s *stageRun) load(ctx context.Context, info *jetstream.StreamInfo) (snap snapshot, fresh bool, err error) {
	b, err := s.state.Load(ctx)
	switch {
	case err != nil:
		return snap, false, fmt.Errorf("alert: read state: %w", err)
	case b == nil:
	default:
		if err := json.Unmarshal(b, &snap); err != nil {
			return snap, false, fmt.Errorf("alert: state in %s does not decode (delete it to start over): %w", StateBucket, err)
		}
		if !snap.StreamCreated.Equal(s.created) {
			s.log.Warn("the state is of an earlier stream of this name; starting over", "stream", s.cfg.Stream)
			snap = snapshot{}
		}
	}
	if snap.Checkpoint == nil && snap.Binary == nil && snap.State == nil {
		return snapshot{StreamCreated: s.created, ReplayUntil: info.State.LastSeq}, true, nil
	}
	return snap, false, nil
}

func (s *stageRun) run(ctx context.Context, ready func()) error {
	cons, err := streams.OrderedConsumer(ctx, s.js, s.cfg.Stream, jetstream.OrderedConsumerConfig{
		DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: s.seq + 1,
	})
	if err != nil {
		return fmt.Errorf("alert: read %s: %w", s.cfg.Stream, err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(1000))
	if err != nil {
		return fmt.Errorf("alert: read %s: %w", s.cfg.Stream, err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	msgs := make(chan jetstream.Msg, 1000)
	wg.Go(func() { stage.Pump(ctx, it, msgs, s.log) })
	reloads := make(chan []*Rule)
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	if s.cfg.ConfigPath != "" {
		// Noted before the stage reports ready: a change made after that is seen.
		w := configfile.NewWatcher(s.cfg.ConfigPath)
		wg.Go(func() { s.watch(watchCtx, w, reloads) })
	}
	if ready != nil {
		ready()
	}
	s.log.Info("alert rules loaded", "rules", len(s.engine.Rules()), "from_seq", s.seq+1)
	// At a tick the loop begins a capture of the state (Checkpoints.Begin) and
	// ends it in steps (CaptureStep groups at a time, for StepTime) while no input
	// waits, or between inputs from a second after the tick; the saver then uploads
	// and saves it while input goes on. One save at a time: a tick while one is
	// captured or saved is skipped. The final save waits for the one being saved;
	// one being captured is ended by the final capture and saved with it.
	saves := make(chan captured)
	saved := make(chan error, 1)
	saving := false
	var capturing *Pending
	var capturingSnap snapshot
	var stepsBegun time.Time
	always := make(chan struct{})
	close(always)
	wg.Go(func() {
		for c := range saves {
			saved <- s.store(context.WithoutCancel(ctx), c)
		}
	})
	defer close(saves)
	savedWith := func(err error) {
		saving = false
		if err == nil {
			return
		}
		if verr := s.state.Valid(); verr != nil {
			s.invalid = fmt.Errorf("alert: %w", verr)
			return
		}
		s.log.Warn("save state", "err", err)
	}
	endCapture := func() {
		c, err := capturing.End()
		capturing = nil
		if err != nil {
			savedWith(err)
			return
		}
		saving = true
		saves <- captured{cp: c, snap: capturingSnap} // the saver is idle: it takes it at once
	}
	// final waits for the save in flight, then saves the state as the run ends.
	final := func() error {
		if saving {
			savedWith(<-saved)
		}
		if s.invalid != nil {
			return s.invalid
		}
		return s.save(context.WithoutCancel(ctx))
	}
	snap := time.NewTicker(s.cfg.SnapshotInterval)
	defer snap.Stop()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	lastInput, lastTick := time.Now(), time.Now()
	for {
		if s.invalid != nil {
			// Another runner took over, or the windows are not whole: stop without
			// saving.
			it.Stop()
			for range msgs {
			}
			return s.invalid
		}
		var stepping chan struct{}
		if capturing != nil && (len(msgs) == 0 || time.Since(stepsBegun) > time.Second) {
			stepping = always
		}
		select {
		case <-stepping:
			for began := time.Now(); capturing != nil && time.Since(began) < StepTime; {
				if !capturing.Step(CaptureStep) {
					endCapture()
				}
			}
		case <-ctx.Done():
			it.Stop()
			for range msgs {
			}
			return final()
		case err := <-saved:
			savedWith(err)
		case msg, ok := <-msgs:
			if !ok {
				return final()
			}
			lastInput = time.Now()
			s.handle(ctx, msg)
		case now := <-tick.C:
			if s.cfg.Partitions == 0 && now.Sub(lastInput) >= s.cfg.IdleAfter && len(msgs) == 0 {
				since := lastTick
				if lastInput.After(since) {
					since = lastInput
				}
				s.emit(ctx, s.engine.Idle(now.Sub(since)), false)
			}
			lastTick = now
		case rules := <-reloads:
			s.emit(ctx, s.engine.SetRules(rules), false)
			s.log.Info("alert rules reloaded", "rules", len(rules))
		case <-snap.C:
			if saving || capturing != nil {
				continue
			}
			if err := s.settle(ctx); err != nil {
				savedWith(err)
				continue
			}
			p, err := s.cp.Begin(s.engine)
			if err != nil {
				savedWith(fmt.Errorf("alert: save state: %w", err))
				continue
			}
			capturing, capturingSnap, stepsBegun = p, s.head(), time.Now()
		}
	}
}

func (s *stageRun) watch(ctx context.Context, w *configfile.Watcher, reloads chan<- []*Rule) {
	WatchRules(ctx, w, s.cfg.ReloadInterval, s.log, func(result string) { s.m.reloads.WithLabelValues(result).Inc() },
		func(rules []*Rule) {
			select {
			case reloads <- rules:
			case <-ctx.Done():
			}
		})
}

// WatchRules calls apply with the rules of w's file each time it changes, and
// counted with "ok" or "failed". Rules that do not compile are logged and left
// out; a file that does not load keeps the running rules.
func WatchRules(ctx context.Context, w *configfile.Watcher, every time.Duration, log *slog.Logger, counted func(result string), apply func([]*Rule)) {
	w.Run(ctx, every, func(f *configfile.File) {
		rules, err := LoadRules(f)
		var re *RuleError
		if err != nil && !errors.As(err, &re) {
			log.Error("the changed config did not load; the running rules stay", "config", w.Path(), "err", err)
			counted("failed")
			return
		}
		if err != nil {
			log.Error("rules that did not load are left out; the rest run", "err", err)
			counted("failed")
		} else {
			counted("ok")
		}
		apply(rules)
	}, func(err error) {
		log.Error("the changed config did not load; the running rules stay", "config", w.Path(), "err", err)
		counted("failed")
	})
}

func (s *stageRun) handle(ctx context.Context, msg jetstream.Msg) {
	md, err := msg.Metadata()
	if err != nil {
		s.log.Warn("message without metadata", "err", err)
		return
	}
	s.seq = md.Sequence.Stream
	s.m.lastSeq.Set(float64(s.seq))
	replay := s.seq <= s.replay || msg.Headers().Get(alerts.HeaderReplay) == "true"
	part := -1
	if s.cfg.Partitions > 0 {
		if part, err = alerts.RuleInputPartition(msg.Subject()); err == nil && part >= s.cfg.Partitions {
			err = fmt.Errorf("rule input of partition %d, and the workers have %d partitions (SLUICE_PARTITIONS changed without the cut-over of docs/scaling.md?)", part, s.cfg.Partitions)
		}
		if err != nil {
			s.publish(ctx, stage.DeadLetter(Name, msg, err.Error(), s.maxPayload))
			return
		}
		if at := msg.Headers().Get(alerts.HeaderProgress); at != "" {
			t, err := time.Parse(time.RFC3339Nano, at)
			if err != nil {
				s.publish(ctx, stage.DeadLetter(Name, msg, fmt.Sprintf("header %s: %v", alerts.HeaderProgress, err), s.maxPayload))
				return
			}
			s.emit(ctx, s.engine.Progress(part, t), replay)
			return
		}
	}
	if len(s.engine.Rules()) == 0 {
		return
	}
	e, err := events.Unmarshal(msg.Data())
	if err != nil {
		s.publish(ctx, stage.DeadLetter(Name, msg, err.Error(), s.maxPayload))
		return
	}
	var (
		out  []*alerts.Alert
		errs []error
	)
	if part >= 0 {
		out, errs = s.engine.ObserveIn(part, Env(e))
	} else {
		out, errs = s.engine.Observe(Env(e))
	}
	for _, err := range errs {
		s.m.filter.Inc()
		s.log.Debug("expression did not evaluate", "key", e.Key, "err", err)
	}
	s.engine.DrainLate(func(rule string, n int) { s.m.late.WithLabelValues(rule).Add(float64(n)) })
	s.m.maxEvent.Set(float64(s.engine.State().MaxTime.UnixMilli()) / 1e3)
	s.emit(ctx, out, replay)
}

// Env returns what filters see of e.
func Env(e *events.Event) *EventEnv {
	return EnvFor(e, events.AllData())
}

// EnvFor returns what filters see of e, with at least the members of data that f
// names decoded: enough for rules that read no more (DataFields).
func EnvFor(e *events.Event, f events.DataFields) *EventEnv {
	data, _ := e.DecodeDataFields(f)
	return events.NewExprEnv(e, data)
}

// DataFields is what rules read of events' data: the members their filters,
// group_by fields and values name, or all of it (a match rule's annotations see
// data whole).
func DataFields(rules []*Rule) events.DataFields {
	var f events.DataFields
	for _, r := range rules {
		f = f.Union(r.data)
	}
	return f
}

// ChangeMsg is the ALERTS message of an alert change, with MsgID as its
// Nats-Msg-Id.
func ChangeMsg(a *alerts.Alert) (*nats.Msg, error) {
	body, err := json.Marshal(a)
	if err != nil {
		return nil, err
	}
	m := nats.NewMsg(a.Subject())
	m.Header.Set(nats.MsgIdHdr, alerts.MsgID(a))
	m.Data = body
	return m, nil
}

// emit publishes alert changes, leaving out those published before a restart.
func (s *stageRun) emit(ctx context.Context, out []*alerts.Alert, replay bool) {
	if err := s.engine.Err(); err != nil {
		// The windows are not whole (the groups on disk failed): nothing of them is
		// published or saved; the run starts again from the last state saved.
		s.invalid = err
		return
	}
	for _, a := range out {
		a.Replay = replay
		id := alerts.MsgID(a)
		if s.published[id] {
			s.m.skipped.Inc()
			continue
		}
		m, err := ChangeMsg(a)
		if err != nil {
			s.log.Error("encode alert", "rule", a.Rule, "err", err)
			continue
		}
		s.publish(ctx, m)
		s.m.alerts.WithLabelValues(a.Rule, a.Status).Inc()
	}
}

func (s *stageRun) publish(ctx context.Context, m *nats.Msg) {
	if s.invalid != nil {
		return
	}
	if err := s.state.Valid(); err != nil {
		s.invalid = fmt.Errorf("alert: %w", err)
		return
	}
	if err := s.pub.Publish(ctx, m); err != nil {
		s.log.Warn("publish", "subject", m.Subject, "err", err)
	}
}

// save publishes what is pending, then writes the snapshot (captured at once).
func (s *stageRun) save(ctx context.Context) error {
	if err := s.settle(ctx); err != nil {
		return err
	}
	return s.write(ctx)
}

// settle waits (a minute at most) until every change published is stored, and
// notes when.
func (s *stageRun) settle(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := s.pub.Settle(ctx); err != nil {
		return fmt.Errorf("alert: save state: %w", err)
	}
	s.settled = time.Now().UTC()
	return nil
}

// write writes the snapshot. Its SavedAt is when every change up to its position
// was last known published (not when it is written): a restart looks for changes
// published since then, and the snapshot written at start must not move that on
// past what the run before it published.
func (s *stageRun) write(ctx context.Context) error {
	c, err := s.capture()
	if err != nil {
		return err
	}
	return s.store(ctx, c)
}

// captured is a state captured and not yet saved: its checkpoint, and the
// snapshot that will name it.
type captured struct {
	cp   *Capture
	snap snapshot
}

// capture takes the engine's state as of now, and the position it is at.
func (s *stageRun) capture() (captured, error) {
	c, err := s.cp.Capture(s.engine)
	if err != nil {
		return captured{}, fmt.Errorf("alert: save state: %w", err)
	}
	return captured{cp: c, snap: s.head()}, nil
}

// head is the snapshot of the state as of now, its checkpoint to come.
func (s *stageRun) head() snapshot {
	return snapshot{StreamCreated: s.created, Seq: s.seq, ReplayUntil: s.replay, SavedAt: s.settled}
}

// store uploads a captured state's checkpoint and saves the snapshot naming it
// (within a minute). It reads nothing the loop changes: the saver runs it while
// input goes on.
func (s *stageRun) store(ctx context.Context, c captured) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	list, err := c.cp.Upload(ctx)
	if err != nil {
		return fmt.Errorf("alert: save state: %w", err)
	}
	c.snap.Checkpoint = list
	b, err := json.Marshal(c.snap)
	if err != nil {
		return fmt.Errorf("alert: encode state: %w", err)
	}
	if err := s.state.Save(ctx, b); err != nil {
		return fmt.Errorf("alert: save state: %w", err)
	}
	c.cp.Saved(ctx)
	return nil
}
