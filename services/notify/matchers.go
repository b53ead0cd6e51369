package notify

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Matcher tests one label, written as Alertmanager writes it: name=value,
// name!=value, name=~regex or name!~regex (the value optionally double-quoted; a
// regex is anchored at both ends). A missing label has the value "".
type Matcher struct {
	Name, Op, Value string
	re              *regexp.Regexp
}

// ParseMatcher parses s.
func ParseMatcher(s string) (Matcher, error) {
	s = strings.TrimSpace(s)
	i := strings.IndexAny(s, "=!")
	if i <= 0 {
		return Matcher{}, fmt.Errorf("matcher %q: want name=value, name!=value, name=~regex or name!~regex", s)
	}
	m := Matcher{Name: strings.TrimSpace(s[:i])}
	rest := s[i:]
	for _, op := range []string{"=~", "!~", "!=", "="} {
		if strings.HasPrefix(rest, op) {
			m.Op, rest = op, rest[len(op):]
			break
		}
	}
	if m.Op == "" || !validLabel(m.Name) {
		return Matcher{}, fmt.Errorf("matcher %q: want name=value, name!=value, name=~regex or name!~regex", s)
	}
	rest = strings.TrimSpace(rest)
	if strings.HasPrefix(rest, `"`) {
		v, err := strconv.Unquote(rest)
		if err != nil {
			return Matcher{}, fmt.Errorf("matcher %q: value: %w", s, err)
		}
		rest = v
	}
	m.Value = rest
	if m.Op == "=~" || m.Op == "!~" {
		re, err := regexp.Compile("^(?:" + rest + ")$")
		if err != nil {
			return Matcher{}, fmt.Errorf("matcher %q: %w", s, err)
		}
		m.re = re
	}
	return m, nil
}

// ParseMatchers parses each of ss.
func ParseMatchers(ss []string) ([]Matcher, error) {
	out := make([]Matcher, 0, len(ss))
	for _, s := range ss {
		m, err := ParseMatcher(s)
		if err != nil {
			return nil, err
		}
		out = append(out, m)
	}
	return out, nil
}

func validLabel(s string) bool {
	for i, r := range s {
		if !(r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return s != ""
}

// Matches tests labels.
func (m Matcher) Matches(labels map[string]string) bool {
	v := labels[m.Name]
	switch m.Op {
	case "=":
		return v == m.Value
	case "!=":
		return v != m.Value
	case "=~":
		return m.re.MatchString(v)
	default:
		return !m.re.MatchString(v)
	}
}

func (m Matcher) String() string { return m.Name + m.Op + strconv.Quote(m.Value) }

// matchAll reports whether every matcher matches labels (no matchers: true).
func matchAll(ms []Matcher, labels map[string]string) bool {
	for _, m := range ms {
		if !m.Matches(labels) {
			return false
		}
	}
	return true
}
