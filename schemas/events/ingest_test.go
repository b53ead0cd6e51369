package events

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

func ptr[T any](v T) *T { return &v }

// githubLike is a realistic payload of a public API's event archive, written for
// these tests: nested objects, a timestamp from years ago, a numeric id.
const githubLike = `{"id":"28791465122","type":"PushEvent","actor":{"id":1001,"login":"ada"},` +
	`"repo":{"id":77,"name":"ada/engine"},"payload":{"size":2,"commits":[{"sha":"a1"},{"sha":"b2"}]},` +
	`"public":true,"created_at":"2023-05-01T12:00:03Z"}`

func TestRawMappings(t *testing.T) {
	recv := time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC)
	gh := Mapping{Name: "github", Subjects: "events.github.>", Envelope: EnvelopeRaw,
		ID: &Attr{Field: "id"}, Type: &Attr{Field: "type"}, Source: &Attr{Value: "github"},
		Subject: &Attr{Field: "repo.name"}, Time: &TimeAttr{Attr: Attr{Field: "created_at"}}}
	iot := Mapping{Subjects: "events.iot.*", Envelope: EnvelopeRaw,
		ID: &Attr{Header: "Device-Msg"}, Source: &Attr{Token: 3}, Type: &Attr{Value: "reading", Default: nil},
		Time: &TimeAttr{Attr: Attr{Field: "ts"}, Format: FormatUnixMs}}
	logs := Mapping{Subjects: "events.logs.>", Envelope: EnvelopeRaw,
		ID: &Attr{Field: "meta.request_id", Default: ptr("none")}, Subject: &Attr{Field: "items.1.sku"},
		Time: &TimeAttr{Attr: Attr{Field: "at", Default: ptr(DefaultReceived)}, Format: "layout:02/01/2006 15:04:05"}}
	in := Ingest{Mappings: []Mapping{gh, iot, logs}}
	if err := in.Validate(); err != nil {
		t.Fatal(err)
	}
	d := NewDecoder(nil, &in)
	for _, tt := range []struct {
		name    string
		subject string
		header  map[string][]string
		data    string
		want    Event // ID, Source, Type, Subject, Time compared
		reason  string
	}{
		{name: "github archive event", subject: "events.github.raw", data: githubLike,
			want: Event{ID: "28791465122", Source: "github", Type: "PushEvent", Subject: "ada/engine", Time: time.Date(2023, 5, 1, 12, 0, 3, 0, time.UTC)}},
		{name: "missing time", subject: "events.github.raw", data: `{"id":"1","type":"t","repo":{"name":"r"}}`,
			reason: `mapping "github": time: field created_at is missing or empty`},
		{name: "empty time", subject: "events.github.raw", data: `{"id":"1","type":"t","repo":{"name":"r"},"created_at":""}`,
			reason: `time: field created_at is missing or empty`},
		{name: "bad time", subject: "events.github.raw", data: `{"id":"1","type":"t","repo":{"name":"r"},"created_at":"yesterday"}`,
			reason: `mapping "github": time: field created_at "yesterday" is not an ISO 8601 time`},
		{name: "number time without a unit", subject: "events.github.raw", data: `{"id":"1","type":"t","repo":{"name":"r"},"created_at":1700000000}`,
			reason: `is the number 1700000000; set the mapping's time format to unix`},
		{name: "object id", subject: "events.github.raw", data: `{"id":{"x":1},"type":"t","repo":{"name":"r"},"created_at":"2023-05-01T12:00:03Z"}`,
			reason: `mapping "github": id: field id is an object, not a string, number or boolean`},
		{name: "missing nested subject", subject: "events.github.raw", data: `{"id":"1","type":"t","created_at":"2023-05-01T12:00:03Z"}`,
			reason: `mapping "github": subject: field repo.name is missing or empty`},
		{name: "before 1970", subject: "events.github.raw", data: `{"id":"1","type":"t","repo":{"name":"r"},"created_at":"1969-12-31T23:59:59Z"}`,
			reason: `time: field created_at 1969-12-31T23:59:59Z is outside the range sluice stores`},
		{name: "after 2106", subject: "events.github.raw", data: `{"id":"1","type":"t","repo":{"name":"r"},"created_at":"2106-02-08T00:00:00Z"}`,
			reason: `is outside the range sluice stores`},
		{name: "not JSON", subject: "events.github.raw", data: `id=1 type=t`, reason: `mapping "github": payload is not valid JSON`},
		{name: "empty", subject: "events.github.raw", data: ` `, reason: `mapping "github": payload is empty`},
		{name: "a JSON string is data too", subject: "events.logs.app", data: `"plain text line"`,
			want: Event{ID: "none", Source: "logs", Type: "app", Time: recv}, reason: `subject: field items.1.sku is missing or empty`},
		{name: "header id, token source, unix ms", subject: "events.iot.plant7", header: map[string][]string{"Device-Msg": {"m-9"}},
			data: `{"ts":1700000000123,"temp":21.5}`,
			want: Event{ID: "m-9", Source: "plant7", Type: "reading", Time: time.UnixMilli(1700000000123).UTC()}},
		{name: "header missing", subject: "events.iot.plant7", data: `{"ts":1700000000123}`,
			reason: `mapping "events.iot.*": id: header Device-Msg is missing or empty`},
		{name: "unix ms as a string with an exponent", subject: "events.iot.plant7", header: map[string][]string{"Device-Msg": {"m"}},
			data: `{"ts":"1.7e12"}`, want: Event{ID: "m", Source: "plant7", Type: "reading", Time: time.UnixMilli(1.7e12).UTC()}},
		{name: "defaults and array index", subject: "events.logs.app", data: `{"items":[{"sku":"a"},{"sku":"b"}]}`,
			want: Event{ID: "none", Source: "logs", Type: "app", Subject: "b", Time: recv}},
		{name: "custom layout", subject: "events.logs.app", data: `{"items":[{},{"sku":"b"}],"at":"31/12/2024 23:00:01","meta":{"request_id":7}}`,
			want: Event{ID: "7", Source: "logs", Type: "app", Subject: "b", Time: time.Date(2024, 12, 31, 23, 0, 1, 0, time.UTC)}},
		{name: "custom layout unparseable takes the default", subject: "events.logs.app", data: `{"items":[{},{"sku":"b"}],"at":"2024-12-31"}`,
			want: Event{ID: "none", Source: "logs", Type: "app", Subject: "b", Time: recv}},
		{name: "unmapped subject stays CloudEvents", subject: "events.shop.order", data: `{"id":"c1","data":{"a":1}}`,
			want: Event{ID: "c1", Source: "shop", Type: "order", Time: recv}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e, err := d.Decode(Message{Subject: tt.subject, Header: tt.header, Data: []byte(tt.data), Received: recv})
			if tt.reason != "" && tt.want.Source == "" {
				if err == nil || !IsInvalid(err) || !strings.Contains(err.Error(), tt.reason) {
					t.Fatalf("got %v, want an invalid event: %q", err, tt.reason)
				}
				return
			}
			if err != nil {
				if tt.reason != "" && strings.Contains(err.Error(), tt.reason) {
					return
				}
				t.Fatal(err)
			}
			got := Event{ID: e.ID, Source: e.Source, Type: e.Type, Subject: e.Subject, Time: e.Time}
			if got.ID != tt.want.ID || got.Source != tt.want.Source || got.Type != tt.want.Type || got.Subject != tt.want.Subject || !got.Time.Equal(tt.want.Time) {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if strings.HasPrefix(tt.subject, "events.github") && string(e.Data) != githubLike {
				t.Fatalf("data is not the whole payload: %s", e.Data)
			}
		})
	}
}

