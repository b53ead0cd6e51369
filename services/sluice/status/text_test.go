package status

import (
	"testing"
	"unicode/utf8"
)

func TestOneLine(t *testing.T) {
	for _, c := range []struct {
		in   string
		n    int
		want string
	}{
		{"a\nb  c", 10, "a b c"},
		{"abcdefgh", 6, "abc…"},
		{"ééééé", 6, "é…"}, // é is 2 bytes, … 3: a cut inside the second é moves back
		{"ééééé", 7, "éé…"},
	} {
		got := OneLine(c.in, c.n)
		if got != c.want || !utf8.ValidString(got) || len(got) > c.n {
			t.Errorf("OneLine(%q, %d) = %q, want %q", c.in, c.n, got, c.want)
		}
	}
}
