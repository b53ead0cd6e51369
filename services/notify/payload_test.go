package notify

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// Each format's body for one notification is its golden file
// (go test -run TestPayloadGolden -update rewrites them).
func TestPayloadGolden(t *testing.T) {
	v := 7.0
	n := &Notification{
		Receiver: "oncall", GroupKey: "5f0c2a9b1e7d43a8c6f2", GroupLabels: map[string]string{"alertname": "failed-logins"},
		Alerts: []*alerts.Alert{
			{Fingerprint: "a1b2c3d4e5f60718", Rule: "failed-logins", Status: alerts.Firing, Severity: "critical",
				Labels:      map[string]string{"alertname": "failed-logins", "severity": "critical", "team": "security", "user": "u1"},
				Annotations: map[string]string{"summary": "7 failed logins for u1 in 1m0s"},
				StartsAt:    time.Date(2026, 11, 21, 12, 1, 0, 0, time.UTC), Value: &v},
			{Fingerprint: "0f1e2d3c4b5a6978", Rule: "failed-logins", Status: alerts.Resolved, Severity: "critical",
				Labels:      map[string]string{"alertname": "failed-logins", "severity": "critical", "team": "security", "user": "<u2>"},
				Annotations: map[string]string{"summary": "failed logins for <u2> & co"},
				StartsAt:    time.Date(2026, 11, 21, 11, 50, 0, 0, time.UTC), EndsAt: time.Date(2026, 11, 21, 11, 58, 0, 0, time.UTC)},
		},
		Truncated: 1,
	}
	for _, format := range []string{FormatSluice, FormatAlertmanager, FormatSlack} {
		t.Run(format, func(t *testing.T) {
			body, err := Render(format, n)
			if err != nil {
				t.Fatal(err)
			}
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, body, "", "  "); err != nil {
				t.Fatalf("%s is not JSON: %v", format, err)
			}
			pretty.WriteByte('\n')
			path := filepath.Join("testdata", "golden", format+".json")
			if *update {
				if err := os.WriteFile(path, pretty.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to write it)", err)
			}
			if !bytes.Equal(pretty.Bytes(), want) {
				t.Fatalf("%s differs from %s:\n%s", format, path, pretty.Bytes())
			}
		})
	}
	if _, err := Render("xml", n); err == nil {
		t.Fatal("an unknown format renders")
	}
}