func TestTimeFormats(t *testing.T) {
	utc := func(y int, mo time.Month, d, h, mi, s, ns int) time.Time {
		return time.Date(y, mo, d, h, mi, s, ns, time.UTC)
	}
	for _, tt := range []struct {
		in, format string
		want       time.Time
		bad        bool
	}{
		{"2026-01-02T03:04:05Z", "", utc(2026, 1, 2, 3, 4, 5, 0), false},
		{"2026-01-02T03:04:05.123456789+02:00", "", utc(2026, 1, 2, 1, 4, 5, 123456789), false},
		{"2026-01-02 03:04:05", "", utc(2026, 1, 2, 3, 4, 5, 0), false},
		{"2026-01-02t03:04:05z", "", utc(2026, 1, 2, 3, 4, 5, 0), false},
		{"2026-01-02T03:04:05,5Z", "", utc(2026, 1, 2, 3, 4, 5, 5e8), false},
		{"2026-01-02T03:04:05.25", "", utc(2026, 1, 2, 3, 4, 5, 25e7), false},
		{"2026-01-02T03:04:05+0130", "", utc(2026, 1, 2, 1, 34, 5, 0), false},
		{"2026-01-02T03:04:05-05", "", utc(2026, 1, 2, 8, 4, 5, 0), false},
		{"2026-01-02T03:04", "", utc(2026, 1, 2, 3, 4, 0, 0), false},
		{"2026-01-02", "", utc(2026, 1, 2, 0, 0, 0, 0), false},
		{"2016-12-31T23:59:60Z", "", utc(2017, 1, 1, 0, 0, 0, 0), false}, // a leap second
		{"2016-12-31T23:59:60.5Z", "", utc(2017, 1, 1, 0, 0, 0, 0), false},
		{"1969-07-20T20:17:40Z", "", utc(1969, 7, 20, 20, 17, 40, 0), false}, // parsed; the range check is the decoder's
		{"2200-01-01T00:00:00Z", "", utc(2200, 1, 1, 0, 0, 0, 0), false},
		{"2026-13-01T00:00:00Z", "", time.Time{}, true},
		{"2026-01-02T25:00:00Z", "", time.Time{}, true},
		{"", "", time.Time{}, true},
		{"yesterday", "", time.Time{}, true},
		{"1700000000", FormatUnix, utc(2023, 11, 14, 22, 13, 20, 0), false},
		{"1700000000.5", FormatUnix, utc(2023, 11, 14, 22, 13, 20, 5e8), false},
		{"1.7e9", FormatUnix, utc(2023, 11, 14, 22, 13, 20, 0), false},
		{"17E8", FormatUnix, utc(2023, 11, 14, 22, 13, 20, 0), false},
		{"-1", FormatUnix, utc(1969, 12, 31, 23, 59, 59, 0), false},
		{"-0.5", FormatUnix, utc(1969, 12, 31, 23, 59, 59, 5e8), false},
		{"4294967296", FormatUnix, utc(2106, 2, 7, 6, 28, 16, 0), false},
		{"1700000000123", FormatUnixMs, utc(2023, 11, 14, 22, 13, 20, 123e6), false},
		{"1700000000123456", FormatUnixUs, utc(2023, 11, 14, 22, 13, 20, 123456e3), false},
		{"1700000000123456789", FormatUnixNs, utc(2023, 11, 14, 22, 13, 20, 123456789), false},
		{"1.7000000001234567e18", FormatUnixNs, utc(2023, 11, 14, 22, 13, 20, 123456700), false},
		{"1700000000123.9999", FormatUnixMs, utc(2023, 11, 14, 22, 13, 20, 123999900), false},
		{"1e400", FormatUnix, time.Time{}, true},
		{"1e30", FormatUnix, time.Time{}, true},
		{"0x10", FormatUnix, time.Time{}, true},
		{"1/2", FormatUnix, time.Time{}, true},
		{"+5", FormatUnix, time.Time{}, true},
		{"", FormatUnix, time.Time{}, true},
		{"NaN", FormatUnix, time.Time{}, true},
		{"01.02.2024 10:11", "layout:02.01.2006 15:04", utc(2024, 2, 1, 10, 11, 0, 0), false},
		{"01.02.2024 10:11 +0100", "layout:02.01.2006 15:04 -0700", utc(2024, 2, 1, 9, 11, 0, 0), false},
		{"2024-02-01", "layout:02.01.2006 15:04", time.Time{}, true},
	} {
		got, err := parseTimeText(tt.in, tt.format)
		if tt.bad {
			if err == nil {
				t.Errorf("%q (%s): got %s, want an error", tt.in, tt.format, got)
			}
			continue
		}
		if err != nil || !got.Equal(tt.want) {
			t.Errorf("%q (%s): got %s %v, want %s", tt.in, tt.format, got, err, tt.want)
		}
	}
}

