package sink

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"

	gojson "github.com/goccy/go-json"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/stage"
	"github.com/sluicehq/sluice/streams"
)

// Table maps the messages of one stream to the rows of one ClickHouse table.
type Table struct {
	Name     string
	Stream   string
	Consumer string
	// Columns are named in every INSERT, in Row's order, with their ClickHouse types
	// (checked against the table at start).
	Columns []Column
	// Row converts a message. An error means the message can never be a row: it is
	// dead-lettered (or, for dead_letters itself, stored with what can be read).
	Row func(msg jetstream.Msg, seq uint64) (Row, error)
	// Identity, if set, is a String column that identifies what a row records (the
	// event key); the replay check compares it as well as the stream sequence.
	Identity string
}

// identity returns the value of the Identity column in values.
func (t *Table) identity(values []any) string {
	for i, c := range t.Columns {
		if c.Name == t.Identity {
			s, _ := values[i].(string)
			return s
		}
	}
	return ""
}

// Row is one row's values, in Columns' order, and the time of what it records (the
// event's time, the alert's start, the dead letter's arrival) for latency metrics.
type Row struct {
	Values []any
	Time   time.Time
}

// Column is a column the sink writes.
type Column struct{ Name, Type string }

// InsertSQL is the INSERT that names every column.
func (t *Table) InsertSQL() string {
	names := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		names[i] = c.Name
	}
	return "INSERT INTO " + t.Name + " (" + strings.Join(names, ", ") + ")"
}

// Tables are the tables the sink fills.
func Tables() []*Table { return []*Table{EventsTable(), deadLettersTable(), alertsTable()} }

// TableNames are the names of Tables, in order.
func TableNames() []string {
	var names []string
	for _, t := range Tables() {
		names = append(names, t.Name)
	}
	return names
}

func splitMillis(t time.Time) (time.Time, uint16) {
	t = t.UTC()
	return t.Truncate(time.Second), uint16(t.Nanosecond() / int(time.Millisecond))
}

// EventsTable maps ENRICHED to the events table.
func EventsTable() *Table {
	return &Table{
		Name: "events", Stream: streams.Enriched, Consumer: "sink", Identity: "key",
		Columns: []Column{
			{"key", "String"}, {"id", "String"}, {"source", "String"}, {"type", "String"}, {"subject", "String"},
			{"specversion", "String"}, {"datacontenttype", "String"}, {"dataschema", "String"},
			{"event_time", "DateTime"}, {"event_time_ms", "UInt16"}, {"received_at", "DateTime"}, {"received_at_ms", "UInt16"},
			{"data", "String"}, {"extensions", "String"}, {"nats_subject", "String"},
			{"geo_country", "String"}, {"geo_asn", "UInt32"}, {"geo_as_org", "String"},
			{"ua_browser", "String"}, {"ua_os", "String"}, {"ua_device", "String"}, {"enrichment", "String"},
			{"stream_seq", "UInt64"},
		},
		Row: eventRow,
	}
}

// enrichmentColumns are the enrichment fields with columns of their own.
var enrichmentColumns = []string{"geo_country", "geo_asn", "geo_as_org", "ua_browser", "ua_os", "ua_device"}

func eventRow(msg jetstream.Msg, seq uint64) (Row, error) { return eventRowOf(msg.Data(), seq) }

func eventRowOf(data []byte, seq uint64) (Row, error) {
	e, err := events.Unmarshal(data)
	if err != nil {
		return Row{}, err
	}
	return EventRow(e, seq)
}

// EventRow is the events row of e, stored from stream sequence seq.
func EventRow(e *events.Event, seq uint64) (Row, error) {
	if e.Time.Before(events.MinTime) || e.Time.After(events.MaxTime) {
		return Row{}, fmt.Errorf("event time %s is outside DateTime's range", e.Time)
	}
	payload := string(e.Data)
	if e.DataBase64 != "" {
		b, _ := marshal(e.DataBase64)
		payload = string(b)
	}
	ext := ""
	if len(e.Extensions) > 0 {
		b, _ := marshal(e.Extensions)
		ext = string(b)
	}
	str := func(k string) string {
		s, _ := e.Enrichment[k].(string)
		return s
	}
	var asn uint32
	switch v := e.Enrichment["geo_asn"].(type) {
	case float64:
		if v >= 0 && v <= 1<<32-1 {
			asn = uint32(v)
		}
	case string:
		if n, err := strconv.ParseUint(strings.TrimPrefix(strings.ToUpper(v), "AS"), 10, 32); err == nil {
			asn = uint32(n)
		}
	}
	rest := ""
	if len(e.Enrichment) > 0 {
		others := make(map[string]any, len(e.Enrichment))
		for k, v := range e.Enrichment {
			others[k] = v
		}
		for _, k := range enrichmentColumns {
			delete(others, k)
		}
		if len(others) > 0 {
			b, _ := marshal(others)
			rest = string(b)
		}
	}
	et, etMs := splitMillis(e.Time)
	rt, rtMs := splitMillis(e.ReceivedAt)
	return Row{Time: e.Time, Values: []any{
		e.Key, e.ID, e.Source, e.Type, e.Subject,
		e.SpecVersion, e.DataContentType, e.DataSchema,
		et, etMs, rt, rtMs,
		payload, ext, e.NATSSubject,
		str("geo_country"), asn, str("geo_as_org"),
		str("ua_browser"), str("ua_os"), str("ua_device"), rest,
		seq,
	}}, nil
}

