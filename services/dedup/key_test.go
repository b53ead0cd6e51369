package dedup

import (
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/events"
)

func TestKey(t *testing.T) {
	d := events.NewDecoder(nil)
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