func TestBatches(t *testing.T) {
	recv := time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC)
	in := Ingest{Mappings: []Mapping{
		{Subjects: "events.app.logs", Envelope: EnvelopeRaw, Batch: BatchNDJSON, ID: &Attr{Field: "rid"}},
		{Subjects: "events.app.>", Envelope: EnvelopeRaw, Batch: BatchArray, ID: &Attr{Field: "rid"}},
		{Subjects: "events.ce.>", Batch: BatchArray},
	}}
	if err := in.Validate(); err != nil {
		t.Fatal(err)
	}
	d := NewDecoder(nil, &in)
	decodeAll := func(subject string, header map[string][]string, payload string) (ids []string, reasons []string, whole error) {
		m := Message{Subject: subject, Header: header, Data: []byte(payload), Received: recv}
		parts, err := d.Split(m)
		if err != nil {
			return nil, nil, err
		}
		if parts == nil {
			parts = []Message{m}
		}
		for _, p := range parts {
			e, err := d.Decode(p)
			if err != nil {
				reasons = append(reasons, err.Error())
				continue
			}
			ids = append(ids, e.ID)
		}
		return ids, reasons, nil
	}
	ids, reasons, err := decodeAll("events.app.orders", nil, ` [{"rid":"a","n":1}, {"n":2}, {"rid":"c","n":[3]}] `)
	if err != nil || strings.Join(ids, ",") != "a,c" || len(reasons) != 1 || !strings.Contains(reasons[0], `batch element 1: mapping "events.app.>": id: field rid is missing`) {
		t.Fatalf("array batch: ids %v, reasons %v, err %v", ids, reasons, err)
	}
	ids, _, err = decodeAll("events.app.orders", nil, `{"rid":"single"}`)
	if err != nil || strings.Join(ids, ",") != "single" {
		t.Fatalf("an object under an array mapping is one event: %v %v", ids, err)
	}
	if _, _, err := decodeAll("events.app.orders", nil, `[]`); err == nil || !strings.Contains(err.Error(), "holds no events") {
		t.Fatalf("empty batch: %v", err)
	}
	if _, _, err := decodeAll("events.app.orders", nil, `[{"rid":"a"},`); err == nil || !strings.Contains(err.Error(), "not a valid JSON array") {
		t.Fatalf("truncated batch: %v", err)
	}
	ids, reasons, err = decodeAll("events.app.logs", nil, "{\"rid\":\"l1\"}\r\n\n  {\"rid\":\"l2\"}\nnot json\n{\"rid\":\"l3\"}")
	if err != nil || strings.Join(ids, ",") != "l1,l2,l3" || len(reasons) != 1 || !strings.Contains(reasons[0], "batch element 2: ") || !strings.Contains(reasons[0], "not valid JSON") {
		t.Fatalf("ndjson: ids %v, reasons %v, err %v", ids, reasons, err)
	}
	// CloudEvents batches: by mapping, or by the content type of the JSON batch format.
	ids, reasons, err = decodeAll("events.ce.x", nil, `[{"id":"e1","data":1},{"id":"e2","nested":{"a":1}},{"id":"e3"}]`)
	if err != nil || strings.Join(ids, ",") != "e1,e3" || len(reasons) != 1 || !strings.Contains(reasons[0], `batch element 1: `) || !strings.Contains(reasons[0], `member "nested"`) {
		t.Fatalf("cloudevents batch: ids %v, reasons %v, err %v", ids, reasons, err)
	}
	ids, _, err = decodeAll("events.other.x", map[string][]string{"Content-Type": {"application/cloudevents-batch+json"}, "ce-id": {"ignored"}}, `[{"id":"b1"},{"id":"b2"}]`)
	if err != nil || strings.Join(ids, ",") != "b1,b2" {
		t.Fatalf("cloudevents-batch content type: %v %v", ids, err)
	}
	if parts, err := d.Split(Message{Subject: "events.other.x", Data: []byte(`[{"id":"b1"}]`)}); parts != nil || err != nil {
		t.Fatalf("an unmapped subject is never a batch: %v %v", parts, err)
	}
	parts, _ := d.Split(Message{Subject: "events.app.orders", Data: []byte(`[{"rid":"a"}]`)})
	if again, err := d.Split(parts[0]); again != nil || err != nil {
		t.Fatalf("an element is not split again: %v %v", again, err)
	}
}

