package events

import (
	"encoding/json"
	"testing"
)

// EditPath edits or removes every member of the name at the path, escaped names
// and repeats included, and keeps every other byte; ValueAt reads the last.
func TestEditPath(t *testing.T) {
	remove := func([]byte) ([]byte, bool) { return nil, false }
	mark := func(v []byte) ([]byte, bool) { return []byte(`"<` + string(v[1:len(v)-1]) + `>"`), true }
	for _, c := range []struct {
		in   string
		path []string
		edit func([]byte) ([]byte, bool)
		want string // "" : not found
	}{
		{`{"a":1,"card":"4111","z":12345678901234567890123}`, []string{"card"}, remove, `{"a":1,"z":12345678901234567890123}`},
		{` { "card" : "4111" } `, []string{"card"}, remove, `{}`},
		{`{"card":"1","x":[1, 2],"c\u0061rd":"2"}`, []string{"card"}, remove, `{"x":[1, 2]}`},
		{`{"card":"1","card":"2"}`, []string{"card"}, mark, `{"card":"<1>","card":"<2>"}`},
		{`{"b":{"ip":"x","n":9007199254740993},"ip":"top"}`, []string{"b", "ip"}, mark, `{"b":{"ip":"<x>","n":9007199254740993},"ip":"top"}`},
		{`{"b":"not an object","c":1}`, []string{"b", "ip"}, remove, ""},
		{`{"a":1}`, []string{"card"}, remove, ""},
		{`[{"card":1}]`, []string{"card"}, remove, ""},
		{`{"a":"}\"{","card":"4"}`, []string{"card"}, remove, `{"a":"}\"{"}`},
	} {
		got, ok := EditPath([]byte(c.in), c.path, c.edit)
		if c.want == "" {
			if ok {
				t.Errorf("EditPath(%s, %v) = %s, want not found", c.in, c.path, got)
			}
			continue
		}
		if !ok || string(got) != c.want || !json.Valid(got) {
			t.Errorf("EditPath(%s, %v) = %s %v, want %s", c.in, c.path, got, ok, c.want)
		}
	}
	for _, c := range []struct {
		in   string
		path []string
		want string
	}{
		{`{"a":{"b":12345678901234567890}}`, []string{"a", "b"}, `12345678901234567890`},
		{`{"id":1,"i\u0064":2}`, []string{"id"}, `2`},
		{`{"a":1}`, []string{"a", "b"}, ""},
		{`{"a":1}`, nil, ""},
	} {
		got, ok := ValueAt([]byte(c.in), c.path)
		if (c.want == "") == ok || string(got) != c.want {
			t.Errorf("ValueAt(%s, %v) = %s %v, want %q", c.in, c.path, got, ok, c.want)
		}
	}
}
