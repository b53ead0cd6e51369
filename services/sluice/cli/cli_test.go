package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/notify"
)

func runCLI(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := Main(args, IO{Env: func(string) (string, bool) { return "", false }, Stdout: &out, Stderr: &errOut})
	return code, out.String(), errOut.String()
}

func TestRulesCheck(t *testing.T) {
	code, out, _ := runCLI("rules", "check", "../../alert/testdata/rules.good.yaml")
	if code != 0 || !strings.Contains(out, "ok  big-order (match, severity critical)") {
		t.Fatalf("good file: exit %d\n%s", code, out)
	}
	code, out, errOut := runCLI("rules", "check", "../../alert/testdata/rules.bad.yaml")
	if code != 1 || !strings.Contains(out, "ok  fine") || !strings.Contains(errOut, `rule 2 ("broken-filter")`) {
		t.Fatalf("bad file: exit %d\n%s\n%s", code, out, errOut)
	}
	if code, _, errOut := runCLI("rules", "check"); code != 2 || !strings.Contains(errOut, "want 1 argument") {
		t.Fatalf("no file: exit %d %s", code, errOut)
	}
	// Rules under the alert section (its settings) are refused as the stage refuses
	// them; a file without rules says so rather than nothing.
	dir := t.TempDir()
	misplaced := filepath.Join(dir, "misplaced.yaml")
	if err := os.WriteFile(misplaced, []byte("alert:\n  rules:\n    - name: x\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, errOut := runCLI("rules", "check", misplaced); code != 1 || !strings.Contains(errOut, "field rules not found in type alert.Settings") {
		t.Fatalf("rules in the alert section: exit %d %s", code, errOut)
	}
	none := filepath.Join(dir, "none.yaml")
	if err := os.WriteFile(none, []byte("alert:\n  idle_after: 1m\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, out, errOut := runCLI("rules", "check", none); code != 0 || !strings.Contains(out, "no rules in "+none+" (rules go in the top-level rules: section)") {
		t.Fatalf("no rules: exit %d %q %s", code, out, errOut)
	}
}

func TestUsage(t *testing.T) {
	if code, out, _ := runCLI("help"); code != 0 || !strings.Contains(out, "sluice up") {
		t.Fatalf("help: %d %s", code, out)
	}
	if code, _, errOut := runCLI("frobnicate"); code != 2 || !strings.Contains(errOut, `unknown command "frobnicate"`) {
		t.Fatalf("unknown: %d %s", code, errOut)
	}
	if code, _, errOut := runCLI("webhook", "listen"); code != 1 || !strings.Contains(errOut, "WEBHOOK_SECRET is not set") {
		t.Fatalf("webhook without secret: %d %s", code, errOut)
	}
}

func TestKVLoad(t *testing.T) {
	ns := natstest.Run(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "users.csv")
	// An e-mail address cannot be a KV key: it goes in encoded (it failed the load
	// before, "nats: invalid key"); a row with no key is left out.
	if err := os.WriteFile(file, []byte("id,plan\nu1,basic\nu2,free\nalice@example.com,team\n,none\nu1,pro\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	code := Main([]string{"kv", "load", "users", file, "--key", "id", "--nats-url", ns.URL},
		IO{Env: func(string) (string, bool) { return "", false }, Stdout: &out, Stderr: &errOut})
	if code != 0 || !strings.Contains(out.String(), "loaded 3 rows") || !strings.Contains(out.String(), "left out the row whose id is empty") ||
		!strings.Contains(out.String(), `1 row(s) had the id of a row before them (the first: "u1"): the last row of each id is loaded`) {
		t.Fatalf("exit %d: %s %s", code, out.String(), errOut.String())
	}
	_, js := ns.Connect(t)
	kv, err := js.KeyValue(context.Background(), "users")
	if err != nil {
		t.Fatal(err)
	}
	e, err := kv.Get(context.Background(), "u1")
	if err != nil || string(e.Value()) != `{"id":"u1","plan":"pro"}` {
		t.Fatalf("u1 = %s, %v", e.Value(), err)
	}
	e, err = kv.Get(context.Background(), enrich.KVKey("alice@example.com"))
	if err != nil || string(e.Value()) != `{"id":"alice@example.com","plan":"team"}` {
		t.Fatalf("alice@example.com = %v", err)
	}
	if code, _, errOut := runCLI("kv", "load", "users"); code != 2 || !strings.Contains(errOut, "usage: sluice kv load") {
		t.Fatalf("missing args: %d %s", code, errOut)
	}
}

func TestSilences(t *testing.T) {
	ns := natstest.Run(t)
	code, out, errOut := runCLI("silence", "add", "-m", "team=shop", "-m", `severity=~"warn.*"`, "--for", "2h", "--comment", "deploy", "--nats-url", ns.URL)
	if code != 0 {
		t.Fatalf("add: exit %d %s", code, errOut)
	}
	id := strings.Fields(out)[0]
	code, out, errOut = runCLI("silence", "list", "--nats-url", ns.URL)
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, `severity=~"warn.*"`) || !strings.Contains(out, "deploy") {
		t.Fatalf("list: exit %d %q %s", code, out, errOut)
	}
	if code, _, errOut := runCLI("silence", "add", "-m", "team", "--for", "1h", "--nats-url", ns.URL); code != 1 || !strings.Contains(errOut, `matcher "team"`) {
		t.Fatalf("bad matcher: exit %d %s", code, errOut)
	}
	if code, _, errOut := runCLI("silence", "add", "-m", "team=x"); code != 2 || !strings.Contains(errOut, "usage: sluice silence add") || !strings.Contains(errOut, "--for must be a duration above zero") {
		t.Fatalf("no duration: exit %d %s", code, errOut)
	}
	if code, _, errOut := runCLI("silence", "add", "-m", "team=x", "--for", "-1h"); code != 2 || !strings.Contains(errOut, "--for must be a duration above zero (2h, 30m), not -1h0m0s") {
		t.Fatalf("a duration below zero: exit %d %s", code, errOut)
	}
	if code, _, errOut := runCLI("silence", "add", "--for", "1h"); code != 2 || !strings.Contains(errOut, "at least one -m MATCHER is required") {
		t.Fatalf("no matcher: exit %d %s", code, errOut)
	}
	if code, _, errOut := runCLI("silence", "add", "-m", `team=~"["`, "--for", "1h", "--nats-url", ns.URL); code != 1 || !strings.Contains(errOut, "sluice: silence: matcher") {
		t.Fatalf("a matcher that does not parse: exit %d %s", code, errOut)
	}
	// A value left empty (-m team=$TEAM with TEAM unset) matches every alert without
	// the label: refused, as Alertmanager does, unless another matcher names a value.
	for _, ms := range [][]string{{"-m", "team="}, {"-m", "team=", "-m", `severity=~".*"`}, {"-m", "team!=shop"}} {
		args := append(append([]string{"silence", "add"}, ms...), "--for", "1h", "--nats-url", ns.URL)
		if code, _, errOut := runCLI(args...); code != 1 || !strings.Contains(errOut, "every matcher matches an alert without the label") {
			t.Fatalf("silence add %v: exit %d %s", ms, code, errOut)
		}
	}
	if code, _, errOut := runCLI("silence", "add", "-m", "team=", "-m", "alertname=disk", "--for", "1h", "--nats-url", ns.URL); code != 0 {
		t.Fatalf("an empty value beside a named one: exit %d %s", code, errOut)
	}
	if code, out, errOut := runCLI("silence", "rm", id, "--nats-url", ns.URL); code != 0 || out != "silence "+id+" ended\n" {
		t.Fatalf("rm: exit %d %q %s", code, out, errOut)
	}
	if code, out, _ := runCLI("silence", "list", "--all", "--nats-url", ns.URL); code != 0 || strings.Contains(out, id) {
		t.Fatalf("after rm: exit %d %q", code, out)
	}
	if code, _, errOut := runCLI("silence", "rm", id, "--nats-url", ns.URL); code != 1 || !strings.Contains(errOut, "no silence \""+id+"\" (`sluice silence list --all` shows them)") {
		t.Fatalf("rm twice: exit %d %s", code, errOut)
	}
	if code, _, errOut := runCLI("silence", "rm", "not a key", "--nats-url", ns.URL); code != 1 || !strings.Contains(errOut, "no silence \"not a key\"") {
		t.Fatalf("rm of an id no key can be: exit %d %s", code, errOut)
	}
}

// receiver enable ends a receiver's 410 stop; a name that is not disabled (a typo)
// is an error that lists the disabled ones, not a silent success.
func TestReceiverEnable(t *testing.T) {
	ctx := context.Background()
	ns := natstest.Run(t)
	if code, _, errOut := runCLI("receiver", "enable", "ops", "--nats-url", ns.URL); code != 1 || !strings.Contains(errOut, "has the notify stage run?") {
		t.Fatalf("no bucket: exit %d %s", code, errOut)
	}
	_, js := ns.Connect(t)
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: notify.StateBucket})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"ops", "billing"} {
		if err := notify.DisableReceiver(ctx, kv, name, "410 Gone"); err != nil {
			t.Fatal(err)
		}
	}
	if code, _, errOut := runCLI("receiver", "enable", "opps", "--nats-url", ns.URL); code != 1 || !strings.Contains(errOut, `receiver "opps" is not disabled (disabled: billing, ops)`) {
		t.Fatalf("a typo: exit %d %s", code, errOut)
	}
	if code, out, errOut := runCLI("receiver", "enable", "ops", "--nats-url", ns.URL); code != 0 || !strings.Contains(out, "receiver ops enabled") {
		t.Fatalf("enable: exit %d %q %s", code, out, errOut)
	}
	if _, err := kv.Get(ctx, "disabled.ops"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("disabled.ops after enable: %v", err)
	}
	if code, _, errOut := runCLI("receiver", "enable", "ops", "--nats-url", ns.URL); code != 1 || !strings.Contains(errOut, `receiver "ops" is not disabled (disabled: billing)`) {
		t.Fatalf("enable twice: exit %d %s", code, errOut)
	}
}

