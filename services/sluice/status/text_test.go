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

// Control characters and bytes that are not UTF-8 come out as Go escapes; other
// text (U+FFFD sent as such, non-ASCII letters) as it is.
func TestPrintable(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"plain é text", "plain é text"},
		{"\x1b[2Jcleared", `\x1b[2Jcleared`},
		{"\xff\xfe\x00", `\xff\xfe\x00`},
		{"bell\a tab\t cr\r", `bell\a tab\t cr\r`},
		{"\u0085next line", `\u0085next line`},
		{"\ufffd sent", "\ufffd sent"},
	} {
		if got := Printable(c.in); got != c.want {
			t.Errorf("Printable(%q) = %q, want %q", c.in, got, c.want)
		}
	}
	if got := PrintableLines("a\x1b\nb\n"); got != "a\\x1b\nb\n" {
		t.Errorf("PrintableLines = %q", got)
	}
	if got := OneLine("reason \x1b[31m", 40); got != `reason \x1b[31m` {
		t.Errorf("OneLine = %q", got)
	}
}
