package backfill_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/deadletters"
	"github.com/sluicehq/sluice/services/kit/natsserver"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/sluice/backfill"
	"github.com/sluicehq/sluice/services/sluice/cli"
	"github.com/sluicehq/sluice/services/sluice/platform/platformtest"
	"github.com/sluicehq/sluice/streams"
)

// A month of history, gzipped JSON lines with blank and invalid lines among them,
// imported into the platform (`sluice up`), interrupted a third of the way, run
// again: every event lands once (the second run goes on after the checkpoint; what
// was in flight is dropped by dedup), the invalid lines are dead letters, and a
// third run publishes nothing. The plain progress lines say where it is.
func TestImportInterruptedAndAgain(t *testing.T) {
	dir := t.TempDir()
	p := platformtest.Start(t, "", nil)

	// The file: 3,000 events of last month, a blank line every 100, an invalid one
	// every 1,000.
	const n = 3000
	var raw bytes.Buffer
	month := time.Now().UTC().AddDate(0, -1, 0)
	for i := range n {
		fmt.Fprintf(&raw, `{"specversion":"1.0","id":"h-%d","source":"history","type":"page.view","time":%q,"data":{"n":%d}}`+"\n",
			i, month.Add(time.Duration(i)*time.Minute).Format(time.RFC3339), i)
		if i%100 == 0 {
			raw.WriteString("\n")
		}
		if i%1000 == 0 {
			raw.WriteString(`{"specversion":"1.0","id":"bad` + fmt.Sprint(i) + `"` + "\n") // truncated
		}
	}
	file := filepath.Join(dir, "history.jsonl.gz")
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	_, _ = w.Write(raw.Bytes())
	_ = w.Close()
	if err := os.WriteFile(file, gz.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}

	_, js := p.Connect(t)
	db := p.DB(t)
	kv, err := streams.KeyValue(context.Background(), js, jetstream.KeyValueConfig{Bucket: backfill.Bucket})
	if err != nil {
		t.Fatal(err)
	}

	// The first run, cut off once a thousand lines are acknowledged.
	ictx, stop := context.WithCancel(context.Background())
	err = backfill.Import(ictx, js, kv, []string{file}, backfill.Options{Subject: "events.history.view", InFlight: 100}, func(p backfill.Progress) {
		if p.Lines >= 1000 {
			stop()
		}
	})
	stop()
	if err == nil {
		t.Fatal("the cut-off run did not say so")
	}
	events := func() (uint64, uint64) {
		var ev, dl uint64
		_ = db.QueryRow(context.Background(), "SELECT (SELECT count() FROM events), (SELECT count() FROM dead_letters)").Scan(&ev, &dl)
		return ev, dl
	}

	// Again, through the command (not a terminal: progress lines).
	env := map[string]string{"NATS_URL": p.NATSURL}
	run := func(args ...string) (int, string, string) {
		var out, errOut bytes.Buffer
		code := cli.Main(args, cli.IO{Env: func(k string) (string, bool) { v, ok := env[k]; return v, ok }, Stdout: &out, Stderr: &errOut})
		return code, out.String(), errOut.String()
	}
	code, out, errOut := run("import", file, "--subject", "events.history.view")
	if code != 0 || !strings.Contains(out, "100% read") {
		t.Fatalf("second run: exit %d\n%s%s", code, out, errOut)
	}
	var total, earlier int
	if _, err := fmt.Sscanf(out[strings.LastIndex(out, "import "):], "import "+file+": %d lines done (%d by an earlier run)", &total, &earlier); err != nil || earlier < 1000 || total != n+n/100+n/1000 {
		t.Fatalf("second run's last line (%v): %s", err, out)
	}
	poll.Until(t, 2*time.Minute, func() error {
		if ev, dl := events(); ev != n || dl != n/1000 {
			return fmt.Errorf("%d events, %d dead letters; want %d and %d", ev, dl, n, n/1000)
		}
		return nil
	})
	var ids, oldest uint64
	if err := db.QueryRow(context.Background(), "SELECT uniqExact(id), toUInt64(min(event_time)) FROM events").Scan(&ids, &oldest); err != nil || ids != n || oldest != uint64(month.Unix()) {
		t.Fatalf("%d distinct ids, oldest %d (%v); want %d from %d", ids, oldest, err, n, month.Unix())
	}

	// A third run: the checkpoint says it is all done; nothing is published.
	st, err := js.Stream(context.Background(), streams.Events)
	if err != nil {
		t.Fatal(err)
	}
	before := st.CachedInfo().State.LastSeq
	if code, out, errOut := run("import", file, "--subject", "events.history.view"); code != 0 || !strings.Contains(out, fmt.Sprintf("(%d by an earlier run)", total)) {
		t.Fatalf("third run: exit %d\n%s%s", code, out, errOut)
	}
	info, err := st.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.State.LastSeq != before {
		t.Fatalf("the third run published %d messages", info.State.LastSeq-before)
	}
	// and left the checkpoint where it was (a fourth run would skip it all too).
	keys, err := kv.ListKeys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for key := range keys.Keys() {
		e, err := kv.Get(context.Background(), key)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(e.Value()), fmt.Sprintf(`"lines":%d`, total)) {
			t.Fatalf("checkpoint %s after the third run: %s; want %d lines", key, e.Value(), total)
		}
	}
	if code, _, errOut := run("import", file); code != 2 || !strings.Contains(errOut, "--subject") {
		t.Fatalf("no subject: exit %d: %s", code, errOut)
	}
}

