package cli

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/deadletters"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/sluice/dlq"
	"github.com/sluicehq/sluice/services/sluice/status"
)

// dlqFlags are the filters list and replay share.
type dlqFlags struct {
	f            dlq.Filter
	since, until string
	seqs         string
}

func bindDLQFilter(fs *flag.FlagSet, d *dlqFlags, limit int) {
	fs.StringVar(&d.f.Stage, "stage", "", "only this stage's dead letters (pipeline, sink, notify, ...)")
	fs.StringVar(&d.f.Reason, "reason", "", "only those whose reason contains this text (any case)")
	fs.StringVar(&d.f.Subject, "subject", "", "only those published to subjects matching this NATS pattern (events.shop.>)")
	fs.StringVar(&d.since, "since", "", "only those received since: an RFC 3339 time, or a duration ago (24h)")
	fs.StringVar(&d.until, "until", "", "only those received before: an RFC 3339 time, or a duration ago")
	fs.StringVar(&d.seqs, "seq", "", "only these dead letters, by DLQ sequence (comma-separated; the SEQ column)")
	fs.IntVar(&d.f.Limit, "limit", limit, "at most this many (0: no limit)")
}

// filter completes the filter from the flags.
// open is the filter of d as of now and a connection to ClickHouse (the caller
// closes it).
func (d *dlqFlags) open(ctx context.Context, chs settings.ClickHouse) (dlq.Filter, driver.Conn, error) {
	f, err := d.filter(time.Now())
	if err != nil {
		return f, nil, err
	}
	ch, err := chconn.Open(ctx, chs)
	return f, ch, err
}

func (d *dlqFlags) filter(now time.Time) (dlq.Filter, error) {
	f := d.f
	var err error
	if f.Since, err = when(d.since, now); err != nil {
		return f, fmt.Errorf("--since: %w", err)
	}
	if f.Until, err = when(d.until, now); err != nil {
		return f, fmt.Errorf("--until: %w", err)
	}
	if !f.Since.IsZero() && !f.Until.IsZero() && !f.Until.After(f.Since) {
		return f, fmt.Errorf("--until %s is not after --since %s: no dead letter is in between", d.until, d.since)
	}
	for s := range strings.SplitSeq(d.seqs, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return f, fmt.Errorf("--seq %q: want DLQ sequences, comma-separated", d.seqs)
		}
		f.Seqs = append(f.Seqs, n)
	}
	if f.Limit < 0 {
		return f, errors.New("--limit must be 0 (no limit) or more")
	}
	return f, nil
}

// selective tells whether the filter selects anything less than everything.
func (d *dlqFlags) selective() bool {
	return d.f.Stage != "" || d.f.Reason != "" || d.f.Subject != "" || d.since != "" || d.until != "" || d.seqs != ""
}

// when reads a time: RFC 3339, or a duration before now; zero for "".
func when(s string, now time.Time) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	if d, err := time.ParseDuration(s); err == nil {
		if d < 0 {
			return time.Time{}, fmt.Errorf("%q: a duration is how long ago, so not below zero (%s)", s, -d)
		}
		return now.Add(-d), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither an RFC 3339 time nor a duration", s)
	}
	return t, nil
}

