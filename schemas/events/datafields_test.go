package events

import (
	"reflect"
	"strings"
	"testing"

	"github.com/expr-lang/expr"
	gojson "github.com/goccy/go-json"
)

// What an expression reads of data: the members it names, or all of it where it
// uses data any other way.
func TestExprDataFields(t *testing.T) {
	for src, want := range map[string]string{
		`type == "a"`:                       "{}",
		`data.user == "u1" && data.n > 3`:   "{n,user}",
		`data.a.b.c > 1 || data["b"] == 2`:  "{a,b}",
		`data?.x == nil`:                    "{x}",
		`all(data.items, {.n > 1})`:         "{items}",
		`enrichment.user_plan == "pro"`:     "{}",
		`data[type] == 1`:                   "all",
		`"x" in data`:                       "all",
		`len(data) > 2`:                     "all",
		`$env.data.x == 1`:                  "all",
		`let d = data; d.x == 1`:            "all",
		`map([data], #.x)[0] == 1`:          "all",
		`data.x == 1 && toJSON(data) != ""`: "all",
	} {
		p, err := expr.Compile(src, expr.Env(ExprEnv{}))
		if err != nil {
			t.Fatalf("%s: %v", src, err)
		}
		if got := ExprDataFields(p.Node()).String(); got != want {
			t.Errorf("%s: reads %s of data, want %s", src, got, want)
		}
	}
	for path, want := range map[string]string{"data.user.id": "{user}", "data": "all", "source": "{}"} {
		if got := DataFieldsOfPath(path).String(); got != want {
			t.Errorf("path %s: reads %s, want %s", path, got, want)
		}
	}
	if got := DataMembers("b", "a").Union(DataMembers("c", "a")).String(); got != "{a,b,c}" {
		t.Errorf("union %s, want {a,b,c}", got)
	}
}

// Decoding some members gives, for each of them, what decoding all of data gives;
// asking for more later decodes more, and DecodeData still gives all of it.
func TestDecodeDataFields(t *testing.T) {
	data := ` { "user":"u1", "n": 12, "skip": {"a":[1,"}"]}, "esc":"a\"b", "user": "u2", "f": -1.5e3, "t": true, "z": null } `
	e := &Event{Data: []byte(data)}
	got, err := e.DecodeDataFields(DataMembers("user", "n", "esc", "f", "t", "z", "missing"))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{"user": "u2", "n": 12.0, "esc": `a"b`, "f": -1500.0, "t": true, "z": nil}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v\nwant %#v", got, want)
	}
	more, _ := e.DecodeDataFields(DataMembers("skip"))
	if m := more.(map[string]any); m["user"] != "u2" || !reflect.DeepEqual(m["skip"], map[string]any{"a": []any{1.0, "}"}}) {
		t.Fatalf("after asking for skip: %#v", more)
	}
	all, err := e.DecodeData()
	if err != nil || len(all.(map[string]any)) != 8-1 { // user twice
		t.Fatalf("DecodeData: %#v %v", all, err)
	}
	// A member that does not decode (a number beyond float64) fails DecodeData, and
	// only the readers that ask for it.
	big := &Event{Data: []byte(`{"big":1e400,"n":1}`)}
	if got, err := big.DecodeDataFields(DataMembers("n")); err != nil || !reflect.DeepEqual(got, map[string]any{"n": 1.0}) {
		t.Errorf("n beside big: %#v %v", got, err)
	}
	if got, err := big.DecodeDataFields(DataMembers("big")); err == nil {
		t.Errorf("big: %#v, want an error", got)
	}
	for _, d := range []string{`[1,2]`, `"s"`, `{"a\u0062":1}`} { // not an object; an escaped name
		e := &Event{Data: []byte(d)}
		got, _ := e.DecodeDataFields(DataMembers("ab"))
		var full any
		_ = gojson.Unmarshal([]byte(d), &full)
		if !reflect.DeepEqual(got, full) {
			t.Errorf("%s: got %#v, want all of it, %#v", d, got, full)
		}
	}
}

// FuzzDecodeDataFields: for any valid JSON data and any member names, each named
// member decodes to what decoding all of data gives it.
func FuzzDecodeDataFields(f *testing.F) {
	f.Add(`{"user":"u1","n":12,"x":{"y":"}"}}`, "user,n")
	f.Add(`{"a":1,"a":"2"}`, "a")
	f.Add(`{"a":"\ud800","b":-0,"c":123456789012345678}`, "a,b,c")
	f.Fuzz(func(t *testing.T, data, names string) {
		if !validJSON([]byte(data)) {
			return
		}
		var full any
		if err := gojson.Unmarshal([]byte(data), &full); err != nil {
			return
		}
		fields := DataMembers(strings.Split(names, ",")...)
		e := &Event{Data: []byte(data)}
		got, err := e.DecodeDataFields(fields)
		if err != nil {
			t.Fatalf("%s: %v", data, err)
		}
		fm, isObject := full.(map[string]any)
		if !isObject {
			if !reflect.DeepEqual(got, full) {
				t.Fatalf("%s: got %#v, want %#v", data, got, full)
			}
			return
		}
		gm := got.(map[string]any)
		for _, n := range fields.names {
			fv, inFull := fm[n]
			gv, inGot := gm[n]
			if inFull != inGot || !reflect.DeepEqual(fv, gv) {
				t.Fatalf("%s: member %q: got %#v (%v), want %#v (%v)", data, n, gv, inGot, fv, inFull)
			}
		}
	})
}

// A string ends at the first quote that no backslash escapes (an escaped backslash
// escapes nothing).
func TestStringEnd(t *testing.T) {
	for s, want := range map[string]int{
		`"ab"x`: 4, `"a\"b"x`: 6, `"a\\"x`: 5, `"a\\\"b"x`: 8, `"\\\\"x`: 6, `""x`: 2, `"no end`: 7,
	} {
		if got := stringEnd([]byte(s), 0); got != want {
			t.Errorf("%s: ends at %d, want %d", s, got, want)
		}
	}
}