// --rate holds the import to that many events a second.
func TestImportRate(t *testing.T) {
	srv := natsStream(t)
	file := filepath.Join(t.TempDir(), "few.jsonl")
	var b strings.Builder
	for i := range 300 {
		fmt.Fprintf(&b, `{"id":"%d"}`+"\n", i)
	}
	if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := backfill.Import(context.Background(), srv.js, srv.kv, []string{file}, backfill.Options{Subject: "events.a.b", Rate: 200}, func(backfill.Progress) {}); err != nil {
		t.Fatal(err)
	}
	// 300 at 200 a second, after a burst of 20: at least 1.4 s.
	if took := time.Since(start); took < 1400*time.Millisecond {
		t.Fatalf("300 events at --rate 200 took %s", took)
	}
	info, err := srv.st.Info(context.Background())
	if err != nil || info.State.Msgs != 300 {
		t.Fatalf("%v: %+v", err, info)
	}
	// A subject no stream stores: the error says so.
	err = backfill.Import(context.Background(), srv.js, srv.kv, []string{file}, backfill.Options{Subject: "orders.a", Restart: true}, func(backfill.Progress) {})
	if err == nil || !strings.Contains(err.Error(), "line 1: no stream stores subject orders.a (EVENTS takes events.>)") {
		t.Fatalf("import to orders.a: %v", err)
	}
}

// A checkpoint is of a file published to a subject: the same file to another
// subject is imported (it was skipped as done before, "3 by an earlier run"), a
// checkpoint written before subjects were recorded still counts, and a subject
// with wildcards is refused (NATS stored "events.a.*" as it was).
func TestImportSubjects(t *testing.T) {
	ctx := context.Background()
	srv := natsStream(t)
	file := filepath.Join(t.TempDir(), "few.jsonl")
	if err := os.WriteFile(file, []byte("{\"id\":\"1\"}\n{\"id\":\"2\"}\n{\"id\":\"3\"}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	stored := func() uint64 {
		t.Helper()
		info, err := srv.st.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Msgs
	}
	imp := func(subject string) (backfill.Progress, error) {
		var last backfill.Progress
		err := backfill.Import(ctx, srv.js, srv.kv, []string{file}, backfill.Options{Subject: subject}, func(p backfill.Progress) { last = p })
		return last, err
	}
	for _, step := range []struct {
		subject         string
		skipped, stored int
	}{
		{"events.a.b", 0, 3},
		{"events.a.b", 3, 3},
		{"events.c.d", 0, 6},
		{"events.c.d", 3, 6},
	} {
		p, err := imp(step.subject)
		if err != nil {
			t.Fatalf("%s: %v", step.subject, err)
		}
		if p.Skipped != int64(step.skipped) || stored() != uint64(step.stored) {
			t.Fatalf("to %s: %d skipped and %d stored, want %d and %d", step.subject, p.Skipped, stored(), step.skipped, step.stored)
		}
	}

	// A checkpoint of the file alone (as written before subjects were recorded).
	keys, err := srv.kv.ListKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var id string
	for k := range keys.Keys() {
		id, _, _ = strings.Cut(k, ".")
	}
	if _, err := srv.kv.Put(ctx, id, []byte(`{"file":"few.jsonl","lines":3,"at":"2026-11-01T00:00:00Z"}`)); err != nil {
		t.Fatal(err)
	}
	if p, err := imp("events.e.f"); err != nil || p.Skipped != 3 || stored() != 6 {
		t.Fatalf("with a checkpoint of the file alone: %v, %d skipped, %d stored", err, p.Skipped, stored())
	}

	for _, subject := range []string{"events.a.*", "events.>", "events..a", "events.a b"} {
		if _, err := imp(subject); err == nil || !strings.Contains(err.Error(), "is not one a message can be published to") {
			t.Errorf("%q: %v", subject, err)
		}
	}
	if n := stored(); n != 6 {
		t.Fatalf("%d stored after the refused subjects, want 6", n)
	}
}

type natsFixture struct {
	js jetstream.JetStream
	kv jetstream.KeyValue
	st jetstream.Stream
}

// natsStream is an embedded NATS with an EVENTS-like stream and the checkpoint
// bucket.
func natsStream(t *testing.T) natsFixture {
	t.Helper()
	_, js := natstest.Run(t).Connect(t)
	ctx := context.Background()
	st, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "IN", Subjects: []string{"events.>"}})
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: backfill.Bucket})
	if err != nil {
		t.Fatal(err)
	}
	return natsFixture{js: js, kv: kv, st: st}
}

