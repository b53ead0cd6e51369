package dlq_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/dedup/window"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/sluice/cli"
	"github.com/sluicehq/sluice/services/sluice/dlq"
	"github.com/sluicehq/sluice/services/sluice/platform/platformtest"
)

// mapping is an ingest mapping for events.iot.>: raw JSON whose time is in ts, in
// the given format.
func mapping(format string) string {
	return fmt.Sprintf(`ingest:
  mappings:
    - name: iot
      subjects: events.iot.>
      envelope: raw
      id: {field: id}
      type: {value: reading}
      source: {value: iot}
      time: {field: ts, format: %s}
`, format)
}

// A mapping that reads ts as Unix seconds refuses readings whose ts is ISO 8601:
// they are dead letters. `dlq list` finds them by stage, reason and subject; a dry
// run says what the old config and the fixed one make of them; after the fix
// (iso8601) `dlq replay` puts them back and they land once each, keeping their
// keys (one had a Nats-Msg-Id); a second replay adds nothing; one whose ts is no
// time at all fails again with its new reason; the history says all of it.
func TestReplayAfterFix(t *testing.T) {
	dir := t.TempDir()
	config := filepath.Join(dir, "sluice.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(config, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(mapping("unix"))
	p := platformtest.Start(t, config, nil)
	nc, _ := p.Connect(t)
	db := p.DB(t)
	// counts are the rows of events and dead_letters (a failed query counts
	// nothing: the tables come with the platform's start).
	counts := func() (events, dead uint64) {
		t.Helper()
		_ = db.QueryRow(context.Background(), "SELECT (SELECT count() FROM events), (SELECT count() FROM dead_letters)").Scan(&events, &dead)
		return events, dead
	}
	publish := func(subject, body, msgID string) {
		t.Helper()
		m := nats.NewMsg(subject)
		m.Data = []byte(body)
		if msgID != "" {
			m.Header.Set(nats.MsgIdHdr, msgID)
		}
		if err := nc.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
	}
	publish("events.iot.temp", `{"id":"r-0","ts":1764496800,"c":20}`, "")
	for i := 1; i <= 4; i++ {
		publish("events.iot.temp", fmt.Sprintf(`{"id":"r-%d","ts":"2026-11-30T10:00:0%dZ","c":2%d}`, i, i, i), "")
	}
	publish("events.iot.temp", `{"id":"r-5","ts":"2026-11-30T10:00:05Z","c":25}`, "producer-5")
	publish("events.iot.temp", `{"id":"r-6","ts":"yesterday","c":26}`, "")
	publish("events.other.x", `not json`, "") // another subject's dead letter
	poll.Until(t, 2*time.Minute, func() error {
		if e, d := counts(); e != 1 || d != 7 {
			return fmt.Errorf("%d events, %d dead letters", e, d)
		}
		return nil
	})

	ctx := context.Background()
	letters, err := dlq.Select(ctx, db, dlq.Filter{Stage: "pipeline", Reason: "FIELD TS", Subject: "events.iot.>"})
	if err != nil {
		t.Fatal(err)
	}
	if len(letters) != 6 || letters[0].Subject != "events.iot.temp" || !strings.Contains(letters[0].Reason, `mapping "iot"`) {
		t.Fatalf("%d letters: %+v", len(letters), letters)
	}
	if all, _ := dlq.Select(ctx, db, dlq.Filter{}); len(all) != 7 {
		t.Fatalf("no filter: %d letters, want 7", len(all))
	}
	if few, _ := dlq.Select(ctx, db, dlq.Filter{Subject: "events.iot.*", Limit: 2}); len(few) != 2 {
		t.Fatalf("limit 2: %d letters", len(few))
	}
	if exact, _ := dlq.Select(ctx, db, dlq.Filter{Subject: "events.iot.temp", Limit: 3}); len(exact) != 3 || exact[0].Seq != letters[0].Seq {
		t.Fatalf("subject events.iot.temp, limit 3: %+v", exact)
	}
	if none, _ := dlq.Select(ctx, db, dlq.Filter{Subject: "events.iot"}); len(none) != 0 {
		t.Fatalf("subject events.iot: %d letters, want none", len(none))
	}
	// A page at a time: the same letters in the same order, a limit across pages.
	for _, f := range []dlq.Filter{{}, {Subject: "events.iot.*", Limit: 3}, {Stage: "pipeline", Reason: "FIELD TS", Subject: "events.iot.>", Limit: 5}} {
		whole, err := dlq.Select(ctx, db, f)
		if err != nil {
			t.Fatal(err)
		}
		var paged []uint64
		pages := 0
		if err := dlq.Each(ctx, db, f, 2, func(page []dlq.Letter) error {
			pages++
			if len(page) > 2 {
				t.Errorf("a page of %d, want at most 2", len(page))
			}
			for _, l := range page {
				paged = append(paged, l.Seq)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		var want []uint64
		for _, l := range whole {
			want = append(want, l.Seq)
		}
		if fmt.Sprint(paged) != fmt.Sprint(want) || pages < len(want)/2 {
			t.Fatalf("%+v in pages of 2 (%d pages): %v, want %v", f, pages, paged, want)
		}
	}

	env := map[string]string{"NATS_URL": p.NATSURL, "CLICKHOUSE_ADDR": p.ClickHouse.Addr, "SLUICE_CONFIG": config}
	run := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := cli.Main(args, cli.IO{Env: func(k string) (string, bool) { v, ok := env[k]; return v, ok }, Stdout: &out, Stderr: &errOut})
		return code, out.String(), errOut.String()
	}
	if code, out, errOut := run("dlq", "list", "--subject", "events.iot.>"); code != 0 || strings.Count(out, "events.iot.temp") != 6 || !strings.Contains(out, "6 dead letter(s)") {
		t.Fatalf("list: exit %d\n%s%s", code, out, errOut)
	}
	if code, _, errOut := run("dlq", "replay"); code != 1 || !strings.Contains(errOut, "--all") {
		t.Fatalf("replay without a filter: exit %d: %s", code, errOut)
	}
	// A dry run under the config that refused them, and under the fix.
	if code, out, errOut := run("dlq", "replay", "--subject", "events.iot.>", "--dry-run"); code != 0 || strings.Count(out, "dead letter again") != 6 || strings.Contains(out, "no config file") {
		t.Fatalf("dry run, old config: exit %d\n%s%s", code, out, errOut)
	}
	write(mapping("iso8601"))
	code, out, errOut := run("dlq", "replay", "--subject", "events.iot.>", "--dry-run")
	if code != 0 || strings.Count(out, "accepted") != 5 || strings.Count(out, "dead letter again") != 1 || !strings.Contains(out, "the input's Nats-Msg-Id producer-5") {
		t.Fatalf("dry run, fixed config: exit %d\n%s%s", code, out, errOut)
	}
	if e, d := counts(); e != 1 || d != 7 {
		t.Fatalf("a dry run changed something: %d events, %d dead letters", e, d)
	}

	// The fix deployed: the platform restarted with it.
	p.Restart()
	poll.Until(t, 2*time.Minute, func() error {
		if e, _ := counts(); e != 1 {
			return fmt.Errorf("ClickHouse not back yet")
		}
		return nil
	})
	if code, out, errOut := run("dlq", "replay", "--subject", "events.iot.>"); code != 0 || !strings.Contains(out, "replayed 6 dead letter(s)") {
		t.Fatalf("replay: exit %d\n%s%s", code, out, errOut)
	}
	poll.Until(t, 2*time.Minute, func() error {
		if e, d := counts(); e != 6 || d != 8 {
			return fmt.Errorf("%d events, %d dead letters; want 6 and 8", e, d)
		}
		return nil
	})
	// The replays kept their keys: r-5 the one its producer's Nats-Msg-Id gives,
	f, err := configfile.Load(config)
	if err != nil {
		t.Fatal(err)
	}
	in, err := dedup.LoadIngest(f)
	if err != nil {
		t.Fatal(err)
	}
	h, err := dedup.NewHandler(dedup.HandlerConfig{Window: dedup.DefaultWindowConfig(), Ingest: in, Store: window.NewStore(0)})
	if err != nil {
		t.Fatal(err)
	}
	// r-1 kept its own: the one its source and id give.
	for _, c := range []struct {
		id, body, msgID string
	}{
		{"r-5", `{"id":"r-5","ts":"2026-11-30T10:00:05Z","c":25}`, "producer-5"},
		{"r-1", `{"id":"r-1","ts":"2026-11-30T10:00:01Z","c":21}`, ""},
	} {
		header := nats.Header{}
		if c.msgID != "" {
			header.Set(nats.MsgIdHdr, c.msgID)
		}
		var want string
		h.DecideAll(events.Message{Subject: "events.iot.temp", Header: header, Data: []byte(c.body), Received: time.Now()},
			func(d dedup.Decision) { want = d.Event.Key })
		var got string
		if err := db.QueryRow(ctx, "SELECT key FROM events WHERE id = ?", c.id).Scan(&got); err != nil || got != want || want == "" {
			t.Fatalf("%s's key %q (%v), want %q, the key it had as published", c.id, got, err, want)
		}
	}
	// The history: five stored, one dead again with its new reason.
	poll.Until(t, time.Minute, func() error {
		letters, err := dlq.Select(ctx, db, dlq.Filter{Subject: "events.iot.>"})
		if err != nil {
			return err
		}
		stored, again := 0, 0
		for _, l := range letters {
			if len(l.Replays) == 0 {
				continue
			}
			switch o := l.Replays[len(l.Replays)-1].Outcome; {
			case o == dlq.Stored:
				stored++
			case strings.HasPrefix(o, dlq.DeadAgain) && strings.Contains(o, `"yesterday"`):
				again++
			}
		}
		if stored != 5 || again != 1 {
			return fmt.Errorf("%d stored, %d dead again: %+v", stored, again, letters)
		}
		return nil
	})
	// Again: nothing lands twice (the stream's duplicate window, then dedup).
	if code, out, errOut := run("dlq", "replay", "--subject", "events.iot.>", "--reason", "NOT A NUMBER"); code != 0 || !strings.Contains(out, "replayed 6") || !strings.Contains(out, "6 dropped by their stream's duplicate window") {
		t.Fatalf("second replay: exit %d\n%s%s", code, out, errOut)
	}
	var replays uint64
	poll.Until(t, time.Minute, func() error {
		if err := db.QueryRow(ctx, "SELECT count() FROM dead_letter_replays").Scan(&replays); err != nil {
			return err
		}
		if replays != 12 {
			return fmt.Errorf("%d replays recorded, want 12", replays)
		}
		return nil
	})
	if code, out, errOut := run("dlq", "show", fmt.Sprint(letters[4].Seq)); code != 0 || !strings.Contains(out, "producer-5") || strings.Count(out, "replayed:") != 2 ||
		!strings.Contains(out, "(dropped by the stream's duplicate window)") {
		t.Fatalf("show: exit %d\n%s%s", code, out, errOut)
	}
	publish("events.iot.temp", `{"id":"r-7","ts":"2026-11-30T10:00:07Z","c":27}`, "")
	poll.Until(t, 2*time.Minute, func() error {
		if e, _ := counts(); e != 7 {
			return fmt.Errorf("%d events, want 7 (6 and one after the replays)", e)
		}
		return nil
	})
	if e, d := counts(); e != 7 || d != 8 {
		t.Fatalf("after the second replay: %d events, %d dead letters; want 7 and 8", e, d)
	}
}

// A dead letter of the keying step's copy (more than one partition) goes back to
// the producer's subject without the copy's headers; the input's id travels as
// Sluice-Msg-Id and the message's is the replay's. Without the DLQ stream the
// table's row is what is replayed.
func TestMessage(t *testing.T) {
	_, js := natstest.Run(t).Connect(t)
	l := dlq.Letter{Seq: 42, Subject: "partitioned.3.events.shop.order", Payload: `{"id":"o-1"}`, Headers: map[string][]string{
		"Sluice-Key": {"abc"}, "Sluice-Events-Seq": {"7"}, "Sluice-Received": {"2026-11-30T10:00:00Z"},
		"Sluice-Msg-Id": {"producer-1"}, "ce-source": {"shop"}, "Sluice-Reason": {"no"}}}
	msg, err := dlq.Message(context.Background(), js, l)
	if err != nil {
		t.Fatal(err)
	}
	want := nats.Header{"Sluice-Msg-Id": {"producer-1"}, "Ce-Source": {"shop"}, "Sluice-Replay-Of": {"42"}, "Nats-Msg-Id": {"replay:DLQ:42"}}
	got := nats.Header{}
	for k, v := range msg.Header {
		got[http.CanonicalHeaderKey(k)] = v
	}
	if msg.Subject != "events.shop.order" || string(msg.Data) != l.Payload || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%s %q %v; want events.shop.order, the payload, %v", msg.Subject, msg.Data, got, want)
	}
}

// A dead letter whose payload was truncated (its input did not fit max_payload) is
// not replayed: only the start of its input would be. Dead letters stored before
// the Sluice-Truncated header say so in their reason alone.
func TestTruncatedIsNotReplayed(t *testing.T) {
	_, js := natstest.Run(t).Connect(t)
	for _, l := range []dlq.Letter{
		{Seq: 7, Subject: "events.a.b", Payload: `{"id":"x","pad":"xx`, Headers: map[string][]string{"Sluice-Truncated": {"2000000"}}},
		{Seq: 7, Subject: "events.a.b", Payload: `{"id":"x","pad":"xx`, Reason: "invalid event: not valid JSON (payload truncated from 2000000 bytes to fit the server's max_payload)"},
	} {
		_, err := dlq.Message(context.Background(), js, l)
		if !errors.Is(err, dlq.ErrTruncated) || !strings.Contains(err.Error(), "dead letter 7 holds only the start of its input (19 of 2000000 bytes") {
			t.Errorf("%+v: %v; want ErrTruncated", l, err)
		}
	}
}

// `sluice import` makes a line larger than max_payload a dead letter; `dlq list`
// shows it with its stage and reason; `dlq replay` (dry or not) refuses it and
// says why, and publishes nothing.
func TestImportedLineTooLargeIsNotReplayed(t *testing.T) {
	p := platformtest.Start(t, "", nil)
	db := p.DB(t)
	file := filepath.Join(t.TempDir(), "big.jsonl")
	big := `{"specversion":"1.0","id":"big","source":"s","type":"t","data":{"pad":"` + strings.Repeat("x", 1<<21) + `"}}`
	if err := os.WriteFile(file, []byte(`{"specversion":"1.0","id":"small","source":"s","type":"t"}`+"\n"+big+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"NATS_URL": p.NATSURL, "CLICKHOUSE_ADDR": p.ClickHouse.Addr}
	run := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := cli.Main(args, cli.IO{Env: func(k string) (string, bool) { v, ok := env[k]; return v, ok }, Stdout: &out, Stderr: &errOut})
		return code, out.String(), errOut.String()
	}
	if code, out, errOut := run("import", file, "--subject", "events.s.t"); code != 0 {
		t.Fatalf("import: exit %d\n%s%s", code, out, errOut)
	}
	var headers string
	poll.Until(t, 2*time.Minute, func() error {
		var events uint64
		if err := db.QueryRow(context.Background(), "SELECT (SELECT count() FROM events), (SELECT any(headers) FROM dead_letters WHERE stage = 'import')").Scan(&events, &headers); err != nil || events != 1 || headers == "" {
			return fmt.Errorf("%d events (%v), the import's dead letter's headers %q", events, err, headers)
		}
		return nil
	})
	if !strings.Contains(headers, fmt.Sprintf(`"Sluice-Truncated":["%d"]`, len(big))) {
		t.Fatalf("the dead letter's headers: %s", headers)
	}
	code, out, errOut := run("dlq", "list", "--stage", "import", "--json")
	if code != 0 || !strings.Contains(out, "line 2 of "+file+fmt.Sprintf(" is %d bytes, over the NATS server's max_payload", len(big))) {
		t.Fatalf("dlq list: exit %d\n%s%s", code, out, errOut)
	}
	imported, err := dlq.Select(context.Background(), db, dlq.Filter{Stage: "import"})
	if err != nil || len(imported) != 1 {
		t.Fatalf("%v: %d dead letters of the import", err, len(imported))
	}
	if code, out, errOut := run("dlq", "show", fmt.Sprint(imported[0].Seq)); code != 0 || !strings.Contains(out, "input:    not stored in a stream") ||
		!strings.Contains(out, fmt.Sprintf("header:   Sluice-Truncated: %d", len(big))) {
		t.Fatalf("dlq show: exit %d\n%.2000s%s", code, out, errOut)
	}
	_, js := p.Connect(t)
	st, err := js.Stream(context.Background(), "EVENTS")
	if err != nil {
		t.Fatal(err)
	}
	before := st.CachedInfo().State.LastSeq
	for _, args := range [][]string{{"--dry-run"}, {}} {
		code, out, errOut := run(append([]string{"dlq", "replay", "--stage", "import"}, args...)...)
		if code != 0 || !strings.Contains(out, "holds only the start of its input") {
			t.Fatalf("dlq replay %v: exit %d\n%s%s", args, code, out, errOut)
		}
		// Judged without the pipeline's config (none set here): said.
		if judged := strings.Contains(out, "no config file: each is judged by CloudEvents alone"); judged != (len(args) > 0) {
			t.Fatalf("dlq replay %v: the note on the missing config %v:\n%s", args, judged, out)
		}
		if len(args) == 0 && !strings.Contains(out, "replayed 0 dead letter(s); 1 not replayed (their payload was truncated)") {
			t.Fatalf("dlq replay: %s", out)
		}
	}
	info, err := st.Info(context.Background())
	if err != nil || info.State.LastSeq != before {
		t.Fatalf("%v: the replays published %d messages to EVENTS", err, info.State.LastSeq-before)
	}
}

// What a producer sent reaches the operator's terminal with its control characters
// escaped (an escape sequence in a payload drove the terminal before), and the JSON
// output carries a payload that is not UTF-8 exactly, in base64.
func TestPayloadShownEscaped(t *testing.T) {
	p := platformtest.Start(t, "", nil)
	db := p.DB(t)
	_, js := p.Connect(t)
	payload := []byte("\xff\xfe\x00bin\x1b[2J\x1b]0;owned\x07")
	if _, err := js.Publish(context.Background(), "events.bin.x", payload); err != nil {
		t.Fatal(err)
	}
	var seq uint64
	poll.Until(t, 2*time.Minute, func() error {
		if err := db.QueryRow(context.Background(), "SELECT stream_seq FROM dead_letters WHERE nats_subject = 'events.bin.x'").Scan(&seq); err != nil {
			return fmt.Errorf("no dead letter yet: %w", err)
		}
		return nil
	})
	env := map[string]string{"CLICKHOUSE_ADDR": p.ClickHouse.Addr}
	run := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := cli.Main(args, cli.IO{Env: func(k string) (string, bool) { v, ok := env[k]; return v, ok }, Stdout: &out, Stderr: &errOut})
		return code, out.String(), errOut.String()
	}
	code, out, errOut := run("dlq", "show", fmt.Sprint(seq))
	if code != 0 || strings.ContainsAny(out, "\x1b\x07\x00") || !strings.Contains(out, `payload:  \xff\xfe\x00bin\x1b[2J\x1b]0;owned\a`) ||
		!strings.Contains(out, "the payload is not UTF-8") {
		t.Fatalf("dlq show: exit %d\n%q%s", code, out, errOut)
	}
	code, out, errOut = run("dlq", "list")
	if code != 0 || strings.ContainsAny(out, "\x1b\x07\x00") {
		t.Fatalf("dlq list: exit %d\n%q%s", code, out, errOut)
	}
	code, out, errOut = run("dlq", "list", "--seq", fmt.Sprint(seq), "--json")
	var l dlq.Letter
	if err := json.Unmarshal([]byte(out), &l); code != 0 || err != nil {
		t.Fatalf("dlq list --json: exit %d, %v\n%s%s", code, err, out, errOut)
	}
	if got, err := base64.StdEncoding.DecodeString(l.PayloadBase64); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("payload_base64 %q (%v), want the payload's bytes %q", got, err, payload)
	}
}
