package dedup

import (
	"bytes"
	"strings"

	"github.com/sluicehq/sluice/services/dedup/window"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/events"
)

func TestKey(t *testing.T) {
	d := events.NewDecoder(nil, nil)
	key := func(subject string, h map[string][]string, data string) string {
		t.Helper()
		m := events.Message{Subject: subject, Header: h, Data: []byte(data), Received: time.Now()}
		e, err := d.Decode(m)
		if err != nil {
			t.Fatal(err)
		}
		return Key(e, m)
	}
	same := []struct {
		name string
		a, b string
	}{
		{"same source and id, other data", key("events.a.b", nil, `{"id":"1","source":"s","data":1}`), key("events.a.b", nil, `{"id":"1","source":"s","data":2}`)},
		{"same id on another subject", key("events.a.b", nil, `{"id":"1","source":"s"}`), key("events.x.y", nil, `{"id":"1","source":"s"}`)},
		{"structured and binary of one event", key("events.a.b", nil, `{"id":"1","source":"s"}`), key("events.a.b", map[string][]string{"ce-id": {"1"}, "ce-source": {"s"}}, `{}`)},
		{"Nats-Msg-Id wins over the body", key("events.a.b", map[string][]string{"Nats-Msg-Id": {"m"}}, `{"id":"1"}`), key("events.a.b", map[string][]string{"Nats-Msg-Id": {"m"}}, `{"id":"2"}`)},
		{"no id: same content", key("events.a.b", nil, `{"data":{"x":1}}`), key("events.a.b", nil, `{"data":{"x":1}}`)},
		{"a replay keeps its input's Nats-Msg-Id", key("events.a.b", map[string][]string{"Nats-Msg-Id": {"m"}}, `{"id":"1"}`),
			key("events.a.b", map[string][]string{"Nats-Msg-Id": {"replay:DLQ:7"}, "Sluice-Msg-Id": {"m"}, "Sluice-Replay-Of": {"7"}}, `{"id":"1"}`)},
		{"a replay without one: its content", key("events.a.b", nil, `{"data":{"x":1}}`),
			key("events.a.b", map[string][]string{"Nats-Msg-Id": {"replay:DLQ:7"}, "Sluice-Replay-Of": {"7"}}, `{"data":{"x":1}}`)},
		{"a replay without one: its id", key("events.a.b", nil, `{"id":"1","source":"s"}`),
			key("events.a.b", map[string][]string{"Nats-Msg-Id": {"replay:DLQ:7"}, "Sluice-Replay-Of": {"7"}}, `{"id":"1","source":"s"}`)},
	}
	for _, tt := range same {
		if tt.a != tt.b {
			t.Errorf("%s: keys differ: %s %s", tt.name, tt.a, tt.b)
		}
	}
	differ := []struct {
		name string
		a, b string
	}{
		{"same id, other source", key("events.a.b", nil, `{"id":"1","source":"s"}`), key("events.a.b", nil, `{"id":"1","source":"t"}`)},
		{"no id: other content", key("events.a.b", nil, `{"data":{"x":1}}`), key("events.a.b", nil, `{"data":{"x":2}}`)},
		{"no id: other subject", key("events.a.b", nil, `{"data":1}`), key("events.a.c", nil, `{"data":1}`)},
		{"msg id vs event id with the same text", key("events.a.b", map[string][]string{"Nats-Msg-Id": {"1"}}, `{}`), key("events.a.b", nil, `{"id":"1","source":"a"}`)},
		{"parts do not run together", key("events.x.y", nil, `{"id":"b","source":"a"}`), key("events.a.b", nil, `{"id":"ab","source":""}`)},
	}
	for _, tt := range differ {
		if tt.a == tt.b {
			t.Errorf("%s: keys are equal: %s", tt.name, tt.a)
		}
	}
	if k := key("events.a.b", nil, `{"id":"1"}`); len(k) != 32 {
		t.Errorf("key %q: want 32 hex characters (128 bits)", k)
	}
}

