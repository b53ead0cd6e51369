// Package reprocess re-runs the pipeline's enrichment on a range of EVENTS with the
// current configuration and replaces the rows of events it changes, a month (a
// partition of the table) at a time, while live ingestion goes on: `sluice replay`.
//
// For each month it holds the month (events_holds: the pipeline's fenced inserts of
// the month's rows fail and are retried meanwhile), copies the month's other rows
// into a shadow table, adds the rebuilt rows, checks that the shadow has exactly
// as many rows as the month, and swaps it in with ALTER TABLE events REPLACE
// PARTITION (the table's merges stopped), atomically: a plain SELECT count() sees
// each event once throughout.
// The rows of events a run does not replace are untouched; an interrupted run
// leaves the table as it was (the hold ends by itself) or with some months done.
//
// On a ClickHouse cluster it does the same per shard, on the shard's local table
// (events_local) through one replica that has fetched every part its shard holds
// (SYSTEM SYNC REPLICA): the hold is fetched by every replica of the shard before
// the swap, the shadow is a plain MergeTree table on that replica, and the swap (a
// replicated REPLACE PARTITION) reaches the other replicas through the shard's log.
package reprocess

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/maphash"
	"iter"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go/jetstream"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/sink"
	"github.com/sluicehq/sluice/streams"
)

// Range is a range of EVENTS: from a sequence or a time (inclusive), to a
// sequence or a time (inclusive); zero values are the stream's first and last.
type Range struct {
	FromSeq, ToSeq   uint64
	FromTime, ToTime time.Time
}

// Config is what a reprocessing run needs.
type Config struct {
	Range Range
	// Handler decodes, validates and keys events as the pipeline does (the ingest
	// and dedup sections of the config; no store: it decides no repeats).
	Handler *dedup.Handler
	// Enrich is the current enrichment.
	Enrich *enrich.Live
	// HoldTTL is how long a month's hold lasts unrenewed (renewed every third of it).
	HoldTTL time.Duration
	// Chunk is how many events are rebuilt and replaced at a time (their rows are
	// held in memory).
	Chunk int
	// Rules, if any, are evaluated afresh on the range's stored events, in stream
	// order; the alert changes they raise are published to ALERTS marked replay
	// (notify sends them only to receivers with send_replayed).
	Rules []*alert.Rule
	// DryRun rebuilds and compares, and replaces and publishes nothing.
	DryRun bool
	Log    *slog.Logger
}

// Report is what a run found and did.
type Report struct {
	// Messages read from EVENTS, and the events in them; Invalid could not be
	// events rows (dead letters then, or now under the current config).
	Messages, Events, Invalid int
	// Missing have no row in events (repeats, dead letters, not stored yet);
	// Ambiguous have more than one (stored again after their dedup window), and
	// Moved an event time other than their row's (the config reads it differently
	// now): both are left as they are.
	Missing, Ambiguous, Moved int
	// Months are the months of the rows found, in order.
	Months []Month
	// Alerts are the alert changes the rules raised (published unless a dry run).
	Alerts int
}

// Month is one month's part of a run.
type Month struct {
	Month uint32 // YYYYMM
	// Rows found for the range's events; Changed the rows whose rebuilt values
	// differ (data, enrichment and its columns); Replaced is Changed, unless a dry
	// run (0).
	Rows, Changed, Replaced int
}

func (r *Report) month(m uint32) *Month {
	i, found := slices.BinarySearchFunc(r.Months, m, func(x Month, m uint32) int { return int(x.Month) - int(m) })
	if !found {
		r.Months = slices.Insert(r.Months, i, Month{Month: m})
	}
	return &r.Months[i]
}

// tablePrefix names the tables a run makes (and drops).
const tablePrefix = "sluice_replay_"

// syncTimeout bounds the wait for a replica of a shard that holds all the shard's
// rows, on a cluster.
const syncTimeout = time.Minute

