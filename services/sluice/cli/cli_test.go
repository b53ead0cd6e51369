package cli

import (
	"bytes"
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
