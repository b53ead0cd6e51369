// Package dlq finds dead letters in ClickHouse (`sluice dlq list|show`) and puts
// them back where they came from (`sluice dlq replay`), recording each replay in
// dead_letter_replays.
package dlq

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/deadletters"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/pipeline"
	"github.com/sluicehq/sluice/streams"
)

// Filter selects dead letters; zero fields select everything.
type Filter struct {
	Stage string
	// Reason matches a part of the reason, whatever its case.
	Reason string
	// Subject is the subject the input was published to: a NATS pattern
	// (events.shop.*, events.>).
	Subject      string
	Since, Until time.Time
	// Seqs are dead letters by their DLQ sequence (stream_seq in dead_letters).
	Seqs  []uint64
	Limit int
}

// Letter is one dead letter, and what its replays became.
type Letter struct {
	Seq          uint64              `json:"seq"`
	Stage        string              `json:"stage"`
	Reason       string              `json:"reason"`
	Subject      string              `json:"subject"`
	ReceivedAt   time.Time           `json:"received_at"`
	SourceStream string              `json:"source_stream"`
	SourceSeq    uint64              `json:"source_seq"`
	Headers      map[string][]string `json:"headers,omitempty"`
	Payload      string              `json:"payload"`
	// PayloadBase64 is the payload's bytes when they are not UTF-8 (which Payload,
	// as JSON text, cannot hold exactly); set by the JSON output.
	PayloadBase64 string   `json:"payload_base64,omitempty"`
	Replays       []Replay `json:"replays,omitempty"`
}

// Replay is one replay of a dead letter and what became of it.
type Replay struct {
	At           time.Time `json:"at"`
	TargetStream string    `json:"target_stream"`
	TargetSeq    uint64    `json:"target_seq"`
	Duplicate    bool      `json:"duplicate"`
	// Outcome: stored (a row in events), dead again (with its reason), or pending
	// (not decided yet, or dropped as a repeat of an event already stored).
	Outcome string `json:"outcome"`
}

// Outcomes of a replay.
const (
	Stored    = "stored"
	DeadAgain = "dead again"
	Pending   = "pending or a repeat"
	Published = "published"
)

// Select reads the dead letters f selects, oldest first, with their replays.
func Select(ctx context.Context, ch driver.Conn, f Filter) ([]Letter, error) {
	var out []Letter
	err := Each(ctx, ch, f, 10_000, func(page []Letter) error {
		out = append(out, page...)
		return nil
	})
	return out, err
}

// position is where a page of dead letters ended, in their order.
type position struct {
	receivedAt time.Time // whole seconds, as stored
	ms         uint16
	seq        uint64
}

// Each calls fn with the dead letters f selects, oldest first, with their
// replays, at most page at a time, until they (or f.Limit) run out or fn fails:
// a replay of millions holds one page in memory.
func Each(ctx context.Context, ch driver.Conn, f Filter, page int, fn func([]Letter) error) error {
	var after *position
	left := f.Limit
	for {
		letters, last, read, err := selectPage(ctx, ch, f, after, page)
		if err != nil {
			return err
		}
		if left > 0 && len(letters) > left {
			letters = letters[:left]
		}
		if len(letters) > 0 {
			if err := history(ctx, ch, letters); err != nil {
				return err
			}
			if err := fn(letters); err != nil {
				return err
			}
		}
		if left > 0 {
			if left -= len(letters); left == 0 {
				return nil
			}
		}
		if read < page {
			return nil
		}
		after = &last
	}
}