func dlqList(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("dlq list", flag.ContinueOnError)
	var chs settings.ClickHouse
	settings.BindClickHouse(fs, io.Env, &chs)
	var d dlqFlags
	bindDLQFilter(fs, &d, 100)
	asJSON := fs.Bool("json", false, "print each dead letter as a JSON line, payload and replays included")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	f, ch, err := d.open(ctx, chs)
	if err != nil {
		return err
	}
	defer ch.Close()
	letters, err := dlq.Select(ctx, ch, f)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(io.Stdout)
		for _, l := range letters {
			if !utf8.ValidString(l.Payload) {
				// JSON strings hold text: the bytes that are not become U+FFFD.
				l.PayloadBase64 = base64.StdEncoding.EncodeToString([]byte(l.Payload))
			}
			if err := enc.Encode(l); err != nil {
				return err
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(io.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SEQ\tRECEIVED\tSTAGE\tSUBJECT\tREPLAYED\tREASON")
	for _, l := range letters {
		replayed := "-"
		if n := len(l.Replays); n > 0 {
			replayed = fmt.Sprintf("%d× (%s)", n, l.Replays[n-1].Outcome)
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\n", l.Seq, l.ReceivedAt.Format(time.RFC3339), l.Stage, status.Printable(l.Subject), status.OneLine(replayed, 60), status.OneLine(l.Reason, 120))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Fprintf(io.Stdout, "%d dead letter(s); `sluice dlq show SEQ` for one in full\n", len(letters))
	return nil
}

func dlqShow(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("dlq show", flag.ContinueOnError)
	var chs settings.ClickHouse
	settings.BindClickHouse(fs, io.Env, &chs)
	positional, err := parsePositional(fs, args, io)
	if err != nil {
		return err
	}
	if len(positional) == 0 {
		fmt.Fprintln(io.Stderr, "usage: sluice dlq show SEQ...  (the SEQ column of sluice dlq list)")
		return errUsage
	}
	var f dlq.Filter
	for _, s := range positional {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return fmt.Errorf("dlq show: %q is not a DLQ sequence", s)
		}
		f.Seqs = append(f.Seqs, n)
	}
	ch, err := chconn.Open(ctx, chs)
	if err != nil {
		return err
	}
	defer ch.Close()
	letters, err := dlq.Select(ctx, ch, f)
	if err != nil {
		return err
	}
	if len(letters) < len(f.Seqs) {
		return fmt.Errorf("dlq show: %d of %d not in dead_letters", len(f.Seqs)-len(letters), len(f.Seqs))
	}
	for _, l := range letters {
		input := fmt.Sprintf("%s sequence %d", l.SourceStream, l.SourceSeq)
		if l.SourceStream == "" {
			input = "not stored in a stream (refused before it reached one)"
		}
		// What a producer sent is shown with its control characters escaped.
		p := status.Printable
		fmt.Fprintf(io.Stdout, "dead letter %d\n  stage:    %s\n  reason:   %s\n  subject:  %s\n  received: %s\n  input:    %s\n",
			l.Seq, p(l.Stage), p(l.Reason), p(l.Subject), l.ReceivedAt.Format(time.RFC3339Nano), input)
		for _, k := range slices.Sorted(maps.Keys(l.Headers)) {
			fmt.Fprintf(io.Stdout, "  header:   %s: %s\n", p(k), p(strings.Join(l.Headers[k], ", ")))
		}
		fmt.Fprintf(io.Stdout, "  payload:  %s\n", status.PrintableLines(l.Payload))
		if !utf8.ValidString(l.Payload) {
			fmt.Fprintf(io.Stdout, "  (the payload is not UTF-8: bytes that are not are shown as \\xNN; `dlq list --seq %d --json` has it in base64)\n", l.Seq)
		}
		for _, r := range l.Replays {
			dup := ""
			if r.Duplicate {
				dup = " (dropped by the stream's duplicate window)"
			}
			fmt.Fprintf(io.Stdout, "  replayed: %s to %s sequence %d%s: %s\n", r.At.Format(time.RFC3339), r.TargetStream, r.TargetSeq, dup, r.Outcome)
		}
	}
	return nil
}

func dlqReplay(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("dlq replay", flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	var chs settings.ClickHouse
	settings.BindClickHouse(fs, io.Env, &chs)
	var configPath string
	settings.BindConfig(fs, io.Env, &configPath)
	var d dlqFlags
	bindDLQFilter(fs, &d, 0)
	all := fs.Bool("all", false, "replay every dead letter (without a filter, replay refuses to)")
	dryRun := fs.Bool("dry-run", false, "show what each would be published as, and what the ingest step of SLUICE_CONFIG makes of it now; publish nothing")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	if !d.selective() && !*all {
		return errors.New("dlq replay: select dead letters (--stage, --reason, --subject, --since, --until, --seq) or pass --all")
	}
	f, ch, err := d.open(ctx, chs)
	if err != nil {
		return err
	}
	defer ch.Close()
	js, closeNATS, err := connectJS(n, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	if *dryRun {
		h, _, err := ingestHandler(configPath)
		if err != nil {
			return err
		}
		if configPath == "" {
			fmt.Fprintln(io.Stdout, "no config file: each is judged by CloudEvents alone, without ingest mappings (set SLUICE_CONFIG or --config to the pipeline's)")
		}
		return dlq.Each(ctx, ch, f, replayPage, func(letters []dlq.Letter) error { return dlqDryRun(ctx, js, h, letters, io) })
	}
	// Each is published and acknowledged, then recorded (a batch at a time): an
	// interrupted replay leaves every dead letter in place, and running it again
	// publishes each with the same id and key (dropped where it already landed).
	var record []dlq.RecordRow
	published, duplicates, truncated := 0, 0, 0
	flush := func() error {
		err := dlq.Record(context.WithoutCancel(ctx), ch, record)
		record = record[:0]
		return err
	}
	err = dlq.Each(ctx, ch, f, replayPage, func(letters []dlq.Letter) error {
		for _, l := range letters {
			msg, err := dlq.Message(ctx, js, l)
			if errors.Is(err, dlq.ErrTruncated) {
				truncated++
				fmt.Fprintf(io.Stdout, "not replayed: %v\n", err)
				continue
			}
			if err != nil {
				return err
			}
			pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			ack, err := js.PublishMsg(pctx, msg)
			cancel()
			if err != nil {
				return fmt.Errorf("dlq replay: dead letter %d to %s: %w", l.Seq, l.Subject, err)
			}
			published++
			if ack.Duplicate {
				duplicates++
			}
			record = append(record, dlq.RecordRow{Seq: l.Seq, At: time.Now(), Subject: msg.Subject, Stream: ack.Stream, TargetSeq: ack.Sequence, Duplicate: ack.Duplicate})
			if len(record) == 100 {
				if err := flush(); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err := errors.Join(err, flush()); err != nil {
		return err
	}
	fmt.Fprintf(io.Stdout, "replayed %d dead letter(s)", published)
	if duplicates > 0 {
		fmt.Fprintf(io.Stdout, ", %d dropped by their stream's duplicate window (replayed, or published with that id, within it; try again after it)", duplicates)
	}
	if truncated > 0 {
		fmt.Fprintf(io.Stdout, "; %d not replayed (their payload was truncated)", truncated)
	}
	fmt.Fprintln(io.Stdout, "; `sluice dlq list --seq ...` shows what became of them")
	return nil
}

// replayPage is how many dead letters replay reads (and holds) at a time.
const replayPage = 500

// dlqDryRun shows what replaying letters would publish and, for events, what the
// ingest step h (of the config) makes of each now.
func dlqDryRun(ctx context.Context, js jetstream.JetStream, h *dedup.Handler, letters []dlq.Letter, io IO) error {
	for _, l := range letters {
		msg, err := dlq.Message(ctx, js, l)
		if errors.Is(err, dlq.ErrTruncated) {
			fmt.Fprintf(io.Stdout, "would not replay: %v\n", err)
			continue
		}
		if err != nil {
			return err
		}
		id := ""
		if orig := msg.Header.Get(deadletters.HeaderMsgID); orig != "" {
			id = ", the input's Nats-Msg-Id " + orig
		}
		fmt.Fprintf(io.Stdout, "dead letter %d: would publish to %s (%d bytes, Nats-Msg-Id %s%s)\n", l.Seq, msg.Subject, len(msg.Data), msg.Header.Get(nats.MsgIdHdr), id)
		if !strings.HasPrefix(msg.Subject, "events.") {
			continue
		}
		h.DecideAll(events.Message{Subject: msg.Subject, Header: msg.Header, Data: msg.Data, Received: time.Now().UTC()}, func(d dedup.Decision) {
			at := "  now"
			if d.Element != nil {
				at = fmt.Sprintf("  now, element %d", d.Element.Index)
			}
			if d.Invalid != nil {
				fmt.Fprintf(io.Stdout, "%s: dead letter again: %v\n", at, d.Invalid)
				return
			}
			fmt.Fprintf(io.Stdout, "%s: accepted (key %s; dropped as a repeat if that event landed meanwhile)\n", at, d.Event.Key)
		})
	}
	fmt.Fprintf(io.Stdout, "%d dead letter(s); nothing published (--dry-run)\n", len(letters))
	return nil
}
