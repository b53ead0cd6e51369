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
	d := NewDecoder(types, nil)
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
		checkRoundTrip(t, e)
	})
}

// checkRoundTrip fails t unless an accepted event survives the inter-stage JSON.
func checkRoundTrip(t *testing.T, e *Event) {
	t.Helper()
	b, err := e.Marshal()
	if err != nil {
		t.Fatalf("accepted event does not encode: %v", err)
	}
	back, err := Unmarshal(b)
	if err != nil {
		t.Fatalf("accepted event does not decode: %v\n%s", err, b)
	}
	if back.ID != e.ID || back.Source != e.Source || back.Type != e.Type || back.Subject != e.Subject || !back.Time.Equal(e.Time) || !sameJSON(back.Data, e.Data) {
		t.Fatalf("round trip changed the event:\n%+v\n%+v", e, back)
	}
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

// FuzzIngest: no payload, subject or header makes the raw decoder, the mappings or
// the batch split panic; every error is an *InvalidError; every accepted event
// survives the inter-stage round trip and its time is in the stored range.
func FuzzIngest(f *testing.F) {
	for _, seed := range []struct{ subject, payload, header string }{
		{"events.gh.raw", `{"id":"1","type":"PushEvent","actor":{"login":"a"},"created_at":"2023-05-01T12:00:03Z"}`, ""},
		{"events.gh.raw", `[{"id":"1","created_at":"2016-12-31T23:59:60Z"},{"id":2}]`, ""},
		{"events.iot.ms", `{"ts":1.7e12,"v":[1,2]}`, "m1"},
		{"events.iot.ns", `{"ts":"-1e-3"}`, ""},
		{"events.logs.app", "{\"at\":\"01/02/2024 10:00\"}\n\n[1]\n\"x\"\n", ""},
		{"events.ce.batch", `[{"id":"a","ext":{"x":1}},{"id":"b","data":{}}]`, ""},
		{"events.other.x", `{"id":"a","Bad":1}`, ""},
	} {
		f.Add(seed.subject, seed.payload, seed.header)
	}
	in := Ingest{InvalidMembers: MembersData, Mappings: []Mapping{
		{Subjects: "events.gh.>", Envelope: EnvelopeRaw, Batch: BatchArray, ID: &Attr{Field: "id"}, Type: &Attr{Field: "type", Default: ptr("gh")},
			Subject: &Attr{Field: "actor.login", Default: ptr("")}, Time: &TimeAttr{Attr: Attr{Field: "created_at"}}},
		{Subjects: "events.iot.ms", Envelope: EnvelopeRaw, ID: &Attr{Header: "Msg"}, Time: &TimeAttr{Attr: Attr{Field: "ts"}, Format: FormatUnixMs}},
		{Subjects: "events.iot.ns", Envelope: EnvelopeRaw, Source: &Attr{Token: 2}, Time: &TimeAttr{Attr: Attr{Field: "ts", Default: ptr(DefaultReceived)}, Format: FormatUnixNs}},
		{Subjects: "events.logs.>", Envelope: EnvelopeRaw, Batch: BatchNDJSON, ID: &Attr{Field: "0", Default: ptr("d")},
			Time: &TimeAttr{Attr: Attr{Field: "at", Default: ptr("2026-01-01T00:00:00Z")}, Format: "layout:02/01/2006 15:04"}},
		{Subjects: "events.ce.>", Batch: BatchArray},
	}}
	if err := in.Validate(); err != nil {
		f.Fatal(err)
	}
	d := NewDecoder(nil, &in)
	recv := time.Date(2026, 11, 30, 0, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, subject, payload, header string) {
		m := Message{Subject: subject, Header: map[string][]string{"Msg": {header}}, Data: []byte(payload), Received: recv}
		parts, err := d.Split(m)
		if err != nil {
			if !IsInvalid(err) {
				t.Fatalf("split error is not an InvalidError: %v", err)
			}
			return
		}
		if parts == nil {
			parts = []Message{m}
		}
		for i, p := range parts {
			if p.Element != nil && p.Element.Index != i {
				t.Fatalf("element %d has index %d", i, p.Element.Index)
			}
			e, err := d.Decode(p)
			if err != nil {
				if !IsInvalid(err) {
					t.Fatalf("error is not an InvalidError: %v", err)
				}
				continue
			}
			if e.Time.Before(MinTime) || e.Time.After(MaxTime) {
				t.Fatalf("accepted a time outside the stored range: %s", e.Time)
			}
			checkRoundTrip(t, e)
		}
	})
}
