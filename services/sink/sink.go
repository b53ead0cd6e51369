// Package sink is the ClickHouse sink: it reads ENRICHED, DLQ and ALERTS and inserts
// them in batches into the events, dead_letters and alerts tables, acking each
// message only after ClickHouse accepted the insert that holds it.
//
// Exactly-once rows: every row stores its message's stream sequence (stream_seq).
// A message JetStream delivers for the first time (NumDelivered = 1) cannot be in the
// table yet; a redelivered one may be (the sink crashed, or lost the connection,
// after an insert and before the acks). Before inserting a batch that holds
// redelivered messages, the sink reads the stream_seq values of their range from
// the table and skips those already there. See docs/exactly-once.md.
package sink

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/crash"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// Name is the stage's name in logs, metrics and dead letters.
const Name = "sink"

// Config bounds the batches.
type Config struct {
	// MaxRows is the most rows one batch (one pull, one insert) holds; keep it at or
	// under the consumer's max_ack_pending.
	MaxRows int
	// FlushInterval is how long a pull waits for MaxRows before the batch is flushed
	// with what came.
	FlushInterval time.Duration
	// InsertTimeout bounds one insert.
	InsertTimeout time.Duration
	// Tables are the names of the tables to fill (default: all of TableNames). A
	// platform whose events the pipeline service writes leaves out events.
	Tables []string
	// Typed are the typed tables of SLUICE_CONFIG (NewTypedTables), filled with
	// events: only when Tables holds events.
	Typed []*TypedTable
	// Crash is fault injection for the crash tests; the zero value in production.
	Crash crash.Injection
}

// DefaultConfig gives about two inserts per second per table under high load and
// a flush within 500 ms under low load.
func DefaultConfig() Config {
	return Config{MaxRows: 100_000, FlushInterval: 500 * time.Millisecond, InsertTimeout: 60 * time.Second}
}

// Deps are what the sink needs from its host.
type Deps struct {
	NATS       *nats.Conn
	ClickHouse driver.Conn
	// Shards, on a ClickHouse cluster (chconn.OpenShards): the sink writes to
	// the local tables of the first shard (partition 0's, as the pipeline's
	// layout with one partition would); nil: one server, ClickHouse.
	Shards     *chconn.Shards
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// Ready reports readiness by condition name.
	Ready *telemetry.Readiness
}

type metrics struct {
	rows     *prometheus.CounterVec
	replays  *prometheus.CounterVec
	errors   *prometheus.CounterVec
	dead     *prometheus.CounterVec
	batch    *prometheus.HistogramVec
	latency  *prometheus.HistogramVec
	e2e      *prometheus.HistogramVec
	fromTime *prometheus.HistogramVec
	lag      *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	return &metrics{
		rows: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_sink_rows_inserted_total", Help: "Rows inserted into ClickHouse, by table.",
		}, []string{"table"})),
		replays: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_sink_replays_recognised_total", Help: "Redelivered messages whose row was already in the table, acked without inserting.",
		}, []string{"table"})),
		errors: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_sink_insert_errors_total", Help: "Failed inserts, by table and kind (server: ClickHouse refused; connection: it could not be reached or timed out; check: the replay check failed).",
		}, []string{"table", "kind"})),
		dead: telemetry.Register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "sluice_sink_dead_letters_total", Help: "Messages the sink could not turn into rows, sent to the DLQ.",
		}, []string{"table"})),
		batch: telemetry.Register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "sluice_sink_batch_rows", Help: "Rows per insert.", Buckets: prometheus.ExponentialBuckets(1, 4, 10),
		}, []string{"table"})),
		latency: telemetry.Register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "sluice_sink_insert_seconds", Help: "Time an insert took.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}, []string{"table"})),
		e2e: telemetry.Register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "sluice_sink_publish_to_row_seconds", Help: "From the message's publish to the sink's stream to the end of the insert that holds its row.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 18),
		}, []string{"table"})),
		fromTime: telemetry.Register(reg, prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "sluice_sink_event_time_to_row_seconds", Help: "From the row's own time (event time, alert start, dead letter arrival) to the end of its insert.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 24),
		}, []string{"table"})),
		lag: telemetry.Register(reg, prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "sluice_sink_consumer_lag", Help: "Messages in the stream not yet delivered to the sink's consumer, as of the last batch.",
		}, []string{"table"})),
	}
}