func TestFieldsKey(t *testing.T) {
	d := events.NewDecoder(nil, nil)
	ev := func(data string) *events.Event {
		t.Helper()
		e, err := d.Decode(events.Message{Subject: "events.iot.reading", Data: []byte(data), Received: time.Now()})
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	fields := []string{"source", "data.device.id", "data.seq"}
	k1, err := FieldsKey(ev(`{"id":"unstable-1","data":{"device":{"id":"d1"},"seq":7}}`), fields)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := FieldsKey(ev(`{"id":"unstable-2","data":{"device":{"id":"d1"},"seq":7,"extra":true}}`), fields)
	if err != nil {
		t.Fatal(err)
	}
	if k1 != k2 {
		t.Fatal("same fields, other ids: keys differ")
	}
	k3, _ := FieldsKey(ev(`{"id":"x","data":{"device":{"id":"d1"},"seq":"7"}}`), fields)
	if k3 == k1 {
		t.Fatal(`seq 7 and "7" must key differently`)
	}
	for _, tt := range []struct{ name, data, want string }{
		{"missing path", `{"id":"x","data":{"device":{}}}`, "key field data.device.id is missing"},
		{"not an object", `{"id":"x","data":{"device":"d1","seq":1}}`, "key field data.device.id is missing"},
		{"no data", `{"id":"x"}`, "the event has no JSON data"},
	} {
		if _, err := FieldsKey(ev(tt.data), fields); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: err = %v, want %q", tt.name, err, tt.want)
		}
	}
	for _, f := range []string{"id", "data", "data.a.b", "time"} {
		if err := checkField(f); err != nil {
			t.Errorf("checkField(%q) = %v", f, err)
		}
	}
	for _, f := range []string{"ids", "data.", "data..a", "datax"} {
		if err := checkField(f); err == nil {
			t.Errorf("checkField(%q) accepted", f)
		}
	}
}