// selectPage reads at most n rows of dead_letters after the position after (nil:
// from the first), and returns those f selects, where the rows read ended, and
// how many were read.
func selectPage(ctx context.Context, ch driver.Conn, f Filter, after *position, n int) ([]Letter, position, int, error) {
	var where []string
	var args []any
	if f.Stage != "" {
		where, args = append(where, "stage = ?"), append(args, f.Stage)
	}
	if f.Reason != "" {
		where, args = append(where, "positionCaseInsensitive(reason, ?) > 0"), append(args, f.Reason)
	}
	wildcard := strings.ContainsAny(f.Subject, "*>")
	switch {
	case wildcard:
		// SQL narrows by the pattern's literal start; Go matches the pattern.
		prefix := f.Subject[:strings.IndexAny(f.Subject, "*>")]
		where, args = append(where, "startsWith(nats_subject, ?)"), append(args, prefix)
	case f.Subject != "":
		where, args = append(where, "nats_subject = ?"), append(args, f.Subject)
	}
	if !f.Since.IsZero() {
		where, args = append(where, "received_at >= ?"), append(args, f.Since.UTC().Truncate(time.Second))
	}
	if !f.Until.IsZero() {
		where, args = append(where, "received_at < ?"), append(args, f.Until.UTC().Truncate(time.Second))
	}
	if len(f.Seqs) > 0 {
		where = append(where, "stream_seq IN ("+uintList(f.Seqs)+")")
	}
	if after != nil {
		// After the last row read, in the order below (spelled out: no tuple
		// comparison needed of the server).
		where = append(where, "(received_at > ? OR (received_at = ? AND (received_at_ms > ? OR (received_at_ms = ? AND stream_seq > ?))))")
		args = append(args, after.receivedAt, after.receivedAt, after.ms, after.ms, after.seq)
	}
	q := `SELECT stream_seq, stage, reason, nats_subject, headers, payload, received_at, received_at_ms, source_stream, source_seq
FROM dead_letters`
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY received_at, received_at_ms, stream_seq LIMIT 1 BY stream_seq LIMIT " + strconv.Itoa(n)
	var last position
	rows, err := ch.Query(ctx, q, args...)
	if err != nil {
		return nil, last, 0, fmt.Errorf("dlq: read dead_letters: %w", err)
	}
	defer rows.Close()
	var out []Letter
	read := 0
	for rows.Next() {
		var l Letter
		var headers string
		if err := rows.Scan(&l.Seq, &l.Stage, &l.Reason, &l.Subject, &headers, &l.Payload, &last.receivedAt, &last.ms, &l.SourceStream, &l.SourceSeq); err != nil {
			return nil, last, 0, fmt.Errorf("dlq: read dead_letters: %w", err)
		}
		read++
		last.seq = l.Seq
		if wildcard && !subjectMatches(f.Subject, l.Subject) {
			continue
		}
		l.ReceivedAt = last.receivedAt.UTC().Add(time.Duration(last.ms) * time.Millisecond)
		if headers != "" {
			_ = json.Unmarshal([]byte(headers), &l.Headers)
		}
		out = append(out, l)
	}
	if err := rows.Err(); err != nil {
		return nil, last, 0, fmt.Errorf("dlq: read dead_letters: %w", err)
	}
	return out, last, read, nil
}

