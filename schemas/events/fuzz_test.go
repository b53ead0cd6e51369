package events

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// FuzzDecode: no input makes the decoder panic, and every event it accepts survives
// the inter-stage JSON round trip.
func FuzzDecode(f *testing.F) {
	for _, seed := range []string{
		`{"specversion":"1.0","id":"a","source":"s","type":"t","time":"2026-01-02T03:04:05Z","data":{"x":[1,2]}}`,
		`{"id":"1","id":"2"}`, `{"data_base64":"AA=="}`, `[1]`, ``, "\xff", `{"id":"1","time":"1969-01-01T00:00:00Z"}`,
	} {
		f.Add("events.a.b", seed, "")
	}
	f.Add("events.a.b", `{"x":1}`, "1")
	types, err := LoadTypeSchemas()
	if err != nil {
		f.Fatal(err)
	}
	d := NewDecoder(types)
	recv := time.Date(2026, 11, 21, 0, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, subject, payload, ceID string) {
		if u, ok := decodeUsual([]byte(payload)); ok && utf8.ValidString(payload) {
			g, err := decodeGeneral([]byte(payload))
			if err != nil || !reflect.DeepEqual(u, g) {
				t.Fatalf("the usual event's fast path and the general path differ:\n%+v\n%+v %v", u, g, err)
			}
		}
		var h map[string][]string
		if ceID != "" {
			h = map[string][]string{"ce-id": {ceID}}
		}
		e, err := d.Decode(Message{Subject: subject, Header: h, Data: []byte(payload), Received: recv})
		if err != nil {
			if !IsInvalid(err) {
				t.Fatalf("error is not an InvalidError: %v", err)
			}
			return
		}
		b, err := e.Marshal()
		if err != nil {
			t.Fatalf("accepted event does not encode: %v", err)
		}
		back, err := Unmarshal(b)
		if err != nil {
			t.Fatalf("accepted event does not decode: %v\n%s", err, b)
		}
		if back.ID != e.ID || back.Source != e.Source || back.Type != e.Type || !back.Time.Equal(e.Time) || !sameJSON(back.Data, e.Data) {
			t.Fatalf("round trip changed the event:\n%+v\n%+v", e, back)
		}
	})
}

// sameJSON reports whether a and b hold the same JSON value (or are both empty).
func sameJSON(a, b []byte) bool {
	if len(a) == 0 || len(b) == 0 {
		return len(a) == len(b)
	}
	var va, vb any
	if json.Unmarshal(a, &va) != nil || json.Unmarshal(b, &vb) != nil {
		return bytes.Equal(a, b)
	}
	return reflect.DeepEqual(va, vb)
}

// FuzzValid: goccy/go-json's Valid, which the decoder uses to check an event's JSON
// (six times faster), judges every input as encoding/json's does.
func FuzzValid(f *testing.F) {
	for _, s := range validCases() {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if std, fast := json.Valid(b), validJSON(b); std != fast {
			t.Fatalf("encoding/json says %v, the decoder's check %v: %q", std, fast, b)
		}
	})
}

// validCases are JSON texts near the edges of validity, from the bad-input corpus
// and beyond.
func validCases() []string {
	return []string{
		`{"a":1}`, `{"a":"\u00e9"}`, `[1,2,{"x":null}]`, `{"a":tru}`, `{"a":1,}`, "\"\x01\"", `01`, `1e5`, `-0.5`, `{"a":"\q"}`, " {} ",
		`{"a":[]}x`, "\"\xff\"", strings.Repeat("[", 10000) + strings.Repeat("]", 10000),
		`{"a":` + strings.Repeat(`{"a":`, 20000) + `1` + strings.Repeat("}", 20001),
		`{"n":1e999}`, `{"n":123456789012345678901234567890}`, `{"n":NaN}`, `{"n":Infinity}`, `{"n":-}`, `{"n":1.}`, `{"n":.5}`, `{"n":+1}`,
		"{\"s\":\"\t\"}", `{"s":"\ud800"}`, `{"s":"\u12"}`, `{"a":1}{"b":2}`, `{"a" 1}`, `{'a':1}`, `{a:1}`, `{"a":1 "b":2}`, "{\"a\":1}\x00",
		`{"a":true,"b":false,"c":null}`, `{"a":nul}`, `{"a":[1,]}`, `{"a":[,1]}`, "\ufeff{}", `{"a":"` + strings.Repeat("x", 1<<20) + `"}`, ``, ` `,
	}
}

func TestValid(t *testing.T) {
	for _, s := range validCases() {
		if std, fast := json.Valid([]byte(s)), validJSON([]byte(s)); std != fast {
			t.Errorf("encoding/json says %v, the decoder's check %v: %.60q", std, fast, s)
		}
	}
}