// A key rule keys by its fields, ahead of ids and Nats-Msg-Id; a missing field
// dead-letters the event with the reason.
func TestProcessKeyRule(t *testing.T) {
	w := DefaultWindowConfig()
	w.MinHold = 10 * time.Minute
	w.Keys = []KeyRule{{Subjects: "events.iot.>", Fields: []string{"source", "data.seq"}}}
	if err := w.Validate(); err != nil {
		t.Fatal(err)
	}
	store := window.NewStore(0)
	h, err := NewHandler(HandlerConfig{MaxPayload: 1 << 20, Window: w, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	first := h.Process(events.Message{Subject: "events.iot.r", Data: []byte(`{"id":"a","data":{"seq":1}}`), Received: now})
	if first.Out == nil {
		t.Fatalf("first: %+v", first)
	}
	store.Add(first.Key, first.Expires, 1, unixSeconds(now))
	again := h.Process(events.Message{Subject: "events.iot.r", Header: map[string][]string{"Nats-Msg-Id": {"other"}}, Data: []byte(`{"id":"b","data":{"seq":1}}`), Received: now})
	if !again.Duplicate {
		t.Fatal("same source and seq with another id and Nats-Msg-Id: not recognised")
	}
	bad := h.Process(events.Message{Subject: "events.iot.r", Data: []byte(`{"id":"c","data":{}}`), Received: now})
	if bad.Invalid == nil || !strings.Contains(bad.Invalid.Error(), "key field data.seq is missing") {
		t.Fatalf("missing field: %+v", bad)
	}
	other := h.Process(events.Message{Subject: "events.web.r", Data: []byte(`{"id":"c","data":{}}`), Received: now})
	if other.Out == nil {
		t.Fatalf("other subjects keep the default key: %+v", other)
	}
	w.Keys = []KeyRule{{Subjects: "events.iot.>", Fields: []string{"data.", "nope"}}}
	if err := w.Validate(); err == nil || !strings.Contains(err.Error(), `key field "nope"`) {
		t.Fatalf("Validate = %v", err)
	}
}

// Raw events are keyed by their mapped id, or by a key rule's fields of their data,
// and the elements of a batch each by their own; a repeat is dropped as for
// CloudEvents.
func TestRawKeys(t *testing.T) {
	w := DefaultWindowConfig()
	w.MinHold = 10 * time.Minute
	w.Keys = []KeyRule{{Subjects: "events.meters.>", Fields: []string{"data.meter", "data.at"}}}
	in := events.Ingest{Mappings: []events.Mapping{
		{Subjects: "events.orders.>", Envelope: events.EnvelopeRaw, Batch: events.BatchNDJSON, ID: &events.Attr{Field: "order"}},
		{Subjects: "events.meters.>", Envelope: events.EnvelopeRaw, Batch: events.BatchArray},
	}}
	if err := in.Validate(); err != nil {
		t.Fatal(err)
	}
	store := window.NewStore(0)
	h, err := NewHandler(HandlerConfig{MaxPayload: 1 << 20, Window: w, Ingest: in, Store: store})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	// decide decides every event of a message, adding the first occurrences to the
	// store, and returns how many were new, repeats and invalid.
	decide := func(subject, payload string) (fresh, repeats, bad int) {
		h.DecideAll(events.Message{Subject: subject, Data: []byte(payload), Received: now}, func(d Decision) {
			switch {
			case d.Invalid != nil:
				bad++
			case d.Duplicate:
				repeats++
			default:
				fresh++
				store.Add(d.Key, d.Expires, 1, d.Now)
			}
		})
		return
	}
	if f, r, b := decide("events.orders.eu", "{\"order\":\"o1\",\"n\":1}\n{\"order\":\"o2\"}\n{\"n\":3}"); f != 2 || r != 0 || b != 1 {
		t.Fatalf("first batch: %d new, %d repeats, %d invalid", f, r, b)
	}
	// The same orders in another batch, another shape: repeats by their ids.
	if f, r, b := decide("events.orders.eu", "{\"order\":\"o2\",\"n\":9}\n{\"order\":\"o1\"}\n{\"order\":\"o3\"}"); f != 1 || r != 2 || b != 0 {
		t.Fatalf("second batch: %d new, %d repeats, %d invalid", f, r, b)
	}
	// Key fields of the data: the same meter and time is a repeat whatever else differs.
	if f, r, b := decide("events.meters.x", `[{"meter":"m1","at":1,"kwh":3},{"meter":"m1","at":2,"kwh":4},{"meter":"m1","at":1,"kwh":5},{"at":3}]`); f != 2 || r != 1 || b != 1 {
		t.Fatalf("meters: %d new, %d repeats, %d invalid", f, r, b)
	}
}

// A payload that starts with a UTF-8 byte order mark (.NET's Encoding.UTF8,
// PowerShell, a file saved by an editor) is read without it: a CloudEvent, a raw
// event whose payload is its data, a batch, binary-mode JSON data; keyed by id, an
// event has the key of the same payload without one. Binary-mode data of another
// content type keeps its bytes. It was a dead letter before ("payload is not JSON:
// invalid character 'ï'").
func TestByteOrderMark(t *testing.T) {
	in := events.Ingest{Mappings: []events.Mapping{
		{Subjects: "events.raw.>", Envelope: events.EnvelopeRaw},
		{Subjects: "events.lines.>", Envelope: events.EnvelopeRaw, Batch: events.BatchNDJSON},
		{Subjects: "events.array.>", Envelope: events.EnvelopeRaw, Batch: events.BatchArray},
	}}
	if err := in.Validate(); err != nil {
		t.Fatal(err)
	}
	h, err := NewHandler(HandlerConfig{MaxPayload: 1 << 20, Window: DefaultWindowConfig(), Ingest: in})
	if err != nil {
		t.Fatal(err)
	}
	const bom = "\xEF\xBB\xBF"
	binary := map[string][]string{"ce-id": {"b-1"}, "ce-source": {"s"}, "ce-type": {"t"}, "Content-Type": {"application/json"}}
	decide := func(subject string, h2 map[string][]string, payload string) []Decision {
		var out []Decision
		h.DecideAll(events.Message{Subject: subject, Header: h2, Data: []byte(payload), Received: time.Now()}, func(d Decision) { out = append(out, d) })
		return out
	}
	for _, tc := range []struct {
		subject string
		header  map[string][]string
		payload string
	}{
		{"events.shop.order", nil, `{"specversion":"1.0","id":"o-1","source":"shop","type":"order.placed","data":{"amount":1}}`},
		{"events.shop.order", binary, `{"amount":1}`},
		{"events.raw.x", nil, `{"id":"r-1","amount":1}`},
		{"events.lines.x", nil, "{\"amount\":1}\n{\"amount\":2}"},
		{"events.array.x", nil, `[{"amount":1},{"amount":2}]`},
	} {
		plain, marked := decide(tc.subject, tc.header, tc.payload), decide(tc.subject, tc.header, bom+tc.payload)
		if len(plain) != len(marked) {
			t.Fatalf("%s %s: %d events without the mark, %d with it", tc.subject, tc.payload, len(plain), len(marked))
		}
		for i := range plain {
			if marked[i].Invalid != nil || plain[i].Invalid != nil {
				t.Fatalf("%s %s: event %d invalid: %v (without the mark: %v)", tc.subject, tc.payload, i, marked[i].Invalid, plain[i].Invalid)
			}
			// A batch's elements are keyed by the batch's content and their place.
			keyed := marked[i].Key == plain[i].Key || tc.subject != "events.shop.order"
			if !keyed || !bytes.Equal(marked[i].Event.Data, plain[i].Event.Data) {
				t.Errorf("%s %s: event %d: key %s data %s with the mark, %s %s without", tc.subject, tc.payload, i,
					marked[i].Event.Key, marked[i].Event.Data, plain[i].Event.Key, plain[i].Event.Data)
			}
		}
	}
	octets := map[string][]string{"ce-id": {"b-2"}, "Content-Type": {"application/octet-stream"}}
	if d := decide("events.iot.blob", octets, bom+"\x01"); len(d) != 1 || d[0].Invalid != nil || d[0].Event.DataBase64 != "77u/AQ==" {
		t.Fatalf("binary data starting with the mark's bytes: %+v", d)
	}
}
