package deadletters

import "testing"

// The ids of dead letters are distinct per input and per element of a batch, and
// the same for a retry.
func TestIDs(t *testing.T) {
	for got, want := range map[string]string{
		ID("EVENTS", 42, -1):                  "dlq:EVENTS:42",
		ID("EVENTS", 42, 0):                   "dlq:EVENTS:42:0",
		ID("EVENTS", 42, 3):                   "dlq:EVENTS:42:3",
		UnplacedID("dedup", "events.a.b", -1): "dlq:dedup:events.a.b",
		UnplacedID("dedup", "events.a.b", 2):  "dlq:dedup:events.a.b:2",
		Subject("pipeline"):                   "dlq.pipeline",
		ImportID("3f2a", 12):                  "dlq:import:3f2a:12",
	} {
		if got != want {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}