// history fills in each letter's replays and their outcomes.
func history(ctx context.Context, ch driver.Conn, letters []Letter) error {
	if len(letters) == 0 {
		return nil
	}
	bySeq := map[uint64]*Letter{}
	seqs := make([]uint64, len(letters))
	for i := range letters {
		bySeq[letters[i].Seq], seqs[i] = &letters[i], letters[i].Seq
	}
	rows, err := ch.Query(ctx, `SELECT dlq_seq, replayed_at, target_stream, target_seq, duplicate FROM dead_letter_replays
WHERE dlq_seq IN (`+uintList(seqs)+`) ORDER BY replayed_at`)
	if err != nil {
		return fmt.Errorf("dlq: read dead_letter_replays: %w", err)
	}
	var targets []uint64
	for rows.Next() {
		var seq uint64
		var r Replay
		var dup uint8
		if err := rows.Scan(&seq, &r.At, &r.TargetStream, &r.TargetSeq, &dup); err != nil {
			rows.Close()
			return fmt.Errorf("dlq: read dead_letter_replays: %w", err)
		}
		r.At, r.Duplicate, r.Outcome = r.At.UTC(), dup == 1, Published
		if r.TargetStream == streams.Events {
			r.Outcome = Pending
			targets = append(targets, r.TargetSeq)
		}
		bySeq[seq].Replays = append(bySeq[seq].Replays, r)
	}
	rows.Close()
	if len(targets) == 0 {
		return nil
	}
	// What each replay into EVENTS became: a row of events, or a new dead letter.
	outcome := map[uint64]string{}
	rows, err = ch.Query(ctx, "SELECT DISTINCT stream_seq FROM events WHERE stream_seq IN ("+uintList(targets)+")")
	if err != nil {
		return fmt.Errorf("dlq: read events: %w", err)
	}
	for rows.Next() {
		var s uint64
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return fmt.Errorf("dlq: read events: %w", err)
		}
		outcome[s] = Stored
	}
	rows.Close()
	rows, err = ch.Query(ctx, "SELECT source_seq, any(reason) FROM dead_letters WHERE source_stream = ? AND source_seq IN ("+uintList(targets)+") GROUP BY source_seq", streams.Events)
	if err != nil {
		return fmt.Errorf("dlq: read dead_letters: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var s uint64
		var reason string
		if err := rows.Scan(&s, &reason); err != nil {
			return fmt.Errorf("dlq: read dead_letters: %w", err)
		}
		if outcome[s] == "" {
			outcome[s] = DeadAgain + ": " + reason
		}
	}
	for i := range letters {
		for j, r := range letters[i].Replays {
			if o := outcome[r.TargetSeq]; o != "" && r.TargetStream == streams.Events {
				letters[i].Replays[j].Outcome = o
			}
		}
	}
	return rows.Err()
}

// Message is what replaying l publishes: its input's subject, payload and headers
// (those the DLQ message carries, when the DLQ stream still holds it; else those
// dead_letters kept), without the dead letter's own headers, marked as a replay of
// it, with a Nats-Msg-Id of the replay's (a second replay within the stream's
// duplicate window is dropped as one) and the input's own id, when it had one, in
// deadletters.HeaderMsgID. The input's key comes from that id or from its payload,
// as it did, so an event that meanwhile landed is dropped as a repeat.
//
// A dead letter whose payload was truncated is not replayed: Message returns an
// error that is ErrTruncated.
func Message(ctx context.Context, js jetstream.JetStream, l Letter) (*nats.Msg, error) {
	if size, ok := l.truncated(); ok {
		return nil, fmt.Errorf("dead letter %d holds only the start of its input (%d of %s bytes: truncated to fit the server's max_payload): %w", l.Seq, len(l.Payload), size, ErrTruncated)
	}
	msg := nats.NewMsg(l.Subject)
	header := nats.Header(l.Headers)
	data := []byte(l.Payload)
	if dlq, err := js.Stream(ctx, streams.DLQ); err == nil {
		if m, err := dlq.GetMsg(ctx, l.Seq); err == nil {
			header, data = m.Header, m.Data
		} else if !errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil, fmt.Errorf("dlq: dead letter %d: %w", l.Seq, err)
		}
	} else if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, fmt.Errorf("dlq: stream %s: %w", streams.DLQ, err)
	}
	keyed := false
	if _, original, err := partition.Parse(l.Subject); err == nil {
		// The keying step's copy (more than one partition): back to the subject the
		// producer used, through EVENTS and the keying step again.
		msg.Subject, keyed = original, true
	}
	for k, v := range header {
		if !own(k) && !(keyed && (k == pipeline.HeaderKey || k == pipeline.HeaderReceived || k == pipeline.HeaderEventsSeq)) {
			msg.Header[k] = v
		}
	}
	// The input's own id, which may be its key, travels as HeaderMsgID (dedup keys
	// by it); the message's id is the replay's, so the stream's duplicate window
	// drops a second replay, not the first.
	msg.Header.Set(deadletters.HeaderReplayOf, strconv.FormatUint(l.Seq, 10))
	msg.Header.Set(nats.MsgIdHdr, deadletters.ReplayID(l.Seq))
	msg.Data = data
	return msg, nil
}