// Run reprocesses cfg.Range: reads it from EVENTS, rebuilds each event's row with
// the current configuration, and replaces the rows that changed. shards are where
// the events rows are: one server (chconn.OneServer) or a cluster's shards.
func Run(ctx context.Context, js jetstream.JetStream, shards *chconn.Shards, cfg Config) (Report, error) {
	var rep Report
	if cfg.Chunk <= 0 || cfg.HoldTTL <= 0 {
		return rep, errors.New("reprocess: chunk and hold TTL must be positive")
	}
	if !cfg.DryRun {
		if err := splitSinkIdle(ctx, js); err != nil {
			return rep, err
		}
	}
	run, err := newRun(shards, cfg)
	if err != nil {
		return rep, err
	}
	defer run.dropTables(context.WithoutCancel(ctx))
	if !cfg.DryRun {
		run.startMerges(ctx)
	}
	chunk := map[string]sink.EventRecord{}
	// The keys of the run so far, by a 64-bit hash (a few tens of bytes each in the
	// map, not the key itself): a repeat in a later chunk is no first occurrence
	// either. A collision only leaves an event out of the run (counted as missing).
	seen, seed := map[uint64]struct{}{}, maphash.MakeSeed()
	var rules *ruleRun
	if len(cfg.Rules) > 0 {
		rules = &ruleRun{engine: alert.NewEngine(cfg.Rules, nil), read: alert.DataFields(cfg.Rules), envs: map[string]*alert.EventEnv{}}
	}
	flush := func() error {
		if len(chunk) == 0 {
			return nil
		}
		stored, err := run.replace(ctx, chunk, &rep)
		if err == nil && rules != nil {
			err = rules.observe(ctx, js, stored, cfg.DryRun, &rep)
		}
		clear(chunk)
		return err
	}
	err = read(ctx, js, cfg.Range, func(msg jetstream.Msg, md *jetstream.MsgMetadata) error {
		rep.Messages++
		cfg.Handler.DecideAll(events.Message{Subject: msg.Subject(), Header: msg.Headers(), Data: msg.Data(), Received: md.Timestamp}, func(d dedup.Decision) {
			if d.Invalid != nil {
				rep.Invalid++
				return
			}
			e := d.Event
			_, _ = e.DecodeDataFields(cfg.Enrich.DataFields())
			cfg.Enrich.Enrich(e)
			rec, err := sink.EventRecordOf(e, 0)
			if err != nil {
				rep.Invalid++
				return
			}
			rep.Events++
			h := maphash.String(seed, rec.Key)
			if _, repeat := seen[h]; !repeat { // a repeat: its first is the stored one
				seen[h] = struct{}{}
				chunk[rec.Key] = rec
				if rules != nil {
					rules.order = append(rules.order, rec.Key)
					rules.envs[rec.Key] = alert.EnvFor(e, rules.read)
				}
			}
		})
		if len(chunk) >= cfg.Chunk {
			return flush()
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	return rep, err
}

// splitSinkIdle fails while the split stages' sink reads ENRICHED (a pull waiting
// or messages it has not acked): it inserts events rows without the fence, so not
// held off a month; its insert between a swap's count and the swap would be lost.
// With it stopped its pulls expire within about 30 s, and its input waits in
// ENRICHED. No such consumer (or none reading it for a second): nil.
func splitSinkIdle(ctx context.Context, js jetstream.JetStream) error {
	t := sink.EventsTable()
	cons, err := js.Consumer(ctx, t.Stream, t.Consumer)
	if errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reprocess: consumer %s of %s: %w", t.Consumer, t.Stream, err)
	}
	// A sink between two fetches has no pull waiting for a moment: looked at
	// several times over a second.
	var info *jetstream.ConsumerInfo
	for look := range 5 {
		if look > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(200 * time.Millisecond):
			}
		}
		if info, err = cons.Info(ctx); err != nil {
			return fmt.Errorf("reprocess: consumer %s of %s: %w", t.Consumer, t.Stream, err)
		}
		if info.NumWaiting > 0 || info.NumAckPending > 0 {
			break
		}
	}
	if info.NumWaiting > 0 || info.NumAckPending > 0 {
		return fmt.Errorf("reprocess: the split stages' sink is reading %s (consumer %s: %d pull(s) waiting, %d message(s) not acked): it inserts events without the fence, so a month's hold does not hold it off, and an insert of it during a swap would be lost; stop the sink service while replaying (its input waits in %s; its pulls end within about 30 s)",
			t.Stream, t.Consumer, info.NumWaiting, info.NumAckPending, t.Stream)
	}
	return nil
}

// run is one run's tables and where they are.
type run struct {
	cfg Config
	id  string
	// events is the table the rows are in (events, or events_local on a
	// cluster); engine the shadow's engine clause on a cluster (on one server
	// the shadow copies events' own).
	events, engine string
	shards         []*shard
}

