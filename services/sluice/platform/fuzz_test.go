package platform

import (
	"testing"

	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/notify"
)

// FuzzConfig: no config file makes parsing or any section's loader panic.
func FuzzConfig(f *testing.F) {
	f.Add("dedup:\n  window: 1h\n  windows:\n    - {subjects: events.iot.>, window: 2h}\n")
	f.Add("enrich:\n  tables:\n    - {name: u, kv: users}\n  rules:\n    - lookups: [{table: u, from: data.user, to: user}]\n")
	f.Add("rules:\n  - name: a\n    filter: type == \"x\"\nreceivers:\n  - {name: r, url: 'http://x', secret_env: [S]}\n")
	f.Add("rules: [\n")
	f.Add("alert: {idle_after: 1s}\nrules:\n  - {name: t, kind: threshold, filter: 'true', group_by: [data.u], window: 1m, op: '>', threshold: 2}\n" +
		"  - {name: a, kind: absence, filter: 'true', for: 1m, groups: [{}]}\n" +
		"receivers:\n  - {name: r, url: 'http://x', secret_env: [S], format: slack}\nroutes:\n  - {receivers: [r], matchers: ['a=~\"b.*\"'], group_by: [a]}\n" +
		"notify:\n  inhibit:\n    - {source_matchers: [s=c], target_matchers: [s=w], equal: [a]}\n")
	f.Fuzz(func(t *testing.T, src string) {
		file, err := configfile.Parse("fuzz.yaml", []byte(src))
		if err != nil {
			return
		}
		_, _ = dedup.LoadWindowConfig(file)
		if ec, err := enrich.LoadEnrichConfig(file); err == nil {
			_ = ec.Validate()
		}
		_, _ = alert.LoadConfig(file)
		_, _ = notify.LoadConfig(file, func(string) (string, bool) { return "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", true })
	})
}
