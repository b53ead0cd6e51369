package events

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

func TestDecode(t *testing.T) {
	types, err := LoadTypeSchemas()
	if err != nil {
		t.Fatal(err)
	}
	d := NewDecoder(types, nil)
	recv := time.Date(2026, 11, 21, 10, 0, 0, 123e6, time.UTC)
	tests := []struct {
		name       string
		subject    string
		header     map[string][]string
		data       string
		want       Event // only the fields set here are compared
		wantReason string
	}{
		{name: "structured full", subject: "events.web.click",
			data: `{"specversion":"1.0","id":"a1","source":"shop","type":"order.created","time":"2026-01-02T03:04:05.678Z","subject":"o1","data":{"order_id":"o1","amount":3}}`,
			want: Event{ID: "a1", Source: "shop", Type: "order.created", SpecVersion: "1.0", Subject: "o1", Time: time.Date(2026, 1, 2, 3, 4, 5, 678e6, time.UTC)}},
		{name: "lenient defaults from subject", subject: "events.web.page.view", data: `{"id":"x"}`,
			want: Event{ID: "x", Source: "web", Type: "page.view", SpecVersion: "1.0", Time: recv}},
		{name: "no id is accepted", subject: "events.web.click", data: `{"data":{"a":1}}`,
			want: Event{Source: "web", Type: "click", SpecVersion: "1.0", Time: recv}},
		{name: "extensions kept", subject: "events.a.b", data: `{"id":"1","traceparent":"00-x"}`,
			want: Event{ID: "1", Source: "a", Type: "b"}},
		{name: "binary mode", subject: "events.web.click",
			header: map[string][]string{"ce-id": {"b1"}, "ce-source": {"crm"}, "ce-type": {"user.signup"}, "ce-specversion": {"1.0"}, "Content-Type": {"application/json"}},
			data:   `{"user":"u1"}`,
			want:   Event{ID: "b1", Source: "crm", Type: "user.signup", SpecVersion: "1.0", DataContentType: "application/json", Time: recv}},
		{name: "binary mode non-JSON data", subject: "events.iot.blob",
			header: map[string][]string{"Ce-Id": {"b2"}, "Content-Type": {"application/octet-stream"}},
			data:   "\x00\x01\xff",
			want:   Event{ID: "b2", Source: "iot", Type: "blob", DataBase64: "AAH/"}},
		{name: "a byte order mark first is ignored", subject: "events.a.b", data: "\xEF\xBB\xBF{\"id\":\"1\"}",
			want: Event{ID: "1", Source: "a", Type: "b", SpecVersion: "1.0", Time: recv}},
		{name: "empty payload", subject: "events.a.b", data: "", wantReason: "payload is empty"},
		{name: "truncated JSON", subject: "events.a.b", data: `{"id":"1",`, wantReason: "not valid JSON"},
		{name: "not an object", subject: "events.a.b", data: `[1,2]`, wantReason: "an array, not a JSON object"},
		{name: "not JSON, starting as null does", subject: "events.a.b", data: `nope`, wantReason: "payload is not JSON: invalid character"},
		{name: "not JSON, starting as true does", subject: "events.a.b", data: `tru`, wantReason: "payload is not JSON"},
		{name: "trailing data", subject: "events.a.b", data: `{"id":"1"} {}`, wantReason: "data after the JSON object"},
		{name: "invalid UTF-8", subject: "events.a.b", data: "{\"id\":\"\xff\"}", wantReason: "not valid UTF-8 at byte 7"},
		{name: "id wrong type", subject: "events.a.b", data: `{"id":5}`, wantReason: `attribute "id" must be a string, got a number`},
		{name: "source wrong type", subject: "events.a.b", data: `{"id":"1","source":{}}`, wantReason: `attribute "source" must be a string, got an object`},
		{name: "empty id", subject: "events.a.b", data: `{"id":""}`, wantReason: `"id" is empty`},
		{name: "bad specversion", subject: "events.a.b", data: `{"id":"1","specversion":"0.3"}`, wantReason: `specversion "0.3" is not supported`},
		{name: "bad time", subject: "events.a.b", data: `{"id":"1","time":"yesterday"}`, wantReason: `"time" "yesterday" is not an RFC 3339 timestamp`},
		{name: "time before 1970", subject: "events.a.b", data: `{"id":"1","time":"1969-12-31T23:59:59Z"}`, wantReason: "outside the range"},
		{name: "time after 2106", subject: "events.a.b", data: `{"id":"1","time":"2106-02-08T00:00:00Z"}`, wantReason: "outside the range"},
		// recv is 10:00:00.123: up to ingest.max_future (10 min by default) ahead passes.
		{name: "time ahead within max_future", subject: "events.a.b", data: `{"id":"1","time":"2026-11-21T10:10:00Z"}`,
			want: Event{ID: "1", Time: time.Date(2026, 11, 21, 10, 10, 0, 0, time.UTC)}},
		{name: "time too far ahead", subject: "events.a.b", data: `{"id":"1","time":"2026-11-21T10:10:01Z"}`,
			wantReason: "time 2026-11-21T10:10:01Z is 10m1s ahead of when the event was received (2026-11-21T10:00:00.123Z); more than ingest.max_future (10m0s) ahead is refused"},
		{name: "time years ahead", subject: "events.a.b", data: `{"id":"1","time":"2099-01-01T00:00:00Z"}`, wantReason: "ahead of when the event was received"},
		{name: "no source anywhere", subject: "other", data: `{"id":"1"}`, wantReason: "source is missing"},
		{name: "schema violation", subject: "events.shop.x", data: `{"id":"1","type":"order.created","data":{"order_id":"o","amount":"lots"}}`, wantReason: `schema of type "order.created": at /amount`},
		{name: "both data forms", subject: "events.a.b", data: `{"id":"1","data":1,"data_base64":"AA=="}`, wantReason: "both"},
		{name: "header contradicts body", subject: "events.a.b",
			header: map[string][]string{"Content-Type": {"application/cloudevents+json"}, "ce-id": {"2"}},
			data:   `{"id":"1"}`, wantReason: `header ce-id "2" contradicts`},
		{name: "duplicate attribute", subject: "events.a.b", data: `{"id":"1","id":"2"}`, wantReason: `attribute "id" appears twice`},
		{name: "duplicate after nested commas", subject: "events.a.b", data: `{"data":{"a":[1,2],"b":"x,\"y"},"source":"s","id":"1","source":"t"}`, wantReason: `attribute "source" appears twice`},
		{name: "NaN", subject: "events.a.b", data: `{"id":"1","data":{"v":NaN}}`, wantReason: "not valid JSON"},
		{name: "huge id", subject: "events.a.b", data: `{"id":"` + strings.Repeat("x", 5000) + `"}`, wantReason: `attribute "id" is 5000 bytes long`},
		{name: "deep nesting", subject: "events.a.b", data: `{"id":"1","data":` + strings.Repeat("[", 10001) + strings.Repeat("]", 10001) + `}`, wantReason: "exceeded max depth"},
		{name: "integer beyond 2^64 as time", subject: "events.a.b", data: `{"id":"1","time":18446744073709551616}`, wantReason: `attribute "time" must be a string, got a number`},
		{name: "binary invalid JSON data", subject: "events.a.b", header: map[string][]string{"ce-id": {"1"}}, data: `{`, wantReason: "binary-mode data is not valid JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, err := d.Decode(Message{Subject: tt.subject, Header: tt.header, Data: []byte(tt.data), Received: recv})
			if tt.wantReason != "" {
				var ie *InvalidError
				if !errors.As(err, &ie) {
					t.Fatalf("err = %v, want *InvalidError", err)
				}
				if !strings.Contains(ie.Reason, tt.wantReason) {
					t.Fatalf("reason = %q, want it to contain %q", ie.Reason, tt.wantReason)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			check := func(field, got, want string) {
				if want != "" && got != want {
					t.Errorf("%s = %q, want %q", field, got, want)
				}
			}
			check("id", e.ID, tt.want.ID)
			check("source", e.Source, tt.want.Source)
			check("type", e.Type, tt.want.Type)
			check("specversion", e.SpecVersion, tt.want.SpecVersion)
			check("subject", e.Subject, tt.want.Subject)
			check("datacontenttype", e.DataContentType, tt.want.DataContentType)
			check("data_base64", e.DataBase64, tt.want.DataBase64)
			if !tt.want.Time.IsZero() && !e.Time.Equal(tt.want.Time) {
				t.Errorf("time = %v, want %v", e.Time, tt.want.Time)
			}
			if e.ReceivedAt != recv || e.NATSSubject != tt.subject {
				t.Errorf("received/subject = %v %q", e.ReceivedAt, e.NATSSubject)
			}
		})
	}
}

// The inter-stage form must match the envelope schema, and round-trip.
func TestMarshalMatchesEnvelopeSchema(t *testing.T) {
	d := NewDecoder(nil, nil)
	e, err := d.Decode(Message{Subject: "events.web.click", Data: []byte(`{"id":"1","traceparent":"x","data":{"k":[1,2]}}`), Received: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	e.Key = "k1"
	e.Data = []byte(`{"q":"a&b<c>"}`)
	b, err := e.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(EnvelopeSchema()))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.AddResource("envelope.json", doc); err != nil {
		t.Fatal(err)
	}
	sch, err := c.Compile("envelope.json")
	if err != nil {
		t.Fatal(err)
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if err := sch.Validate(inst); err != nil {
		t.Fatalf("%s does not match the envelope schema: %v", b, err)
	}
	back, err := Unmarshal(b)
	if err != nil {
		t.Fatal(err)
	}
	if back.Key != "k1" || back.ID != "1" || string(back.Data) != `{"q":"a&b<c>"}` || !back.Time.Equal(e.Time) {
		t.Fatalf("round trip = %+v", back)
	}
}

func TestTopLevelMembers(t *testing.T) {
	for in, want := range map[string]int{
		`{}`: 0, ` { } `: 0, `{"a":1}`: 1, `{"a":[1,2,{"b":3,"c":4}],"d":"x,y","e":"\\"}`: 3, `{"a":"}{","b":{}}`: 2,
	} {
		if got := topLevelMembers([]byte(in)); got != want {
			t.Errorf("topLevelMembers(%s) = %d, want %d", in, got, want)
		}
	}
}

// The usual event (envelope attributes and data, each once, none empty or null)
// takes one pass into a struct, and decodes to what the general path gives; any
// other shape goes the general way.
func TestUsualEvents(t *testing.T) {
	for _, tt := range []struct {
		payload string
		usual   bool
	}{
		{`{"specversion":"1.0","id":"a","source":"s","type":"t","time":"2026-01-02T03:04:05.5+01:00","data":{"x":[1,{"id":2}]}}`, true},
		{` {"id":"a\u00e9\"q","subject":"x","datacontenttype":"application/json","dataschema":"s","data":"text"} `, true},
		{`{"id":"a","data":[1,2]}`, true},
		{`{"ID":"a","source":"s"}`, false},           // names are case-sensitive: ID is an extension
		{`{"i\u0064":"a"}`, false},                   // an escaped name
		{`{"id":"a","id":"b"}`, false},               // repeated
		{`{"id":"a","subject":null}`, false},         // null attribute
		{`{"id":"a","data":null}`, false},            // null data
		{`{"id":"","source":"s"}`, false},            // empty id is an error
		{`{"id":"a","ext":"x"}`, false},              // an extension
		{`{"id":"a","data_base64":"AA=="}`, false},   // base64 data
		{`{"id":1}`, false},                          // wrong type
		{`{"id":"a","time":"yesterday"}`, false},     // bad time
		{`{"id":"\ud800x\udc00\ud83d\ude00"}`, true}, // lone surrogates become U+FFFD either way
		{`{"id":"a"} x`, false},                      // trailing data
		{`{"id":"a","data":{"id":1,"ID":2,"x":"\\"}}`, true},
		{`{"data" : 12 , "id":"a"}`, true},                         // data first, spaced, stepped over
		{`{"data":"},\"id\":\"b","source":"s"}`, true},             // data that looks like members
		{`{"data":1,"id":"a","data":1}`, false},                    // repeated, the same
		{`{"data":12,"id":"a","data":1}`, false},                   // repeated, the last a prefix of the first
		{`{"data":{"a":"}"},"id":"a","data":{"a":"}"}}`, false},    // repeated objects
		{`{"data":"x\",\"data\":\"x","id":"a","data":"x"}`, false}, // the last inside the first
	} {
		u, ok := decodeUsual([]byte(tt.payload))
		if ok != tt.usual {
			t.Errorf("%s: usual %v, want %v", tt.payload, ok, tt.usual)
			continue
		}
		if !ok {
			continue
		}
		g, err := decodeGeneral([]byte(tt.payload))
		if err != nil || !reflect.DeepEqual(u, g) {
			t.Errorf("%s: fast path %+v; general path %+v %v", tt.payload, u, g, err)
		}
	}
}
