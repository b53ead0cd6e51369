package sink

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	gojson "github.com/goccy/go-json"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/schemas/deadletters"
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
	// Columnar inserts a column at a time: each value must be of the Go type its
	// column takes (see insertColumns).
	Columnar bool
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
	return "INSERT INTO " + t.Name + " (" + strings.Join(t.columnNames(), ", ") + ")"
}

func (t *Table) columnNames() []string {
	names := make([]string, len(t.Columns))
	for i, c := range t.Columns {
		names[i] = c.Name
	}
	return names
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
	rec, err := EventRecordOf(e, seq)
	if err != nil {
		return Row{}, err
	}
	return Row{Time: e.Time, Values: rec.values()}, nil
}

// EventRecord is one events row as typed fields (no value boxed), for inserts
// column by column (EventColumns).
type EventRecord struct {
	Key, ID, Source, Type, Subject, SpecVersion, DataContentType, DataSchema string
	EventTime, ReceivedAt                                                    time.Time // whole seconds
	EventTimeMs, ReceivedAtMs                                                uint16
	Data, Extensions, NATSSubject, GeoCountry, GeoASOrg                      string
	UABrowser, UAOS, UADevice, Enrichment                                    string
	GeoASN                                                                   uint32
	StreamSeq                                                                uint64
}

// values is r in EventsTable's column order.
func (r *EventRecord) values() []any {
	return []any{
		r.Key, r.ID, r.Source, r.Type, r.Subject,
		r.SpecVersion, r.DataContentType, r.DataSchema,
		r.EventTime, r.EventTimeMs, r.ReceivedAt, r.ReceivedAtMs,
		r.Data, r.Extensions, r.NATSSubject,
		r.GeoCountry, r.GeoASN, r.GeoASOrg,
		r.UABrowser, r.UAOS, r.UADevice, r.Enrichment,
		r.StreamSeq,
	}
}

// EventRecordOf is the events row of e, stored from stream sequence seq.
func EventRecordOf(e *events.Event, seq uint64) (EventRecord, error) {
	if e.Time.Before(events.MinTime) || e.Time.After(events.MaxTime) {
		return EventRecord{}, fmt.Errorf("event time %s is outside DateTime's range", e.Time)
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
	et, etMs := splitMillis(e.Time)
	rt, rtMs := splitMillis(e.ReceivedAt)
	return EventRecord{
		Key: e.Key, ID: e.ID, Source: e.Source, Type: e.Type, Subject: e.Subject,
		SpecVersion: e.SpecVersion, DataContentType: e.DataContentType, DataSchema: e.DataSchema,
		EventTime: et, EventTimeMs: etMs, ReceivedAt: rt, ReceivedAtMs: rtMs,
		Data: payload, Extensions: ext, NATSSubject: e.NATSSubject,
		GeoCountry: str("geo_country"), GeoASN: asn, GeoASOrg: str("geo_as_org"),
		UABrowser: str("ua_browser"), UAOS: str("ua_os"), UADevice: str("ua_device"), Enrichment: enrichmentJSON(e.Enrichment),
		StreamSeq: seq,
	}, nil
}

// enrichmentJSON is the JSON object of the enrichment fields without a column of
// their own, keys sorted (as marshal writes a map); "" when there are none.
func enrichmentJSON(m map[string]any) string {
	var kbuf [16]string
	keys := kbuf[:0]
	for k := range m {
		if !slices.Contains(enrichmentColumns, k) {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return ""
	}
	sortSmall(keys)
	// Written out here and in appendJSON's map case, not shared: a helper taking the
	// value writer as a function moves buf to the heap.
	var buf [256]byte
	b := append(buf[:0], '{')
	for i, k := range keys {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendJSONString(b, k)
		b = append(b, ':')
		b = appendJSON(b, m[k])
	}
	return string(append(b, '}'))
}

// appendJSON appends v as marshal writes it; a string that needs no escaping, a
// whole number and a map of strings (enrich's table versions) are written directly.
func appendJSON(b []byte, v any) []byte {
	switch v := v.(type) {
	case string:
		return appendJSONString(b, v)
	case float64:
		if v == math.Trunc(v) && math.Abs(v) < 1e15 && !math.Signbit(v) {
			return strconv.AppendInt(b, int64(v), 10)
		}
	case map[string]string:
		var kbuf [8]string
		keys := kbuf[:0]
		for k := range v {
			keys = append(keys, k)
		}
		sortSmall(keys)
		b = append(b, '{')
		for i, k := range keys {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendJSONString(b, k)
			b = append(b, ':')
			b = appendJSONString(b, v[k])
		}
		return append(b, '}')
	}
	j, err := marshal(v)
	if err != nil {
		j = []byte("null")
	}
	return append(b, j...)
}

// appendJSONString appends s as a JSON string, as marshal writes it.
func appendJSONString(b []byte, s string) []byte {
	if plainJSON(s) {
		b = append(b, '"')
		b = append(b, s...)
		return append(b, '"')
	}
	j, _ := marshal(s) // a string always encodes
	return append(b, j...)
}

// sortSmall sorts the few keys of an enrichment map in place (insertion sort: no
// allocation for a handful).
func sortSmall(keys []string) {
	for i := 1; i < len(keys); i++ {
		for j := i; j > 0 && keys[j] < keys[j-1]; j-- {
			keys[j], keys[j-1] = keys[j-1], keys[j]
		}
	}
}

// plainJSON reports whether s is printable ASCII without a quote or backslash.
func plainJSON(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			return false
		}
	}
	return true
}

