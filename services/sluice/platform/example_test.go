package platform

import (
	"strings"
	"testing"

	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/services/sink"
)

// examples/sluice.yaml, the config `make up` and the README use, loads in every
// section, and its typed table is order.created's.
func TestExampleConfig(t *testing.T) {
	f, err := configfile.Load("../../../examples/sluice.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dedup.LoadWindowConfig(f); err != nil {
		t.Fatal(err)
	}
	in, err := dedup.LoadIngest(f)
	if err != nil || len(in.Mappings) == 0 {
		t.Fatalf("ingest: %+v %v", in, err)
	}
	typed, err := sink.LoadTypedTables(f)
	if err != nil || len(typed) != 1 || typed[0].Name != "order_created" {
		t.Fatalf("typed tables: %v %v", typed, err)
	}
	if _, err := enrich.LoadEnrichConfig(f); err != nil {
		t.Fatal(err)
	}
	if _, err := alert.LoadConfig(f); err != nil {
		t.Fatal(err)
	}
	env := func(k string) (string, bool) {
		if strings.HasSuffix(k, "SECRET") {
			return "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXQ=", true
		}
		return "", false
	}
	if _, err := notify.LoadConfig(f, env); err != nil {
		t.Fatal(err)
	}
}