func TestInvalidMembers(t *testing.T) {
	recv := time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC)
	payload := `{"id":"1","source":"s","type":"t","actor":{"login":"ada"},"tags":["a"],"traceparent":"00-x","count":3}`
	for _, tt := range []struct {
		mode, payload, data, reason string
		kept                        int
		header                      map[string][]string
	}{
		{mode: "", payload: payload, reason: `member "actor" is not a valid CloudEvents extension attribute: it is an object`},
		{mode: MembersReject, payload: `{"id":"1","Bad-Name":"x"}`, reason: `member "Bad-Name" is not a valid CloudEvents extension attribute: its name is not lower-case letters and digits`},
		{mode: MembersReject, payload: `{"id":"1"}`, header: map[string][]string{"ce-id": {"1"}, "ce-trace-id": {"x"}}, reason: `member "trace-id"`},
		{mode: MembersReject, payload: `{"id":"1","traceparent":"00-x","n":1,"ok":true,"z":null}`, data: ``},
		{mode: MembersExtensions, payload: payload, kept: 2},
		{mode: MembersData, payload: payload, data: `{"actor":{"login":"ada"},"tags":["a"]}`, kept: 2},
		{mode: MembersData, payload: `{"id":"1","actor":{"login":"ada"},"data":{"x":1}}`, data: `{"actor":{"login":"ada"},"x":1}`, kept: 1},
		{mode: MembersData, payload: `{"id":"1","actor":{"login":"ada"},"data":{"actor":1}}`, reason: "data has a member of that name"},
		{mode: MembersData, payload: `{"id":"1","actor":{"login":"ada"},"data":[1]}`, reason: "data is an array, not an object"},
	} {
		in := Ingest{InvalidMembers: tt.mode}
		if err := in.Validate(); err != nil {
			t.Fatal(err)
		}
		e, err := NewDecoder(nil, &in).Decode(Message{Subject: "events.s.t", Header: tt.header, Data: []byte(tt.payload), Received: recv})
		if tt.reason != "" {
			if err == nil || !strings.Contains(err.Error(), tt.reason) {
				t.Errorf("%s %s: got %v, want %q", tt.mode, tt.payload, err, tt.reason)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s %s: %v", tt.mode, tt.payload, err)
			continue
		}
		if e.NonStandard != tt.kept || (tt.data != "" && !sameJSON(e.Data, json.RawMessage(tt.data))) {
			t.Errorf("%s %s: kept %d, data %s; want %d, %s", tt.mode, tt.payload, e.NonStandard, e.Data, tt.kept, tt.data)
		}
		if tt.mode == MembersData {
			for name := range e.Extensions {
				if name == "actor" || name == "tags" {
					t.Errorf("%s: %q left in extensions", tt.payload, name)
				}
			}
		}
	}
}