// A line larger than the server's max_payload can never be published: it becomes a
// dead letter (dlq.import, truncated, with the reason), and the import goes on to
// the lines after it. Run again, it adds no second dead letter.
func TestImportLineTooLarge(t *testing.T) {
	const maxPayload = 4096
	_, js := natstest.RunWith(t, natsserver.Config{MaxPayload: maxPayload}).Connect(t)
	ctx := context.Background()
	in, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "IN", Subjects: []string{"events.>"}})
	if err != nil {
		t.Fatal(err)
	}
	dlq, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "DLQ", Subjects: []string{"dlq.>"}})
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: backfill.Bucket})
	if err != nil {
		t.Fatal(err)
	}
	big := `{"id":"big","pad":"` + strings.Repeat("x", 3*maxPayload) + `"}`
	file := filepath.Join(t.TempDir(), "some.jsonl")
	if err := os.WriteFile(file, []byte(`{"id":"1"}`+"\n"+big+"\n"+`{"id":"3"}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var last backfill.Progress
	for _, restart := range []bool{false, true} {
		if err := backfill.Import(ctx, js, kv, []string{file}, backfill.Options{Subject: "events.a.b", Restart: restart}, func(p backfill.Progress) { last = p }); err != nil {
			t.Fatalf("restart %v: %v", restart, err)
		}
		if !last.Done || last.Lines != 3 {
			t.Fatalf("restart %v: progress %+v; want 3 lines done", restart, last)
		}
	}
	if info, err := in.Info(ctx); err != nil || info.State.Msgs != 4 {
		t.Fatalf("%v: %d events stored; want lines 1 and 3 twice", err, info.State.Msgs)
	}
	info, err := dlq.Info(ctx)
	if err != nil || info.State.Msgs != 1 {
		t.Fatalf("%v: %d dead letters; want 1 (the second run's is a duplicate)", err, info.State.Msgs)
	}
	m, err := dlq.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	reason := m.Header.Get(deadletters.HeaderReason)
	for _, want := range []string{fmt.Sprintf("line 2 of %s is %d bytes", file, len(big)), "max_payload (4096 bytes)", "not published to events.a.b", "payload truncated"} {
		if !strings.Contains(reason, want) {
			t.Errorf("reason %q lacks %q", reason, want)
		}
	}
	if m.Subject != "dlq.import" || m.Header.Get(deadletters.HeaderStage) != "import" || m.Header.Get(deadletters.HeaderSubject) != "events.a.b" ||
		m.Header.Get(deadletters.HeaderTruncated) != fmt.Sprint(len(big)) {
		t.Errorf("dead letter on %s with headers %v", m.Subject, m.Header)
	}
	if len(m.Data) == 0 || len(m.Data) >= len(big) || !strings.HasPrefix(big, string(m.Data)) {
		t.Errorf("dead letter's payload is %d bytes, not the line's start", len(m.Data))
	}
}
