package sink

import (
	"maps"
	"math"
	"testing"
)

// The enrichment column is what marshalling the fields without columns of their own
// as one map gives: sorted keys, the same escaping.
func TestEnrichmentJSON(t *testing.T) {
	for _, m := range []map[string]any{
		nil,
		{"geo_country": "NL", "ua_os": "Linux"},
		{"user_plan": "pro", "day": "2027-01-15", "geo_asn": 64500.0, "b": 1.5, "a": nil},
		{"q": `say "hi"\now`, "tab": "a\tb", "html": "<a href='x'>&</a>", "utf8": "Zürich ✓", "bad": "\xff"},
		{"nested": map[string]any{"z": 1.0, "a": []any{"x", true}}, "n": 1e21, "k": math.Copysign(0, -1)},
		{"day": 20454.0, "neg": -3.0, "zero": 0.0, "big": 999999999999999.0, "bigger": 1e15, "frac": -2.25},
		{"sluiceversions": map[string]string{"users": "kv:users@12", "geo": "file:\"x\"@1"}, "empty": map[string]string{}},
	} {
		others := maps.Clone(m)
		for _, k := range enrichmentColumns {
			delete(others, k)
		}
		want := ""
		if len(others) > 0 {
			b, err := marshal(others)
			if err != nil {
				t.Fatal(err)
			}
			want = string(b)
		}
		if got := enrichmentJSON(m); got != want {
			t.Errorf("%v:\n got %s\nwant %s", m, got, want)
		}
	}
}