// shard is one shard of the events table (the only one on one server).
type shard struct {
	n        int // 1-based, for messages
	conn     driver.Conn
	replicas []driver.Conn // nil on one server
	// rd is the replica the run reads and swaps on (conn on one server), chosen
	// synced for each chunk; used is every connection the run made tables through.
	rd   driver.Conn
	used []driver.Conn
}

func newRun(shards *chconn.Shards, cfg Config) (*run, error) {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	target := chmigrate.Target{Cluster: shards.Cluster}
	r := &run{cfg: cfg, id: hex.EncodeToString(b), events: target.LocalName("events")}
	if shards.Cluster != "" {
		ms, err := chmigrate.Migrations()
		if err != nil {
			return nil, fmt.Errorf("reprocess: %w", err)
		}
		if r.engine, err = chmigrate.PlainEngine(ms, "events"); err != nil {
			return nil, fmt.Errorf("reprocess: %w", err)
		}
	}
	// Shard i is partition i's (partition modulo the shards).
	for i := range shards.Count() {
		r.shards = append(r.shards, &shard{n: i + 1, conn: shards.For(i), replicas: shards.Replicas(i)})
	}
	return r, nil
}

// read calls fn for each message of EVENTS in r, in order.
func read(ctx context.Context, js jetstream.JetStream, r Range, fn func(jetstream.Msg, *jetstream.MsgMetadata) error) error {
	stream, err := js.Stream(ctx, streams.Events)
	if err != nil {
		return fmt.Errorf("reprocess: stream %s: %w", streams.Events, err)
	}
	info := stream.CachedInfo()
	last := info.State.LastSeq
	if r.ToSeq > 0 {
		last = min(last, r.ToSeq)
	}
	if info.State.Msgs == 0 || last < max(r.FromSeq, info.State.FirstSeq) {
		return nil
	}
	oc := jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverAllPolicy}
	switch {
	case !r.FromTime.IsZero():
		oc.DeliverPolicy, oc.OptStartTime = jetstream.DeliverByStartTimePolicy, &r.FromTime
	case r.FromSeq > 0:
		oc.DeliverPolicy, oc.OptStartSeq = jetstream.DeliverByStartSequencePolicy, r.FromSeq
	}
	cons, err := js.OrderedConsumer(ctx, streams.Events, oc)
	if err != nil {
		return fmt.Errorf("reprocess: read %s: %w", streams.Events, err)
	}
	// A start time after the last message: nothing would ever come.
	ci, err := cons.Info(ctx)
	if err != nil {
		return fmt.Errorf("reprocess: read %s: %w", streams.Events, err)
	}
	if ci.NumPending == 0 {
		return nil
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("reprocess: read %s: %w", streams.Events, err)
	}
	defer it.Stop()
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	for {
		msg, err := it.Next()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("reprocess: read %s: %w", streams.Events, err)
		}
		md, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("reprocess: read %s: %w", streams.Events, err)
		}
		seq := md.Sequence.Stream
		if seq > last || (!r.ToTime.IsZero() && md.Timestamp.After(r.ToTime)) {
			return nil
		}
		if err := fn(msg, md); err != nil {
			return err
		}
		if seq == last {
			return nil
		}
	}
}

// stored is a row of events found for a rebuilt one.
type stored struct {
	shard *shard
	month uint32
	seq   uint64
	time  time.Time
	// values are the ones a rebuild may change, as compareKey renders them.
	values string
}

// compared are the columns a rebuild may change: data (masks), enrichment and
// the columns made from it.
const compared = "concat(data, '\\x00', enrichment, '\\x00', geo_country, '\\x00', toString(geo_asn), '\\x00', geo_as_org, '\\x00', ua_browser, '\\x00', ua_os, '\\x00', ua_device)"

func compareKey(r *sink.EventRecord) string {
	return strings.Join([]string{r.Data, r.Enrichment, r.GeoCountry, fmt.Sprint(r.GeoASN), r.GeoASOrg, r.UABrowser, r.UAOS, r.UADevice}, "\x00")
}

