package dedup

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	json "github.com/goccy/go-json"

	"github.com/sluicehq/sluice/schemas/deadletters"
	"github.com/sluicehq/sluice/schemas/events"
)

// Key derivation. A key is the first 128 bits of a SHA-256 over a kind tag and the
// parts that identify the event, in hex. With 128 bits, the chance that any two of
// 1e9 distinct keys collide is about 1.5e-21.
//
// In order of precedence:
//  0. for subjects with a key rule (dedup.keys), the rule's fields ("f", see FieldsKey);
//  1. the producer's Nats-Msg-Id header ("m"; on a dead letter's replay, the one
//     the dead letter kept);
//  2. the CloudEvents source and id ("e");
//  3. for an event without id, its content: the NATS subject, the ce-* headers and
//     the payload as published ("c").
//
// An event of a batch message (events.Element) is keyed by its own id ("e"), else
// by its place in the batch: the batch's Nats-Msg-Id or content, and its index
// ("b"), so a batch published again is dropped event by event while two equal
// events of one batch both count.
func keyOf(parts ...string) string {
	h := sha256.New()
	for _, p := range parts {
		h.Write([]byte(p))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// Key returns the deduplication key of e, which arrived as m.
func Key(e *events.Event, m events.Message) string {
	if el := m.Element; el != nil {
		if e.ID != "" {
			return keyOf("e", e.Source, e.ID)
		}
		batch := producerID(m.Header)
		if batch == "" {
			batch = contentKey(events.Message{Subject: m.Subject, Header: m.Header, Data: el.Batch})
		}
		return keyOf("b", batch, strconv.Itoa(el.Index))
	}
	if id := producerID(m.Header); id != "" {
		return keyOf("m", id)
	}
	if e.ID != "" {
		return keyOf("e", e.Source, e.ID)
	}
	return contentKey(m)
}

// producerID is the producer's Nats-Msg-Id; on input `sluice dlq replay` published
// again, the one its dead letter kept (deadletters.HeaderMsgID), for which the
// replay's own Nats-Msg-Id stands in.
func producerID(h map[string][]string) string {
	if headerValue(h, deadletters.HeaderReplayOf) != "" {
		return headerValue(h, deadletters.HeaderMsgID) // empty: the input had none
	}
	return headerValue(h, "Nats-Msg-Id")
}

func contentKey(m events.Message) string {
	parts := []string{"c", m.Subject}
	var ce []string
	for k, v := range m.Header {
		if len(k) > 3 && strings.EqualFold(k[:3], "ce-") && len(v) > 0 {
			ce = append(ce, strings.ToLower(k)+"="+v[0])
		}
	}
	slices.Sort(ce)
	parts = append(parts, ce...)
	parts = append(parts, string(m.Data))
	return keyOf(parts...)
}

func headerValue(h map[string][]string, name string) string {
	if v := h[name]; len(v) > 0 {
		return v[0]
	}
	for k, v := range h {
		if strings.EqualFold(k, name) && len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

// KeyRule keys the events published to subjects matching Subjects by Fields, for
// producers whose ids are not stable. A field is an envelope attribute (id, source,
// type, subject, time, datacontenttype, dataschema), data (all of it), or a path
// into the JSON data: data.device.id.
type KeyRule struct {
	Subjects string   `yaml:"subjects"`
	Fields   []string `yaml:"fields"`
}

var attrFields = map[string]func(*events.Event) string{
	"id":              func(e *events.Event) string { return e.ID },
	"source":          func(e *events.Event) string { return e.Source },
	"type":            func(e *events.Event) string { return e.Type },
	"subject":         func(e *events.Event) string { return e.Subject },
	"time":            func(e *events.Event) string { return e.Time.Format(time.RFC3339Nano) },
	"datacontenttype": func(e *events.Event) string { return e.DataContentType },
	"dataschema":      func(e *events.Event) string { return e.DataSchema },
	"data":            func(e *events.Event) string { return string(e.Data) },
}

// checkField reports a field name FieldsKey cannot read.
func checkField(f string) error {
	if _, ok := attrFields[f]; ok {
		return nil
	}
	if path, ok := strings.CutPrefix(f, "data."); ok && !slices.Contains(strings.Split(path, "."), "") {
		return nil
	}
	return fmt.Errorf("key field %q is not an envelope attribute (%s), data, or data.<path>", f, strings.Join(slices.Sorted(maps.Keys(attrFields)), ", "))
}

// FieldsKey keys e by the given fields. A data path that the event lacks is an
// error: the event is dead-lettered rather than keyed by less than asked.
func FieldsKey(e *events.Event, fields []string) (string, error) {
	parts := make([]string, 0, len(fields)+1)
	parts = append(parts, "f")
	var data any
	decoded := false
	for _, f := range fields {
		if get, ok := attrFields[f]; ok {
			parts = append(parts, get(e))
			continue
		}
		if !decoded {
			if len(e.Data) == 0 || json.Unmarshal(e.Data, &data) != nil {
				return "", fmt.Errorf("key field %s: the event has no JSON data", f)
			}
			decoded = true
		}
		v := data
		for step := range strings.SplitSeq(strings.TrimPrefix(f, "data."), ".") {
			obj, ok := v.(map[string]any)
			if !ok {
				return "", fmt.Errorf("key field %s is missing from the event's data", f)
			}
			if v, ok = obj[step]; !ok {
				return "", fmt.Errorf("key field %s is missing from the event's data", f)
			}
		}
		raw, _ := json.Marshal(v)
		parts = append(parts, string(raw))
	}
	return keyOf(parts...), nil
}