func deadLettersTable() *Table {
	return &Table{
		Name: "dead_letters", Stream: streams.DLQ, Consumer: "sink", Identity: "reason",
		Columns: []Column{
			{"stage", "String"}, {"reason", "String"}, {"nats_subject", "String"}, {"headers", "String"},
			{"payload", "String"}, {"received_at", "DateTime"}, {"received_at_ms", "UInt16"},
			{"source_stream", "String"}, {"source_seq", "UInt64"}, {"stream_seq", "UInt64"},
		},
		Row: deadLetterRow,
	}
}

// deadLetterRow never fails: a dead letter is stored with whatever it carries.
func deadLetterRow(msg jetstream.Msg, seq uint64) (Row, error) {
	h := msg.Headers()
	others := map[string][]string{}
	for k, v := range h {
		if !strings.HasPrefix(k, "Sluice-") {
			others[k] = v
		}
	}
	headers := ""
	if len(others) > 0 {
		b, _ := json.Marshal(others)
		headers = string(b)
	}
	received := stage.ReceivedOf(msg)
	if t, err := time.Parse(time.RFC3339Nano, h.Get(stage.HeaderReceivedAt)); err == nil {
		received = t
	}
	rt, rtMs := splitMillis(received)
	srcSeq, _ := strconv.ParseUint(h.Get(stage.HeaderStreamSeq), 10, 64)
	subject := h.Get(stage.HeaderSubject)
	if subject == "" {
		subject = msg.Subject()
	}
	stageName := h.Get(stage.HeaderStage)
	if stageName == "" {
		stageName = strings.TrimPrefix(msg.Subject(), stage.DLQPrefix)
	}
	reason := h.Get(stage.HeaderReason)
	if reason == "" {
		reason = "no reason given (published to the DLQ without a " + stage.HeaderReason + " header)"
	}
	return Row{Time: received, Values: []any{
		stageName, reason, subject, headers,
		string(msg.Data()), rt, rtMs,
		h.Get(stage.HeaderStream), srcSeq, seq,
	}}, nil
}

func alertsTable() *Table {
	return &Table{
		Name: "alerts", Stream: streams.Alerts, Consumer: "sink", Identity: "fingerprint",
		Columns: []Column{
			{"fingerprint", "String"}, {"rule", "String"}, {"status", "String"}, {"severity", "String"},
			{"labels", "String"}, {"annotations", "String"}, {"starts_at", "DateTime"}, {"starts_at_ms", "UInt16"},
			{"ends_at", "DateTime"}, {"value", "Nullable(Float64)"},
			{"event_key", "String"}, {"replay", "UInt8"}, {"stream_seq", "UInt64"},
		},
		Row: alertRow,
	}
}

func alertRow(msg jetstream.Msg, seq uint64) (Row, error) {
	a, err := alerts.Decode(msg.Data())
	if err != nil {
		return Row{}, err
	}
	labels, _ := json.Marshal(a.Labels)
	ann, _ := json.Marshal(a.Annotations)
	st, stMs := splitMillis(a.StartsAt)
	if st.Before(events.MinTime) || st.After(events.MaxTime) {
		return Row{}, fmt.Errorf("alert startsAt %s is outside DateTime's range", a.StartsAt)
	}
	// A zero end (firing) is stored as 1970-01-01, ClickHouse's zero DateTime.
	ends := time.Unix(0, 0).UTC()
	if !a.EndsAt.IsZero() {
		if ends = a.EndsAt.UTC().Truncate(time.Second); ends.Before(events.MinTime) || ends.After(events.MaxTime) {
			return Row{}, fmt.Errorf("alert endsAt %s is outside DateTime's range", a.EndsAt)
		}
	}
	var replay uint8
	if a.Replay {
		replay = 1
	}
	return Row{Time: a.StartsAt, Values: []any{
		a.Fingerprint, a.Rule, a.Status, a.Severity,
		string(labels), string(ann), st, stMs,
		ends, a.Value,
		a.EventKey, replay, seq,
	}}, nil
}

// marshal encodes v as JSON with map keys sorted and without HTML escaping (text
// reaches ClickHouse as sent), with goccy/go-json: the events row is on the hot
// path.
func marshal(v any) ([]byte, error) {
	return gojson.MarshalWithOption(v, gojson.DisableHTMLEscape())
}