// replace finds the rows of chunk's events, and replaces those whose rebuilt
// values differ, month by month (and shard by shard on a cluster).
//
// It returns the keys that have a row: the events the pipeline stored.
func (r *run) replace(ctx context.Context, chunk map[string]sink.EventRecord, rep *Report) (map[string]bool, error) {
	candidates, keys := tablePrefix+r.id+"_candidates", tablePrefix+r.id+"_keys"
	found, hasRow, ambiguous := map[string]stored{}, map[string]bool{}, map[string]bool{}
	for _, sh := range r.shards {
		// A replica that holds every row its shard acknowledged (it waits while
		// a part's only copy is on a replica that is down).
		sctx, cancel := context.WithTimeout(ctx, syncTimeout)
		rd, err := sink.ReadReplica(sctx, sh.conn, sh.replicas, r.events)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("reprocess: shard %d: %w", sh.n, err)
		}
		sh.rd = rd
		if !slices.Contains(sh.used, rd) {
			sh.used = append(sh.used, rd)
		}
		if err := fillKeys(ctx, rd, candidates, maps.Keys(chunk)); err != nil {
			return nil, err
		}
		rows, err := rd.Query(ctx, "SELECT key, any(toYYYYMM(event_time)), any(stream_seq), any(event_time), any("+compared+"), count() FROM "+r.events+" WHERE key IN (SELECT key FROM "+candidates+") GROUP BY key")
		if err != nil {
			return nil, fmt.Errorf("reprocess: rows of the range: %w", err)
		}
		for rows.Next() {
			var (
				key string
				s   stored
				n   uint64
			)
			if err := rows.Scan(&key, &s.month, &s.seq, &s.time, &s.values, &n); err != nil {
				rows.Close()
				return nil, fmt.Errorf("reprocess: rows of the range: %w", err)
			}
			s.shard = sh
			if n > 1 || hasRow[key] { // more than one row, here or on two shards
				ambiguous[key] = true
			}
			hasRow[key] = true
			found[key] = s
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, fmt.Errorf("reprocess: rows of the range: %w", err)
		}
	}
	for key := range ambiguous {
		delete(found, key)
	}
	rep.Ambiguous += len(ambiguous)
	rep.Missing += len(chunk) - len(hasRow)
	// The changed rows of each month and shard, with their stored stream_seq.
	type part struct {
		month uint32
		shard *shard
	}
	changed := map[part][]*sink.EventRecord{}
	for key, s := range found {
		m := rep.month(s.month)
		m.Rows++
		rec := chunk[key]
		if !rec.EventTime.Equal(s.time) {
			// Its row would belong to another month: the swap of this one would
			// lose it.
			rep.Moved++
			continue
		}
		if compareKey(&rec) == s.values {
			continue
		}
		m.Changed++
		rec.StreamSeq = s.seq
		p := part{s.month, s.shard}
		changed[p] = append(changed[p], &rec)
	}
	if r.cfg.DryRun {
		return hasRow, nil
	}
	parts := slices.SortedFunc(maps.Keys(changed), func(a, b part) int {
		if a.month != b.month {
			return int(a.month) - int(b.month)
		}
		return a.shard.n - b.shard.n
	})
	for _, p := range parts {
		recs := changed[p]
		if err := fillKeys(ctx, p.shard.rd, keys, func(yield func(string) bool) {
			for _, rec := range recs {
				if !yield(rec.Key) {
					return
				}
			}
		}); err != nil {
			return nil, err
		}
		if err := r.swapMonth(ctx, p.shard, p.month, keys, recs); err != nil {
			return nil, err
		}
		rep.month(p.month).Replaced += len(recs)
		r.cfg.Log.Info("replaced the changed rows of a month", "month", p.month, "shard", p.shard.n, "rows", len(recs))
	}
	return hasRow, nil
}

// fillKeys makes table anew (a Memory table of keys) with keys in it.
func fillKeys(ctx context.Context, ch driver.Conn, table string, keys iter.Seq[string]) error {
	if err := ch.Exec(ctx, "DROP TABLE IF EXISTS "+table); err != nil {
		return fmt.Errorf("reprocess: %w", err)
	}
	if err := ch.Exec(ctx, "CREATE TABLE "+table+" (key String) ENGINE = Memory"); err != nil {
		return fmt.Errorf("reprocess: %w", err)
	}
	b, err := ch.PrepareBatch(ctx, "INSERT INTO "+table+" (key)")
	if err != nil {
		return fmt.Errorf("reprocess: %w", err)
	}
	defer func() { _ = b.Abort() }()
	if err := b.Column(0).Append(slices.Collect(keys)); err != nil {
		return fmt.Errorf("reprocess: %w", err)
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("reprocess: keys: %w", err)
	}
	return nil
}