func TestIngestConfig(t *testing.T) {
	var in Ingest
	doc := `
invalid_members: data
max_future: 2h
mappings:
  - name: github
    subjects: events.github.>
    envelope: raw
    batch: ndjson
    id: {field: id}
    source: {value: github}
    type: {field: type}
    time: {field: created_at, format: iso8601, default: received}
`
	if err := yaml.Unmarshal([]byte(doc), &in); err != nil {
		t.Fatal(err)
	}
	if err := in.Validate(); err != nil {
		t.Fatal(err)
	}
	if m := in.mappingFor("events.github.raw"); m == nil || m.Time.Field != "created_at" || *m.Time.Default != DefaultReceived || m.Batch != BatchNDJSON {
		t.Fatalf("decoded %+v", in)
	}
	// max_future: an event 90 minutes ahead of its arrival passes under 2h, and a
	// raw mapping's time is judged alike.
	recv := time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC)
	line := `{"id":"1","type":"push","created_at":"2026-11-21T11:30:00Z"}`
	if _, err := NewDecoder(nil, &in).Decode(Message{Subject: "events.github.raw", Data: []byte(line), Received: recv}); err != nil {
		t.Fatalf("90 minutes ahead under max_future 2h: %v", err)
	}
	_, err := NewDecoder(nil, &Ingest{Mappings: in.Mappings}).Decode(Message{Subject: "events.github.raw", Data: []byte(line), Received: recv})
	if !IsInvalid(err) || !strings.Contains(err.Error(), "1h30m0s ahead of when the event was received") {
		t.Fatalf("90 minutes ahead under the default max_future: %v", err)
	}
	bad := Ingest{InvalidMembers: "drop", MaxFuture: -time.Second, Mappings: []Mapping{
		{Subjects: "events..x", Envelope: "avro", Batch: "csv"},
		{Subjects: "events.a", ID: &Attr{Field: "id"}},
		{Subjects: "events.b", Envelope: EnvelopeRaw, ID: &Attr{Field: "id", Value: "x"}, Type: &Attr{}, Subject: &Attr{Field: "a..b"},
			Time: &TimeAttr{Attr: Attr{Field: "t", Default: ptr("soon")}, Format: "unix_days"}},
	}}
	err = bad.Validate()
	for _, want := range []string{
		`ingest.invalid_members must be`, `ingest.max_future must not be negative, got -1s`, `mappings[0]: subjects "events..x" is not a subject pattern`, `envelope must be "cloudevents" or "raw", got "avro"`,
		`batch must be`, `mappings[1]: id: attributes are mapped for envelope "raw" only`, `mappings[2]: id: set exactly one of`,
		`type: set exactly one of`, `subject: field "a..b" has an empty step`, `time: format must be`, `time: default must be "received" or an ISO 8601 time`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate: %v\nwant it to say %q", err, want)
		}
	}
}

func TestSubjectMatches(t *testing.T) {
	for _, tt := range []struct {
		subject, pattern string
		want             bool
	}{
		{"events.a.b", "events.a.b", true}, {"events.a.b", "events.*.b", true}, {"events.a.b", "events.>", true},
		{"events", "events.>", false}, {"events.a", "events.*.b", false}, {"events.a.b.c", "events.*.b", false},
		{"events.a.b", "events.a", false}, {"events.a.b", ">", true}, {"events.ab", "events.a*", false},
	} {
		if got := subjectMatches(tt.subject, tt.pattern); got != tt.want {
			t.Errorf("subjectMatches(%q, %q) = %v", tt.subject, tt.pattern, got)
		}
	}
	for p, want := range map[string]bool{"events.>": true, "events.*.x": true, "": false, "a.>.b": false, "a.b*": false, "a..b": false, "a b": false} {
		if validPattern(p) != want {
			t.Errorf("validPattern(%q) = %v", p, !want)
		}
	}
}