// EventColumns holds events rows column by column, for one insert. Reusing one
// for every insert keeps its slices: a row costs no allocation of its own.
type EventColumns struct {
	str    [17][]string // the String columns, in column order
	times  [2][]time.Time
	millis [2][]uint16
	asn    []uint32
	seq    []uint64
}

// Reset empties c, keeping its memory (but not the strings of its last rows).
func (c *EventColumns) Reset() {
	for i := range c.str {
		clear(c.str[i])
		c.str[i] = c.str[i][:0]
	}
	for i := range c.times {
		c.times[i] = c.times[i][:0]
		c.millis[i] = c.millis[i][:0]
	}
	c.asn, c.seq = c.asn[:0], c.seq[:0]
}

// Len is how many rows c holds.
func (c *EventColumns) Len() int { return len(c.seq) }

// Append adds r as c's next row.
func (c *EventColumns) Append(r *EventRecord) {
	for i, s := range [...]string{
		r.Key, r.ID, r.Source, r.Type, r.Subject, r.SpecVersion, r.DataContentType, r.DataSchema,
		r.Data, r.Extensions, r.NATSSubject, r.GeoCountry, r.GeoASOrg, r.UABrowser, r.UAOS, r.UADevice, r.Enrichment,
	} {
		c.str[i] = append(c.str[i], s)
	}
	c.times[0], c.millis[0] = append(c.times[0], r.EventTime), append(c.millis[0], r.EventTimeMs)
	c.times[1], c.millis[1] = append(c.times[1], r.ReceivedAt), append(c.millis[1], r.ReceivedAtMs)
	c.asn = append(c.asn, r.GeoASN)
	c.seq = append(c.seq, r.StreamSeq)
}

// columns are rows lo to hi (not included) of c's columns, in EventsTable's order.
func (c *EventColumns) columns(lo, hi int) []any {
	s := func(i int) []string { return c.str[i][lo:hi] }
	return []any{
		s(0), s(1), s(2), s(3), s(4), s(5), s(6), s(7),
		c.times[0][lo:hi], c.millis[0][lo:hi], c.times[1][lo:hi], c.millis[1][lo:hi],
		s(8), s(9), s(10),
		s(11), c.asn[lo:hi], s(12),
		s(13), s(14), s(15), s(16),
		c.seq[lo:hi],
	}
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
		// The dead letter's own headers are columns; the input's id stays, for a
		// replay (sluice dlq replay), and the truncation's mark, which refuses one.
		if !strings.HasPrefix(k, "Sluice-") || k == deadletters.HeaderMsgID || k == deadletters.HeaderTruncated {
			others[k] = v
		}
	}
	headers := ""
	if len(others) > 0 {
		b, _ := json.Marshal(others)
		headers = string(b)
	}
	received := stage.ReceivedOf(msg)
	if t, err := time.Parse(time.RFC3339Nano, h.Get(deadletters.HeaderReceivedAt)); err == nil {
		received = t
	}
	rt, rtMs := splitMillis(received)
	srcSeq, _ := strconv.ParseUint(h.Get(deadletters.HeaderStreamSeq), 10, 64)
	subject := h.Get(deadletters.HeaderSubject)
	if subject == "" {
		subject = msg.Subject()
	}
	stageName := h.Get(deadletters.HeaderStage)
	if stageName == "" {
		stageName = strings.TrimPrefix(msg.Subject(), deadletters.SubjectPrefix)
	}
	reason := h.Get(deadletters.HeaderReason)
	if reason == "" {
		reason = "no reason given (published to the DLQ without a " + deadletters.HeaderReason + " header)"
	}
	return Row{Time: received, Values: []any{
		stageName, reason, subject, headers,
		string(msg.Data()), rt, rtMs,
		h.Get(deadletters.HeaderStream), srcSeq, seq,
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
