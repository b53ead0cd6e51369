package telemetry

import (
	"strings"
	"sync"
	"unicode/utf8"
)

// LabelCap bounds a label whose values come from input (event types, dead-letter
// reasons): the first Max distinct values seen are kept, later ones read as
// "other", so a producer cannot grow a metric without bound. Safe for concurrent
// use; the zero value keeps 100.
type LabelCap struct {
	Max  int
	mu   sync.Mutex
	seen map[string]struct{}
}

// Other is the value a LabelCap gives past its Max; None the value of "".
const (
	Other = "other"
	None  = "none"
)

// Value is v as the label's value: v, None or Other.
func (c *LabelCap) Value(v string) string {
	if v == "" {
		return None
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.seen[v]; ok {
		return v
	}
	limit := c.Max
	if limit <= 0 {
		limit = 100
	}
	if len(c.seen) >= limit {
		return Other
	}
	if c.seen == nil {
		c.seen = map[string]struct{}{}
	}
	c.seen[v] = struct{}{}
	return v
}

// ReasonClass is the first clause of a dead-letter reason (up to its first colon,
// at most 80 bytes): the kind of problem, without the details that make each
// reason its own (values, positions), for a label.
func ReasonClass(reason string) string {
	if i := strings.IndexByte(reason, ':'); i >= 0 {
		reason = reason[:i]
	}
	reason = strings.TrimSpace(reason)
	for len(reason) > 80 || !utf8.ValidString(reason) {
		reason = strings.ToValidUTF8(reason[:min(len(reason), 80)], "")
	}
	return reason
}