func TestStreamsApplyReplicas(t *testing.T) {
	ns := natstest.Run(t)
	if code, out, errOut := runCLI("streams", "apply", "--nats-url", ns.URL); code != 0 || !strings.Contains(out, "(replicas as they were, 1 for new streams)") {
		t.Fatalf("apply: exit %d: %s %s", code, out, errOut)
	}
	if code, _, errOut := runCLI("streams", "apply", "--nats-url", ns.URL, "--replicas", "9"); code != 1 || !strings.Contains(errOut, "replicas (SLUICE_STREAM_REPLICAS) 9: want 0 (as they are) or 1 to 5") {
		t.Fatalf("9 replicas: exit %d: %s", code, errOut)
	}
	// One server cannot keep three copies; JetStream's refusal names the stream.
	if code, _, errOut := runCLI("streams", "apply", "--nats-url", ns.URL, "--replicas", "3"); code != 1 || !strings.Contains(errOut, "apply stream") || !strings.Contains(errOut, "replicas") {
		t.Fatalf("3 replicas on one server: exit %d: %s", code, errOut)
	}
}

func TestIngestCheck(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfg, []byte(`
ingest:
  mappings:
    - name: sensors
      subjects: events.sensors.*
      envelope: raw
      batch: array
      id: {field: reading_id}
      source: {token: 3}
      time: {field: ts, format: unix_ms}
`), 0o644); err != nil {
		t.Fatal(err)
	}
	sample := filepath.Join(dir, "readings.json")
	if err := os.WriteFile(sample, []byte(`[{"reading_id":"r1","ts":1700000000123,"celsius":21.5},{"reading_id":"r2","ts":"soon"},{"reading_id":"r1","ts":1700000000123}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runCLI("ingest", "check", sample, "--subject", "events.sensors.plant7", "--config", cfg)
	for _, want := range []string{
		"message, element 0: event", `"id": "r1"`, `"source": "plant7"`, `"time": "2023-11-14T22:13:20.123Z"`, `"celsius": 21.5`,
		`message, element 1: dead letter: invalid event: batch element 1: mapping "sensors": time: field ts "soon" is not a number`,
		"message, element 2: repeat of message, element 0",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if code != 1 || !strings.Contains(errOut, "1 of 3 would go to the DLQ") {
		t.Fatalf("exit %d, stderr %s", code, errOut)
	}
	// One message per line, and a CloudEvent with a nested member, unmapped.
	lines := filepath.Join(dir, "lines.json")
	if err := os.WriteFile(lines, []byte("{\"id\":\"a\",\"data\":{\"x\":1}}\n\n{\"id\":\"b\",\"user\":{\"id\":1}}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, _ = runCLI("ingest", "check", lines, "--each-line", "--subject", "events.shop.order", "--config", cfg)
	if code != 1 || !strings.Contains(out, "line 1: event") || !strings.Contains(out, `line 3: dead letter: invalid event: member "user" is not a valid CloudEvents extension attribute`) {
		t.Fatalf("each line: exit %d\n%s", code, out)
	}
	// The README's raw-JSON step, under examples/sluice.yaml.
	push := filepath.Join(dir, "push.json")
	if err := os.WriteFile(push, []byte(`{"id":"28791465122","type":"PushEvent","actor":{"login":"ada"},"repo":{"name":"ada/engine"},"created_at":"2023-05-01T12:00:03Z"}`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, errOut = runCLI("ingest", "check", push, "--subject", "events.archive.raw", "--config", "../../../examples/sluice.yaml")
	for _, want := range []string{`"id": "28791465122"`, `"source": "archive"`, `"type": "PushEvent"`, `"subject": "ada/engine"`, `"time": "2023-05-01T12:00:03Z"`, `"login": "ada"`} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("README sample: exit %d, want %q in\n%s%s", code, want, out, errOut)
		}
	}
	if code, _, errOut := runCLI("ingest", "check", sample); code != 2 || !strings.Contains(errOut, "usage: sluice ingest check") {
		t.Fatalf("no subject: exit %d %s", code, errOut)
	}
	// Subjects a producer's event would not reach EVENTS by, and a file of blank lines.
	blank := filepath.Join(dir, "blank.json")
	if err := os.WriteFile(blank, []byte("\n  \n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ file, subject, want string }{
		{sample, "orders.plant7", "subject orders.plant7 is not one EVENTS takes (events.>): a message published to it is kept by no stream"},
		{sample, "events.sensors.*", `subject "events.sensors.*" is not one a message can be published to`},
		{sample, "events..x", `subject "events..x" is not one a message can be published to`},
		{blank, "events.a.b", blank + " has no line that is not blank"},
	} {
		if code, _, errOut := runCLI("ingest", "check", tc.file, "--each-line", "--subject", tc.subject, "--config", cfg); code != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("%s to %s: exit %d %s, want %q", tc.file, tc.subject, code, errOut, tc.want)
		}
	}
}

func TestCerts(t *testing.T) {
	dir := t.TempDir() + "/certs"
	code, out, errOut := runCLI("certs", "--dir", dir, "--hosts", "nats, localhost,127.0.0.1")
	if code != 0 || !strings.Contains(out, "wrote ca.pem, ca-key.pem, server.pem, server-key.pem") {
		t.Fatalf("exit %d, %q %q", code, out, errOut)
	}
	if code, out, _ := runCLI("certs", "--dir", dir, "--hosts", "nats,localhost"); code != 0 || !strings.Contains(out, "in place") {
		t.Fatalf("second run: exit %d, %q", code, out)
	}
	if code, _, errOut := runCLI("certs", "--dir", dir, "--hosts", " , "); code != 1 || !strings.Contains(errOut, "at least one host") {
		t.Fatalf("no hosts: exit %d, %q", code, errOut)
	}
}

// status against NATS with the streams applied and a ClickHouse that does not
// answer: unhealthy, exit 1, saying why, as text and as JSON.
func TestStatusUnhealthy(t *testing.T) {
	ns := natstest.Run(t)
	if code, _, errOut := runCLI("streams", "apply", "--nats-url", ns.URL); code != 0 {
		t.Fatalf("apply: exit %d: %s", code, errOut)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := l.Addr().String()
	l.Close()
	code, out, errOut := runCLI("status", "--nats-url", ns.URL, "--clickhouse-addr", closed)
	if code != 1 || !strings.Contains(out, "UNHEALTHY") || !strings.Contains(out, "ClickHouse at "+closed) {
		t.Fatalf("exit %d:\n%s%s", code, out, errOut)
	}
	code, out, errOut = runCLI("status", "--json", "--nats-url", ns.URL, "--clickhouse-addr", closed)
	var report struct {
		Healthy    bool
		Problems   []string
		Streams    []struct{ Name string }
		ClickHouse struct{ Reachable bool }
	}
	if err := json.Unmarshal([]byte(out), &report); code != 1 || err != nil || report.Healthy || report.ClickHouse.Reachable || len(report.Streams) == 0 {
		t.Fatalf("--json: exit %d, %v: %s%s", code, err, out, errOut)
	}
	if code, _, errOut := runCLI("status", "--nats-url", ns.URL, "--max-lag", "0s"); code != 1 || !strings.Contains(errOut, "must be positive") {
		t.Fatalf("--max-lag 0s: exit %d: %s", code, errOut)
	}
}

// Ranges that select nothing by mistake are refused before anything is read: a
// duration ago below zero, an end before its start; and a replay without the
// config file, which would rebuild rows without their enrichment.
func TestRangeMistakes(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(cfg, []byte("enrich: {}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"dlq", "list", "--since", "-5h"}, `--since: "-5h": a duration is how long ago, so not below zero (5h0m0s)`},
		{[]string{"dlq", "list", "--since", "1h", "--until", "2h"}, "--until 2h is not after --since 1h"},
		{[]string{"dlq", "replay", "--since", "2026-11-30T10:00:00Z", "--until", "2026-11-30T09:00:00Z"}, "--until 2026-11-30T09:00:00Z is not after --since 2026-11-30T10:00:00Z"},
		{[]string{"replay", "--from", "1"}, "replay: no config file (set SLUICE_CONFIG or --config"},
		{[]string{"replay", "--from", "5", "--to", "2", "--config", cfg}, "replay: --to 2 is before --from 5"},
		{[]string{"replay", "--from", "1h", "--to", "2h", "--config", cfg}, "replay: --to 2h is before --from 1h"},
		{[]string{"replay", "--from", "-2h", "--config", cfg}, `replay: --from: "-2h": a duration is how long ago, so not below zero`},
		{[]string{"replay", "--from", "yesterday", "--config", cfg}, `"yesterday" is neither a stream sequence, an RFC 3339 time nor a duration`},
	} {
		code, _, errOut := runCLI(tc.args...)
		if code != 1 || !strings.Contains(errOut, tc.want) {
			t.Errorf("%q: exit %d %s, want 1 and %q", tc.args, code, errOut, tc.want)
		}
	}
}