// swapMonth replaces the rows of keys (in table keys) in month of sh by recs,
// under a hold of the month on the shard.
func (r *run) swapMonth(ctx context.Context, sh *shard, month uint32, keys string, recs []*sink.EventRecord) (err error) {
	cfg := r.cfg
	hold, err := sink.HoldMonthOn(ctx, sh.rd, sh.replicas, month, r.id, cfg.HoldTTL)
	if err != nil {
		return fmt.Errorf("reprocess: shard %d: %w", sh.n, err)
	}
	// Renewed until the swap is over; released then, whatever happened.
	renewCtx, stopRenew := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(cfg.HoldTTL / 3)
		defer t.Stop()
		for {
			select {
			case <-renewCtx.Done():
				return
			case <-t.C:
				if err := hold.Renew(renewCtx); err != nil && renewCtx.Err() == nil {
					cfg.Log.Warn("renew the hold of a month", "month", month, "shard", sh.n, "err", err)
				}
			}
		}
	})
	defer func() {
		stopRenew()
		wg.Wait()
		if rerr := hold.Release(context.WithoutCancel(ctx)); rerr != nil {
			err = errors.Join(err, fmt.Errorf("reprocess: release month %d (it ends by itself within %s): %w", month, cfg.HoldTTL, rerr))
		}
	}()
	shadow := tablePrefix + r.id + "_shadow"
	p := fmt.Sprint(month)
	stmts := []string{
		"DROP TABLE IF EXISTS " + shadow,
		"CREATE TABLE " + shadow + " AS " + r.events + " " + r.engine,
		"INSERT INTO " + shadow + " SELECT * FROM " + r.events + " WHERE toYYYYMM(event_time) = " + p + " AND key NOT IN (SELECT key FROM " + keys + ")",
	}
	if sh.replicas != nil {
		// The rows of the month the other replicas took before the hold.
		stmts = append([]string{"SYSTEM SYNC REPLICA " + r.events}, stmts...)
	}
	for _, q := range stmts {
		if err := sh.rd.Exec(ctx, q); err != nil {
			return fmt.Errorf("reprocess: month %d, shard %d: %w", month, sh.n, err)
		}
	}
	var cols sink.EventColumns
	for _, rec := range recs {
		cols.Append(rec)
	}
	if err := sink.InsertEventsInto(ctx, sh.rd, shadow, &cols); err != nil {
		return fmt.Errorf("reprocess: month %d, shard %d: %w", month, sh.n, err)
	}
	check := func() error { return r.readyToSwap(ctx, sh, month, shadow) }
	if err := replacePartition(ctx, sh.rd, r.events, p, shadow, mergesStopWait, check); err != nil {
		return fmt.Errorf("reprocess: month %d, shard %d: %w", month, sh.n, err)
	}
	return sh.rd.Exec(ctx, "DROP TABLE IF EXISTS "+shadow)
}

// readyToSwap is the last check before month's swap (the merges stopped): the
// run's hold is in force for a while yet (its renewals may have failed), and the
// month did not change under it; if it did (an insert not through the pipeline's
// fence, such as the split stages' sink's), the swap would lose rows.
func (r *run) readyToSwap(ctx context.Context, sh *shard, month uint32, shadow string) error {
	var have, want uint64
	var left int64
	p := fmt.Sprint(month)
	q := "SELECT (SELECT count() FROM " + shadow + "), (SELECT count() FROM " + r.events + " WHERE toYYYYMM(event_time) = " + p + "), " +
		"(SELECT toInt64(argMax(until, seq)) - toInt64(now()) FROM events_holds WHERE month = " + p + " AND hold = '" + r.id + "')"
	if err := sh.rd.QueryRow(ctx, q).Scan(&have, &want, &left); err != nil {
		return err
	}
	if time.Duration(left)*time.Second < r.cfg.HoldTTL/4 {
		return fmt.Errorf("the month's hold ends in %ds (its renewals failed?), too soon to swap; nothing replaced", left)
	}
	if have != want {
		return fmt.Errorf("the shadow has %d rows and %s %d: the month changed under the hold (rows inserted other than through the pipeline's fence, such as by the split stages' sink?); nothing replaced", have, r.events, want)
	}
	return nil
}

// mergesStopWait bounds the wait for table's running merges to stop before a swap.
const mergesStopWait = time.Minute

