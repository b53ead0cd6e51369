package cli

import (
	"context"
	"os"
	"path/filepath"

	"bytes"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"strings"
	"testing"
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
	if err := os.WriteFile(file, []byte("id,plan\nu1,pro\nu2,free\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	code := Main([]string{"kv", "load", "users", file, "--key", "id", "--nats-url", ns.URL},
		IO{Env: func(string) (string, bool) { return "", false }, Stdout: &out, Stderr: &errOut})
	if code != 0 || !strings.Contains(out.String(), "loaded 2 rows") {
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
	if code, _, errOut := runCLI("silence", "add", "-m", "team=x"); code != 2 || !strings.Contains(errOut, "usage: sluice silence add") {
		t.Fatalf("no duration: exit %d %s", code, errOut)
	}
	if code, _, errOut := runCLI("silence", "rm", id, "--nats-url", ns.URL); code != 0 {
		t.Fatalf("rm: exit %d %s", code, errOut)
	}
	if code, out, _ := runCLI("silence", "list", "--all", "--nats-url", ns.URL); code != 0 || strings.Contains(out, id) {
		t.Fatalf("after rm: exit %d %q", code, out)
	}
	if code, _, errOut := runCLI("silence", "rm", id, "--nats-url", ns.URL); code != 1 || !strings.Contains(errOut, "key not found") {
		t.Fatalf("rm twice: exit %d %s", code, errOut)
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