// ErrTruncated is why a dead letter whose payload was truncated is not replayed:
// published again, only the start of its input would be.
var ErrTruncated = errors.New("it cannot be replayed")

// truncated reports whether l's payload is only the start of its input's, and the
// input's size. Dead letters stored before deadletters.HeaderTruncated existed say
// so only in their reason.
func (l Letter) truncated() (string, bool) {
	if v := l.Headers[deadletters.HeaderTruncated]; len(v) > 0 {
		return v[0], true
	}
	var size int
	if i := strings.Index(l.Reason, "(payload truncated from "); i >= 0 {
		if _, err := fmt.Sscanf(l.Reason[i:], "(payload truncated from %d bytes", &size); err == nil {
			return strconv.Itoa(size), true
		}
	}
	return "", false
}

// own tells the dead letter's own headers (and NATS's) from its input's.
func own(h string) bool {
	switch h {
	case deadletters.HeaderReason, deadletters.HeaderStage, deadletters.HeaderSubject, deadletters.HeaderStream,
		deadletters.HeaderStreamSeq, deadletters.HeaderReceivedAt, deadletters.HeaderElement, deadletters.HeaderReplayOf,
		deadletters.HeaderTruncated:
		return true
	}
	return strings.HasPrefix(h, "Nats-")
}

// Record writes replays to dead_letter_replays, one row per published letter. On
// a cluster that is a Distributed table: the insert is synchronous
// (insert_distributed_sync), acknowledged once the rows are on a replica of
// their shard, never queued on the node first.
func Record(ctx context.Context, ch driver.Conn, rows []RecordRow) error {
	if len(rows) == 0 {
		return nil
	}
	var engine string
	if err := ch.QueryRow(ctx, "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = 'dead_letter_replays'").Scan(&engine); err != nil {
		return fmt.Errorf("dlq: record replays: %w", err)
	}
	if engine == "Distributed" {
		ctx = clickhouse.Context(ctx, clickhouse.WithSettings(clickhouse.Settings{"insert_distributed_sync": 1}))
	}
	batch, err := ch.PrepareBatch(ctx, "INSERT INTO dead_letter_replays (dlq_seq, replayed_at, nats_subject, target_stream, target_seq, duplicate)")
	if err != nil {
		return fmt.Errorf("dlq: record replays: %w", err)
	}
	for _, r := range rows {
		dup := uint8(0)
		if r.Duplicate {
			dup = 1
		}
		if err := batch.Append(r.Seq, r.At.UTC().Truncate(time.Second), r.Subject, r.Stream, r.TargetSeq, dup); err != nil {
			return fmt.Errorf("dlq: record replays: %w", err)
		}
	}
	if err := batch.Send(); err != nil {
		return fmt.Errorf("dlq: record replays: %w", err)
	}
	return nil
}

// RecordRow is one replay to record.
type RecordRow struct {
	Seq       uint64
	At        time.Time
	Subject   string
	Stream    string
	TargetSeq uint64
	Duplicate bool
}

// uintList is numbers as an SQL list (bound as one parameter, a slice is an Array,
// which ClickHouse 18.16's IN does not take).
func uintList(ns []uint64) string {
	parts := make([]string, len(ns))
	for i, n := range ns {
		parts[i] = strconv.FormatUint(n, 10)
	}
	return strings.Join(parts, ",")
}

// subjectMatches tells whether subject matches the NATS pattern.
func subjectMatches(pattern, subject string) bool {
	p, s := strings.Split(pattern, "."), strings.Split(subject, ".")
	for i, tok := range p {
		if tok == ">" {
			return len(s) > i
		}
		if i >= len(s) || (tok != "*" && tok != s[i]) {
			return false
		}
	}
	return len(p) == len(s)
}