// replacePartition swaps partition of table for shadow's (ALTER TABLE ... REPLACE
// PARTITION) with the table's merges stopped on ch's server, once the merges
// running there ended (waited for up to wait) and check passed. A merge running
// when the swap removes its parts adds its result when it ends, on ClickHouse
// 18.16: the rows it merged come back beside their replacements, each then twice
// (its log says "Unexpected number of parts removed when adding"; seen in CI as a
// month's rows stored twice after a replay). Current ClickHouse stops them itself.
// Merges start again after the swap, whatever its outcome; a run killed in between
// leaves them stopped until the next run (startMerges), `SYSTEM START MERGES` or
// the server's restart.
func replacePartition(ctx context.Context, ch driver.Conn, table, partition, shadow string, wait time.Duration, check func() error) (err error) {
	if err := ch.Exec(ctx, "SYSTEM STOP MERGES "+table); err != nil {
		return fmt.Errorf("stop merges of %s: %w", table, err)
	}
	defer func() {
		if serr := ch.Exec(context.WithoutCancel(ctx), "SYSTEM START MERGES "+table); serr != nil {
			err = errors.Join(err, fmt.Errorf("start merges of %s again (SYSTEM START MERGES %s; a restart of the server does too): %w", table, table, serr))
		}
	}()
	deadline := time.Now().Add(wait)
	for {
		var running uint64
		if err := ch.QueryRow(ctx, "SELECT count() FROM system.merges WHERE database = currentDatabase() AND table = ?", table).Scan(&running); err != nil {
			return fmt.Errorf("running merges of %s: %w", table, err)
		}
		if running == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d merge(s) of %s still running %s after they were stopped; nothing replaced", running, table, wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := check(); err != nil {
		return err
	}
	if err := ch.Exec(ctx, "ALTER TABLE "+table+" REPLACE PARTITION "+partition+" FROM "+shadow); err != nil {
		return fmt.Errorf("swap: %w", err)
	}
	return nil
}

// startMerges starts the events table's merges again on each server of the run's
// shards that holds no month: a run killed during a swap (SIGKILL) left them
// stopped there (replacePartition), and with no hold no run is swapping. A server
// that does not answer is left to the run's holds, which need it (logged).
func (r *run) startMerges(ctx context.Context) {
	for _, sh := range r.shards {
		servers := sh.replicas
		if servers == nil {
			servers = []driver.Conn{sh.conn}
		}
		for i, c := range servers {
			held, err := sink.HeldMonths(ctx, c)
			if err == nil && len(held) > 0 {
				continue
			}
			if err == nil {
				err = c.Exec(ctx, "SYSTEM START MERGES "+r.events)
			}
			if err != nil {
				r.cfg.Log.Warn("start the merges a killed run may have left stopped", "shard", sh.n, "server", i+1, "err", err)
			}
		}
	}
}

// dropTables drops the run's tables wherever it made them.
func (r *run) dropTables(ctx context.Context) {
	for _, sh := range r.shards {
		for _, c := range sh.used {
			for _, suffix := range []string{"_candidates", "_keys", "_shadow"} {
				_ = c.Exec(ctx, "DROP TABLE IF EXISTS "+tablePrefix+r.id+suffix)
			}
		}
	}
}

// ruleRun evaluates the rules on the stored events of the range, in order.
type ruleRun struct {
	engine *alert.Engine
	read   events.DataFields
	// order is the keys of the chunk's events in stream order, envs what the rules
	// see of each.
	order []string
	envs  map[string]*alert.EventEnv
}

// observe runs the rules on the chunk's events that have a row, and publishes
// what they raise marked replay (unless dry).
func (r *ruleRun) observe(ctx context.Context, js jetstream.JetStream, stored map[string]bool, dry bool, rep *Report) error {
	defer func() {
		r.order = r.order[:0]
		clear(r.envs)
	}()
	for _, key := range r.order {
		if !stored[key] {
			continue
		}
		out, _ := r.engine.Observe(r.envs[key]) // a filter that fails on an event does not match it
		r.engine.DrainLate(func(string, int) {})
		for _, a := range out {
			a.Replay = true
			rep.Alerts++
			if dry {
				continue
			}
			msg, err := alert.ChangeMsg(a)
			if err != nil {
				return fmt.Errorf("reprocess: alert %s: %w", a.Rule, err)
			}
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err = js.PublishMsg(pctx, msg)
			cancel()
			if err != nil {
				return fmt.Errorf("reprocess: publish alert %s: %w", a.Rule, err)
			}
		}
	}
	return nil
}