// Prepare applies the migrations where the writers write — conn's server, or
// every node of shards' cluster — then creates or extends the typed tables there
// (MigrateTyped), and returns shards (OneServer(conn) when nil) and the target
// (the cluster, conn's database and the typed tables' names).
func Prepare(ctx context.Context, conn driver.Conn, shards *chconn.Shards, typed []*TypedTable, log *slog.Logger) (*chconn.Shards, chmigrate.Target, error) {
	if shards == nil {
		shards = chconn.OneServer(conn)
	}
	target := chmigrate.Target{Cluster: shards.Cluster}
	for _, t := range typed {
		target.Typed = append(target.Typed, t.Name)
	}
	if err := conn.QueryRow(ctx, "SELECT currentDatabase()").Scan(&target.Database); err != nil {
		return nil, target, err
	}
	if err := chmigrate.MigrateTo(ctx, conn, target, log); err != nil {
		return nil, target, err
	}
	for _, t := range typed {
		if err := MigrateTyped(ctx, conn, target, t); err != nil {
			return nil, target, err
		}
	}
	return shards, target, nil
}

// Run applies the migrations, checks the tables, and fills them until ctx is done.
func Run(ctx context.Context, cfg Config, deps Deps) error {
	var typed []*TypedTable
	if slices.Contains(cfg.Tables, "events") || len(cfg.Tables) == 0 {
		typed = cfg.Typed
	}
	shards, target, err := Prepare(ctx, deps.ClickHouse, deps.Shards, typed, deps.Logger)
	if err != nil {
		return fmt.Errorf("sink: %w", err)
	}
	tables, err := selectTables(cfg.Tables)
	if err != nil {
		return err
	}
	for _, t := range tables {
		if err := CheckColumns(ctx, deps.ClickHouse, t); err != nil {
			return err
		}
	}
	js, err := jetstream.New(deps.NATS)
	if err != nil {
		return err
	}
	if slices.ContainsFunc(tables, func(t *Table) bool { return t.Name == "events" }) {
		for _, t := range cfg.Typed {
			if err := ensureTypedConsumer(ctx, js, t); err != nil {
				return err
			}
			tables = append(tables, t.Table)
		}
	}
	m := newMetrics(deps.Registerer)
	var wg sync.WaitGroup
	errs := make([]error, len(tables))
	for i, t := range tables {
		into := *t
		into.Name = target.LocalName(t.Name)
		w := &writer{cfg: cfg, table: t, into: &into, replicas: shards.Replicas(0), js: js, ch: shards.For(0), m: m, ready: deps.Ready,
			maxPayload: deps.NATS.MaxPayload(), log: deps.Logger.With("stage", Name, "table", t.Name)}
		wg.Go(func() { errs[i] = w.run(ctx) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// ensureTypedConsumer creates the durable consumer of a typed table on ENRICHED:
// the events sink's settings under the table's name. A new one reads ENRICHED from
// its start, so a table added later is filled with the events ENRICHED still holds.
func ensureTypedConsumer(ctx context.Context, js jetstream.JetStream, t *TypedTable) error {
	topo, err := streams.Load()
	if err != nil {
		return err
	}
	base, ok := topo.Consumer(streams.Enriched, EventsTable().Consumer)
	if !ok {
		return fmt.Errorf("sink: the topology has no consumer %s on %s", EventsTable().Consumer, streams.Enriched)
	}
	cc := *base
	cc.Durable, cc.Name, cc.Description = t.Consumer, "", "fills the typed table "+t.Name
	if _, err := js.Consumer(ctx, streams.Enriched, t.Consumer); err == nil {
		return nil
	}
	return streams.Retry(ctx, func(ctx context.Context) error {
		_, err := js.CreateConsumer(ctx, streams.Enriched, cc)
		if errors.Is(err, jetstream.ErrConsumerExists) {
			return nil
		}
		return err
	})
}

// selectTables returns the tables named (all for none).
func selectTables(names []string) ([]*Table, error) {
	all := Tables()
	if len(names) == 0 {
		return all, nil
	}
	var out []*Table
	for _, n := range names {
		i := slices.IndexFunc(all, func(t *Table) bool { return t.Name == n })
		if i < 0 {
			return nil, fmt.Errorf("sink: no table %q (the sink fills %s)", n, strings.Join(TableNames(), ", "))
		}
		out = append(out, all[i])
	}
	return out, nil
}

// CheckColumns refuses a table that lacks a column the sink writes, or has it with
// another type.
func CheckColumns(ctx context.Context, conn driver.Conn, t *Table) error {
	rows, err := conn.Query(ctx, "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = ?", t.Name)
	if err != nil {
		return fmt.Errorf("sink: read columns of %s: %w", t.Name, err)
	}
	defer rows.Close()
	have := map[string]string{}
	for rows.Next() {
		var name, typ string
		if err := rows.Scan(&name, &typ); err != nil {
			return fmt.Errorf("sink: read columns of %s: %w", t.Name, err)
		}
		have[name] = typ
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("sink: read columns of %s: %w", t.Name, err)
	}
	var problems []string
	for _, c := range t.Columns {
		typ, ok := have[c.Name]
		switch {
		case !ok:
			problems = append(problems, fmt.Sprintf("column %s is missing (want %s)", c.Name, c.Type))
		case typ != c.Type && typ != "LowCardinality("+c.Type+")":
			problems = append(problems, fmt.Sprintf("column %s is %s (want %s)", c.Name, typ, c.Type))
		}
	}
	if len(problems) > 0 {
		return fmt.Errorf("sink: table %s does not match what the sink writes: %s", t.Name, strings.Join(problems, "; "))
	}
	return nil
}

type writer struct {
	cfg   Config
	table *Table
	// into is table as inserted into and read: itself, or on a cluster its local
	// table on the shard ch reaches, whose replicas (nil on one server) are
	// where the checks read (ReadReplica).
	into       *Table
	replicas   []driver.Conn
	js         jetstream.JetStream
	ch         driver.Conn
	m          *metrics
	ready      *telemetry.Readiness
	maxPayload int64
	log        *slog.Logger
	// ackWait is the consumer's; a batch still in work is kept from redelivery by
	// InProgress at a third of it.
	ackWait time.Duration
	// hwm is the highest stream sequence known to be in the table, read when the
	// writer starts and after each reconnection to NATS (hwmGen), raised by inserts.
	hwm     uint64
	hwmGen  uint64
	hwmRead bool
}

func (w *writer) run(ctx context.Context) error {
	// Asked again while JetStream does not answer in time (a server just restarted).
	cons, err := streams.OpenConsumer(ctx, w.js, w.table.Stream, w.table.Consumer)
	if err != nil {
		return fmt.Errorf("sink %s: consumer %s on %s: %w", w.table.Name, w.table.Consumer, w.table.Stream, err)
	}
	w.ackWait = cons.CachedInfo().Config.AckWait
	w.ready.Set("table "+w.table.Name, nil)
	// Inserts outlive ctx so a stop flushes what was fetched.
	insertCtx := context.WithoutCancel(ctx)
	for ctx.Err() == nil {
		if !w.js.Conn().IsConnected() {
			pause(ctx, w.cfg.FlushInterval)
			continue
		}
		if err := w.refreshHighWater(ctx); err != nil {
			if ctx.Err() == nil {
				w.m.errors.WithLabelValues(w.table.Name, "check").Inc()
				w.ready.Set("table "+w.table.Name, err)
				w.log.Warn("high-water mark", "err", err)
				pause(ctx, w.cfg.FlushInterval)
			}
			continue
		}
		// One pull per batch: every message in it was delivered after fetched, which
		// bounds how long its ack timer has run (see insert).
		fetched := time.Now()
		res, err := cons.Fetch(w.cfg.MaxRows, jetstream.FetchMaxWait(w.cfg.FlushInterval))
		if err != nil {
			w.log.Warn("pull", "err", err)
			pause(ctx, w.cfg.FlushInterval)
			continue
		}
		batch := make([]jetstream.Msg, 0, 1024)
		for msg := range res.Messages() {
			batch = append(batch, msg)
		}
		if err := res.Error(); err != nil && !errors.Is(err, nats.ErrTimeout) {
			w.log.Warn("pull", "err", err)
		}
		if len(batch) > 0 && w.js.Conn().Stats().Reconnects != w.hwmGen {
			// Reconnected during the pull: the server may have lost its state, and
			// the mark is not read for it yet. Give the batch back; it returns
			// redelivered, and is checked, after the wait for the new mark.
			for _, msg := range batch {
				_ = msg.Nak()
			}
			continue
		}
		if len(batch) > 0 {
			w.flush(insertCtx, ctx, batch, fetched)
		}
	}
	return nil
}

// pause waits d or until ctx is done.
func pause(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// flush inserts batch and acks it, or naks it all. It never returns an error: a
// failure is retried through redelivery. runCtx only bounds the pause after a
// failure.
func (w *writer) flush(ctx, runCtx context.Context, batch []jetstream.Msg, fetched time.Time) {
	name := w.table.Name
	stopHeartbeat := w.heartbeat(batch)
	defer stopHeartbeat()
	rows := make([][]any, 0, len(batch))
	times := make([]time.Time, 0, len(batch))
	inserted := make([]jetstream.Msg, 0, len(batch))
	var (
		done     []jetstream.Msg
		rejected []rejectedMsg
		suspects []suspect // rows that may be in the table already
	)
	for i, msg := range batch {
		md, err := msg.Metadata()
		if err != nil {
			rejected = append(rejected, rejectedMsg{msg, "message without JetStream metadata: " + err.Error()})
			continue
		}
		if i == len(batch)-1 {
			w.m.lag.WithLabelValues(name).Set(float64(md.NumPending))
		}
		seq := md.Sequence.Stream
		row, err := w.table.Row(msg, seq)
		if errors.Is(err, ErrNoRow) {
			done = append(done, msg)
			continue
		}
		if err != nil {
			rejected = append(rejected, rejectedMsg{msg, fmt.Sprintf("cannot be a row of %s: %v", name, err)})
			continue
		}
		if md.NumDelivered > 1 || seq <= w.hwm {
			suspects = append(suspects, suspect{seq: seq, identity: w.table.identity(row.Values), row: len(rows)})
		}
		rows = append(rows, row.Values)
		times = append(times, row.Time)
		inserted = append(inserted, msg)
	}
	if len(suspects) > 0 {
		present, err := w.present(ctx, suspects)
		if err != nil {
			w.fail(runCtx, batch, "check", err)
			return
		}
		if len(present) > 0 {
			keep := 0
			for i := range rows {
				if present[i] {
					w.m.replays.WithLabelValues(name).Inc()
					done = append(done, inserted[i])
					continue
				}
				rows[keep], times[keep], inserted[keep] = rows[i], times[i], inserted[i]
				keep++
			}
			rows, times, inserted = rows[:keep], times[:keep], inserted[:keep]
		}
	}
	if len(rows) > 0 {
		w.cfg.Crash.At(crash.BeforeInsert)
		w.cfg.Crash.At(crash.DuringInsert)
		start := time.Now()
		refused, err := w.insertIsolating(ctx, rows, &timers{batch: batch, since: fetched})
		if err != nil {
			// Rows a bisection already inserted are recognised when the batch returns.
			w.fail(runCtx, batch, errorKind(err), err)
			return
		}
		w.cfg.Crash.At(crash.AfterInsert)
		for _, msg := range inserted {
			if md, err := msg.Metadata(); err == nil {
				w.hwm = max(w.hwm, md.Sequence.Stream)
			}
		}
		now := time.Now()
		w.m.latency.WithLabelValues(name).Observe(now.Sub(start).Seconds())
		w.m.batch.WithLabelValues(name).Observe(float64(len(rows) - len(refused)))
		w.m.rows.WithLabelValues(name).Add(float64(len(rows) - len(refused)))
		e2e, fromTime := w.m.e2e.WithLabelValues(name), w.m.fromTime.WithLabelValues(name)
		for i, msg := range inserted {
			if _, bad := refused[i]; bad {
				continue
			}
			if md, err := msg.Metadata(); err == nil {
				e2e.Observe(now.Sub(md.Timestamp).Seconds())
			}
			fromTime.Observe(now.Sub(times[i]).Seconds())
		}
		for i, rerr := range refused {
			rejected = append(rejected, rejectedMsg{inserted[i], fmt.Sprintf("ClickHouse refused the row for %s: %v", name, rerr)})
		}
	}
	for _, r := range rejected {
		dl := stage.DeadLetter(Name, r.msg, r.reason, w.maxPayload)
		if _, err := w.js.PublishMsg(ctx, dl); err != nil {
			// Inserted rows are recognised when the batch returns.
			w.fail(runCtx, batch, "dead_letter", err)
			return
		}
		w.m.dead.WithLabelValues(name).Inc()
		done = append(done, r.msg)
	}
	w.ready.Set("table "+name, nil)
	stopHeartbeat()
	for _, msg := range append(inserted, done...) {
		if err := msg.Ack(); err != nil {
			w.log.Warn("ack", "err", err)
		}
	}
}

type rejectedMsg struct {
	msg    jetstream.Msg
	reason string
}

// heartbeat keeps batch from redelivery while it is in work (so a second sink
// replica does not get it while this one inserts), until the returned func is
// called. The func may be called more than once.
func (w *writer) heartbeat(batch []jetstream.Msg) func() {
	if w.ackWait <= 0 {
		return func() {}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(w.ackWait / 3)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				for _, msg := range batch {
					_ = msg.InProgress()
				}
			}
		}
	})
	var once sync.Once
	return func() {
		once.Do(func() {
			close(stop)
			wg.Wait()
		})
	}
}

// rowError is a row the client could not encode.
type rowError struct {
	index int
	err   error
}

func (e *rowError) Error() string { return fmt.Sprintf("row %d: %v", e.index, e.err) }

// dataErrorCodes are ClickHouse errors about the data of an insert, not about the
// server or the table: an insert that fails with one of them is split to find the
// rows at fault.
var dataErrorCodes = map[int32]bool{
	6: true, 27: true, 38: true, 41: true, 53: true, 69: true, 70: true, 72: true,
	117: true, 131: true, 321: true, 349: true, 395: true,
}

func isDataError(err error) bool {
	var ex *clickhouse.Exception
	if errors.As(err, &ex) {
		// A held month's refusal comes as a parse error, and is the server's
		// state, not the rows' fault: retried whole.
		return dataErrorCodes[ex.Code] && !strings.Contains(ex.Message, heldMonth)
	}
	var re *rowError
	return errors.As(err, &re)
}

// insertIsolating inserts rows (see Isolate).
func (w *writer) insertIsolating(ctx context.Context, rows [][]any, t *timers) (map[int]error, error) {
	return Isolate(rows, func(rows [][]any) error { return w.insert(ctx, rows, t) }, func(n int, err error) {
		w.log.Warn("ClickHouse refused a batch for its data; isolating the rows at fault", "rows", n, "err", err)
	})
}

// Isolate inserts rows with insert. When ClickHouse refuses them for their data, it
// splits them in halves until it has inserted every row it accepts, and returns the
// refused rows by index with ClickHouse's error; refusedBatch is told of each
// split. Any other error is returned as is; some halves may then be inserted
// already (a replay check must find them).
func Isolate[R any](rows []R, insert func([]R) error, refusedBatch func(rows int, err error)) (map[int]error, error) {
	err := insert(rows)
	if err == nil {
		return nil, nil
	}
	if !isDataError(err) {
		return nil, err
	}
	if len(rows) == 1 {
		return map[int]error{0: err}, nil
	}
	refusedBatch(len(rows), err)
	half := len(rows) / 2
	refused := map[int]error{}
	for _, part := range []struct {
		offset int
		rows   []R
	}{{0, rows[:half]}, {half, rows[half:]}} {
		r, err := Isolate(part.rows, insert, refusedBatch)
		if err != nil {
			return nil, err
		}
		for i, e := range r {
			refused[part.offset+i] = e
		}
	}
	return refused, nil
}

// timers tracks the ack timers of a batch: JetStream started them no earlier than
// since.
type timers struct {
	batch []jetstream.Msg
	since time.Time
}

// insert inserts rows, which come from t.batch, and ends (committed or cancelled)
// before half the ack wait has passed since the batch's ack timers (re)started. So it
// ends at least ack_wait/2 before JetStream could hand the messages to another
// replica, whose replay check then sees the rows. When less than a quarter of the
// ack wait would be left, it first renews the timers (InProgress) and confirms that
// the server has the renewals.
func (w *writer) insert(ctx context.Context, rows [][]any, t *timers) error {
	timeout := w.cfg.InsertTimeout
	if w.ackWait > 0 && t != nil {
		left := time.Until(t.since.Add(w.ackWait / 2))
		if left < w.ackWait/4 {
			renewed := time.Now()
			for _, msg := range t.batch {
				if err := msg.InProgress(); err != nil {
					return fmt.Errorf("renew ack timers before inserting into %s: %w", w.table.Name, err)
				}
			}
			// A round trip after the InProgress publishes means the server has them.
			if err := w.js.Conn().FlushTimeout(5 * time.Second); err != nil {
				return fmt.Errorf("renew ack timers before inserting into %s: %w", w.table.Name, err)
			}
			t.since = renewed
			left = w.ackWait / 2
		}
		timeout = min(timeout, left)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return Insert(ctx, w.ch, w.into, rows)
}

// Insert inserts rows into t in one batch.
func Insert(ctx context.Context, ch driver.Conn, t *Table, rows [][]any) error {
	if t.Columnar {
		return insertColumns(ctx, ch, t, rows, nil)
	}
	b, err := ch.PrepareBatch(ctx, t.InsertSQL())
	if err != nil {
		return fmt.Errorf("prepare insert into %s: %w", t.Name, err)
	}
	defer b.Abort()
	for i, row := range rows {
		if err := b.Append(row...); err != nil {
			return fmt.Errorf("append to %s: %w", t.Name, &rowError{index: i, err: err})
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("insert into %s: %w", t.Name, err)
	}
	return nil
}

// insertBlockRows is how many rows InsertEvents sends as one block. An insert of
// more sends several blocks, and the server squashes them into one part, so the
// table sees one insert while the driver reuses one block's column buffers instead
// of growing them to the whole batch (most of the pipeline's garbage, before). The
// driver's buffers are new for each insert and grow to one block: at 512 rows (not
// 2,048) an insert at half load, about 1,400 rows, allocates about half as much
// (docs/benchmarks.md, twenty-eighth session).
const insertBlockRows = 512

// keepInsertWhole makes the server squash all of an insert's blocks into one part
// (its thresholds, min_insert_block_size_rows and _bytes, a million rows and 256
// MiB by default, would otherwise write a part each time one is passed): the
// insert is stored whole or not at all, as when it was one block.
func keepInsertWhole(ctx context.Context) context.Context {
	return clickhouse.Context(ctx, clickhouse.WithSettings(wholeInsertSettings()))
}

// wholeInsertSettings are thresholds no insert reaches (current ClickHouse takes at
// most 2^32 rows for the first).
func wholeInsertSettings() clickhouse.Settings {
	return clickhouse.Settings{"min_insert_block_size_rows": 1 << 32, "min_insert_block_size_bytes": 1 << 62}
}

// InsertEvents inserts the rows of c into events in one INSERT, column by column,
// insertBlockRows at a time.
func InsertEvents(ctx context.Context, ch driver.Conn, c *EventColumns) error {
	return insertEvents(ctx, ch, c, insertBlockRows, "", nil)
}

// InsertEventsInto inserts the rows of c as InsertEvents does, into table, a table
// with events' columns (a shadow table of `sluice replay`).
func InsertEventsInto(ctx context.Context, ch driver.Conn, table string, c *EventColumns) error {
	return insertEvents(ctx, ch, c, insertBlockRows, table, nil)
}

// InsertEventsFenced inserts the rows of c as InsertEvents does, through f
// (events_fenced): the server stores them only while f's generation is its
// partition's newest.
func InsertEventsFenced(ctx context.Context, ch driver.Conn, c *EventColumns, f *Fence) error {
	return insertEvents(f.Context(ctx), ch, c, insertBlockRows, "", fencingOf(f, c))
}

// fencing is what an insert through events_fenced adds to its rows: each row's
// partition and generation, and the insert's deduplication token (none: "").
type fencing struct {
	parts []uint32
	gens  []uint64
	token string
}

// fencingOf is the fencing of c's rows, all inserted through f.
func fencingOf(f *Fence, c *EventColumns) *fencing {
	fz := &fencing{parts: make([]uint32, 0, c.Len()), gens: make([]uint64, 0, c.Len())}
	fz.add(f, c.Len())
	if f.tokens {
		fz.token = f.token(c)
	}
	return fz
}

// add gives the next n rows f's partition and generation.
func (fz *fencing) add(f *Fence, n int) {
	for range n {
		fz.parts, fz.gens = append(fz.parts, f.Partition), append(fz.gens, f.Gen)
	}
}

// insertEvents inserts c into events (or table, when set), through events_fenced
// when fz is set.
func insertEvents(ctx context.Context, ch driver.Conn, c *EventColumns, blockRows int, table string, fz *fencing) error {
	t := EventsTable()
	name, names := cmp.Or(table, t.Name), t.columnNames()
	if fz != nil {
		name, names = fencedEvents, append(names, "partition", "gen")
	}
	settings := wholeInsertSettings()
	if fz != nil && fz.token != "" {
		// A retry of these rows (the same token) is stored once, in events and
		// through the fence's view (docs/exactly-once.md).
		settings["insert_deduplication_token"] = fz.token
		settings["deduplicate_blocks_in_dependent_materialized_views"] = 1
	}
	ctx = clickhouse.Context(ctx, clickhouse.WithSettings(settings))
	b, err := ch.PrepareBatch(ctx, "INSERT INTO "+name+" ("+strings.Join(names, ", ")+")")
	if err != nil {
		return fmt.Errorf("prepare insert into %s: %w", name, err)
	}
	defer b.Abort()
	for lo := 0; lo < c.Len(); lo += blockRows {
		if lo > 0 {
			if err := b.Flush(); err != nil {
				return fmt.Errorf("insert into %s: %w", name, err)
			}
		}
		hi := min(lo+blockRows, c.Len())
		cols := c.columns(lo, hi)
		if fz != nil {
			cols = append(cols, fz.parts[lo:hi], fz.gens[lo:hi])
		}
		for i, col := range cols {
			if err := b.Column(i).Append(col); err != nil {
				return fmt.Errorf("append to %s.%s: %w", name, names[i], err)
			}
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("insert into %s: %w", name, err)
	}
	return nil
}

// suspect is a row that may be in the table already: its message was delivered
// before, or its sequence is at or below the table's high-water mark.
type suspect struct {
	seq      uint64
	identity string
	row      int // index in the batch's rows
}

// present returns which rows (by index) are in the table already: a row with the
// same stream sequence and, where the table has one, the same identity (the event
// key, the alert fingerprint), so a sequence JetStream reused after losing the end
// of a stream is not taken for a replay.
func (w *writer) present(ctx context.Context, suspects []suspect) (map[int]bool, error) {
	lo, hi := suspects[0].seq, suspects[0].seq
	bySeq := make(map[uint64]suspect, len(suspects))
	for _, s := range suspects {
		lo, hi = min(lo, s.seq), max(hi, s.seq)
		bySeq[s.seq] = s
	}
	identity := "''"
	if w.table.Identity != "" {
		identity = w.table.Identity
	}
	ctx, cancel := context.WithTimeout(ctx, w.cfg.InsertTimeout)
	defer cancel()
	rd, err := ReadReplica(ctx, w.ch, w.replicas, w.into.Name)
	if err != nil {
		return nil, err
	}
	found, err := Present(ctx, rd, w.into.Name, identity, lo, hi)
	if err != nil {
		return nil, err
	}
	out := map[int]bool{}
	for seq, ids := range found {
		if s, ok := bySeq[seq]; ok && slices.Contains(ids, s.identity) {
			out[s.row] = true
		}
	}
	return out, nil
}

// Present returns the rows of table with stream_seq from lo to hi: their identities
// (a String expression) by stream_seq. A sequence has more than one row where one
// message held a batch of events (the pipeline's events rows).
func Present(ctx context.Context, ch driver.Conn, table, identity string, lo, hi uint64) (map[uint64][]string, error) {
	q := "SELECT stream_seq, " + identity + " FROM " + table + " WHERE stream_seq >= " + strconv.FormatUint(lo, 10) + " AND stream_seq <= " + strconv.FormatUint(hi, 10)
	rows, err := ch.Query(ctx, q)
	if err != nil {
		return nil, fmt.Errorf("replay check on %s: %w", table, err)
	}
	defer rows.Close()
	out := map[uint64][]string{}
	for rows.Next() {
		var (
			seq uint64
			id  string
		)
		if err := rows.Scan(&seq, &id); err != nil {
			return nil, fmt.Errorf("replay check on %s: %w", table, err)
		}
		out[seq] = append(out[seq], id)
	}
	return out, rows.Err()
}

// ReadReplica is where a read that must see every insert acknowledged in a shard
// goes: on one server (replicas nil) ch; on a cluster the first of the shard's
// replicas that fetched every part of table the shard's log holds (SYSTEM SYNC
// REPLICA), through its own connection, so that the read reaches that replica and
// not whichever one a failing-over connection picks next. A sync waits, and fails
// when ctx ends, while such a part's only copy is on a replica that is down.
func ReadReplica(ctx context.Context, ch driver.Conn, replicas []driver.Conn, table string) (driver.Conn, error) {
	if replicas == nil {
		return ch, nil
	}
	var errs []error
	for _, rc := range replicas {
		err := rc.Exec(ctx, "SYSTEM SYNC REPLICA "+table)
		if err == nil {
			return rc, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("sync replica %s: no replica of the shard is in sync: %w", table, errors.Join(errs...))
}

// refreshHighWater reads the highest stream sequence in the table when this writer
// has not read it since it (re)connected to NATS. JetStream keeps a consumer's
// delivery state in memory between flushes, so after the server crashes it can
// deliver again, as if for the first time, messages this sink (or another) already
// inserted; every message at or below the mark is checked.
//
// Another replica may still be inserting a batch it fetched before the server
// crashed, and JetStream may have handed that batch to this one already. An insert
// ends within half an ack wait of the batch's last contact with the server (its
// fetch or a confirmed renewal), so the mark is read only after waiting that long
// from the (re)connection: by then such inserts are in the table, under the mark.
// (The combined fault test found rows inserted twice without the wait.)
func (w *writer) refreshHighWater(ctx context.Context) error {
	gen := w.js.Conn().Stats().Reconnects
	if w.hwmRead && gen == w.hwmGen {
		return nil
	}
	if settle := w.ackWait / 2; settle > 0 {
		why := "at start"
		if w.hwmRead {
			why = "after reconnecting to NATS"
		}
		w.log.Info("waiting for inserts another replica may still be making before reading the table's high-water mark", "when", why, "wait", settle)
		pause(ctx, settle)
		if err := ctx.Err(); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, w.cfg.InsertTimeout)
	defer cancel()
	rd, err := ReadReplica(ctx, w.ch, w.replicas, w.into.Name)
	if err != nil {
		return err
	}
	var hwm uint64
	if err := rd.QueryRow(ctx, "SELECT max(stream_seq) FROM "+w.into.Name).Scan(&hwm); err != nil {
		return fmt.Errorf("high-water mark of %s: %w", w.into.Name, err)
	}
	w.hwm, w.hwmGen, w.hwmRead = max(w.hwm, hwm), gen, true
	return nil
}

// fail naks the whole batch with a backoff and pauses this writer as long.
func (w *writer) fail(ctx context.Context, batch []jetstream.Msg, kind string, err error) {
	w.m.errors.WithLabelValues(w.table.Name, kind).Inc()
	w.ready.Set("table "+w.table.Name, err)
	delivered := uint64(1)
	if md, mdErr := batch[0].Metadata(); mdErr == nil {
		delivered = md.NumDelivered
	}
	delay := stage.Backoff(delivered)
	w.log.Warn("insert failed; will retry", "rows", len(batch), "retry_in", delay, "err", err)
	for _, msg := range batch {
		_ = msg.NakWithDelay(delay)
	}
	pause(ctx, delay)
}

func errorKind(err error) string {
	var ex *clickhouse.Exception
	if errors.As(err, &ex) {
		return "server"
	}
	return "connection"
}
