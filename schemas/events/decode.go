package events

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"mime"
	"strings"
	"time"
	"unicode/utf8"

	gojson "github.com/goccy/go-json"
)

// InvalidError reports an event that cannot be accepted. Reason is meant for people:
// it names the attribute or the part of the payload at fault.
type InvalidError struct {
	Reason string
}

func (e *InvalidError) Error() string { return "invalid event: " + e.Reason }

func invalid(format string, args ...any) error {
	return &InvalidError{Reason: fmt.Sprintf(format, args...)}
}

// IsInvalid reports whether err is (or wraps) an *InvalidError.
func IsInvalid(err error) bool {
	var ie *InvalidError
	return errors.As(err, &ie)
}

// The range of ClickHouse's DateTime, where event times are stored.
var (
	MinTime = time.Unix(0, 0).UTC()
	MaxTime = time.Unix(1<<32-1, 0).UTC()
)

// MaxAttrLen bounds the string attributes other than data (id, source, type, ...).
const MaxAttrLen = 4096

// SubjectPrefix is the first token of the subjects producers publish to.
const SubjectPrefix = "events"

// Message is what arrived on NATS: the subject, the headers and the payload.
type Message struct {
	Subject string
	Header  map[string][]string
	Data    []byte
	// Received is when the raw stream stored the message.
	Received time.Time
	// Element is set on one event of a batch message (see Decoder.Split): Data holds
	// that event alone.
	Element *Element
}

// Element places one event of a batch message.
type Element struct {
	// Index is the event's place in its batch, from 0.
	Index int
	// Batch is the whole payload of the batch message (nil when the element came
	// alone, copied by the keying step with its key already made).
	Batch []byte
}

// Decoder turns NATS messages into validated events.
// It is safe for concurrent use.
type Decoder struct {
	types     *TypeSchemas
	ingest    *Ingest
	members   string
	maxFuture time.Duration
}

// NewDecoder returns a decoder that validates the data of each event whose type has
// a schema in types, reading payloads as ingest says. A nil types validates the
// envelope only; a nil ingest reads every payload as one CloudEvent and rejects
// members that are not valid extension attributes. ingest must be valid
// (Ingest.Validate).
func NewDecoder(types *TypeSchemas, ingest *Ingest) *Decoder {
	d := &Decoder{types: types, ingest: ingest, members: MembersReject, maxFuture: DefaultMaxFuture}
	if ingest != nil && ingest.InvalidMembers != "" {
		d.members = ingest.InvalidMembers
	}
	if ingest != nil && ingest.MaxFuture > 0 {
		d.maxFuture = ingest.MaxFuture
	}
	return d
}

// Split returns the events of a batch message as messages of their own, in order:
// m's mapping declares a batch (an array, or newline-delimited JSON), or, read as
// CloudEvents, its Content-Type is application/cloudevents-batch+json. It returns
// nil for a message that is one event (and for an element already split). A batch
// that cannot be split (not valid JSON, no events) is an *InvalidError.
func (d *Decoder) Split(m Message) ([]Message, error) {
	if m.Element != nil {
		return nil, nil
	}
	m.Data = TrimBOM(m.Data)
	mode := BatchNone
	mp := d.ingest.mappingFor(m.Subject)
	if mp != nil && mp.Batch != "" {
		mode = mp.Batch
	}
	if mode == BatchNone && (mp == nil || mp.Envelope != EnvelopeRaw) && isBatchContentType(headerValue(m.Header, "Content-Type")) {
		mode = BatchArray
	}
	var parts [][]byte
	switch mode {
	case BatchNone:
		return nil, nil
	case BatchArray:
		trimmed := bytes.TrimSpace(m.Data)
		if len(trimmed) == 0 || trimmed[0] != '[' {
			return nil, nil // one event
		}
		if !utf8.Valid(trimmed) {
			return nil, invalid("batch payload is not valid UTF-8 at byte %d", invalidUTF8Offset(m.Data))
		}
		if !validJSON(trimmed) {
			var v any
			return nil, invalid("batch payload is not a valid JSON array: %v", json.Unmarshal(trimmed, &v))
		}
		for _, el := range arrayElements(trimmed) {
			parts = append(parts, el)
		}
	case BatchNDJSON:
		for line := range bytes.SplitSeq(m.Data, []byte("\n")) {
			if line = bytes.TrimSpace(line); len(line) > 0 {
				parts = append(parts, line)
			}
		}
	}
	if len(parts) == 0 {
		return nil, invalid("batch payload holds no events")
	}
	out := make([]Message, len(parts))
	for i, p := range parts {
		out[i] = Message{Subject: m.Subject, Header: m.Header, Data: p, Received: m.Received, Element: &Element{Index: i, Batch: m.Data}}
	}
	return out, nil
}

// BOM is the UTF-8 byte order mark.
var BOM = []byte{0xEF, 0xBB, 0xBF}

// TrimBOM is b without a UTF-8 byte order mark at its start. JSON text must not
// begin with one (RFC 8259), but a parser may ignore it, and some producers'
// libraries write one (.NET's Encoding.UTF8, PowerShell, files saved by editors):
// JSON payloads (not binary-mode data of another content type) are read without
// it. The content key is over the payload as sent.
func TrimBOM(b []byte) []byte { return bytes.TrimPrefix(b, BOM) }

func isBatchContentType(ct string) bool {
	if ct == "" {
		return false
	}
	mt, _, _ := mime.ParseMediaType(ct)
	return mt == "application/cloudevents-batch+json"
}

// Decode reads m as its mapping says: in CloudEvents structured mode (a JSON
// object) or binary mode (ce-* headers, the payload is the data), or as raw JSON
// with mapped attributes; fills the lenient defaults and validates the result.
// Errors for bad input are *InvalidError.
func (d *Decoder) Decode(m Message) (*Event, error) {
	if !utf8.ValidString(m.Subject) {
		return nil, invalid("subject is not valid UTF-8")
	}
	var (
		e   *Event
		err error
	)
	mp := d.ingest.mappingFor(m.Subject)
	if mp != nil && mp.Envelope == EnvelopeRaw {
		e, err = decodeRaw(mp, m)
	} else {
		e, err = d.decodeCloudEvent(m)
	}
	if err == nil {
		err = d.complete(e, m)
	}
	var ie *InvalidError
	if err == nil || !errors.As(err, &ie) {
		return e, err
	}
	reason := ie.Reason
	if mp != nil && !strings.HasPrefix(reason, "mapping ") {
		reason = fmt.Sprintf("mapping %q: %s", mp.name(), reason)
	}
	if m.Element != nil {
		reason = fmt.Sprintf("batch element %d: %s", m.Element.Index, reason)
	}
	return nil, &InvalidError{Reason: reason}
}

func (d *Decoder) decodeCloudEvent(m Message) (*Event, error) {
	var ce map[string]string
	if m.Element == nil { // the headers are the batch's, not an element's
		ce = ceHeaders(m.Header)
	}
	ct := headerValue(m.Header, "Content-Type")
	var (
		e   *Event
		err error
	)
	if len(ce) > 0 && !isStructuredContentType(ct) {
		e, err = decodeBinary(ce, ct, m.Data)
	} else {
		e, err = decodeStructured(TrimBOM(m.Data))
		if err == nil {
			err = checkHeadersAgree(ce, e)
		}
	}
	if err != nil {
		return nil, err
	}
	if err := d.checkMembers(e); err != nil {
		return nil, err
	}
	return e, nil
}

func (d *Decoder) complete(e *Event, m Message) error {
	received := m.Received.UTC()
	if received.IsZero() {
		received = time.Now().UTC()
	}
	e.ReceivedAt = received
	e.NATSSubject = m.Subject
	if e.SpecVersion == "" {
		e.SpecVersion = SpecVersion
	}
	if e.SpecVersion != SpecVersion {
		return invalid("specversion %q is not supported (want %q)", e.SpecVersion, SpecVersion)
	}
	if e.Source == "" || e.Type == "" {
		src, typ := fromSubject(m.Subject)
		if e.Source == "" {
			e.Source = src
		}
		if e.Type == "" {
			e.Type = typ
		}
	}
	if e.Source == "" {
		return invalid("source is missing and subject %q does not name one (publish to %s.<source>.<type>)", m.Subject, SubjectPrefix)
	}
	if e.Type == "" {
		return invalid("type is missing and subject %q does not name one (publish to %s.<source>.<type>)", m.Subject, SubjectPrefix)
	}
	if e.Time.IsZero() {
		e.Time = received
	}
	if e.Time.Before(MinTime) || e.Time.After(MaxTime) {
		return invalid("time %s is outside the range sluice stores (%s to %s)",
			e.Time.Format(time.RFC3339Nano), MinTime.Format(time.RFC3339), MaxTime.Format(time.RFC3339))
	}
	// Judged against when the stream stored the event, not the clock: the same
	// input is judged alike whenever it is read.
	if ahead := e.Time.Sub(received); ahead > d.maxFuture {
		return invalid("time %s is %s ahead of when the event was received (%s); more than ingest.max_future (%s) ahead is refused: is the producer's clock right?",
			e.Time.Format(time.RFC3339Nano), ahead.Round(time.Second), received.Format(time.RFC3339Nano), d.maxFuture)
	}
	if d.types != nil && len(e.Data) > 0 {
		if err := d.types.Validate(e.Type, e.Data); err != nil {
			return err
		}
	}
	return nil
}

// fromSubject derives source and type from events.<source>.<type...>.
func fromSubject(subject string) (source, typ string) {
	rest, ok := strings.CutPrefix(subject, SubjectPrefix+".")
	if !ok || rest == "" {
		return "", ""
	}
	source, typ, found := strings.Cut(rest, ".")
	if !found {
		return rest, rest
	}
	return source, typ
}

var knownAttrs = map[string]bool{
	"id": true, "source": true, "type": true, "specversion": true, "time": true,
	"subject": true, "datacontenttype": true, "dataschema": true, "data": true, "data_base64": true,
}

func decodeStructured(payload []byte) (*Event, error) {
	if len(bytes.TrimSpace(payload)) == 0 {
		return nil, invalid("payload is empty (want a CloudEvents JSON object, or ce-* headers for binary mode)")
	}
	if !utf8.Valid(payload) {
		return nil, invalid("payload is not valid UTF-8 at byte %d", invalidUTF8Offset(payload))
	}
	if e, ok := decodeUsual(payload); ok {
		return e, nil
	}
	return decodeGeneral(payload)
}

// decodeGeneral decodes any structured event through the map of its members.
func decodeGeneral(payload []byte) (*Event, error) {
	attrs, err := decodeObject(payload)
	if err != nil {
		return nil, err
	}
	e := &Event{}
	for name, raw := range attrs {
		if knownAttrs[name] {
			continue
		}
		if e.Extensions == nil {
			e.Extensions = make(map[string]json.RawMessage)
		}
		e.Extensions[name] = raw
	}
	strs := []struct {
		name string
		dst  *string
	}{
		{"id", &e.ID}, {"source", &e.Source}, {"type", &e.Type}, {"specversion", &e.SpecVersion},
		{"subject", &e.Subject}, {"datacontenttype", &e.DataContentType}, {"dataschema", &e.DataSchema},
		{"data_base64", &e.DataBase64},
	}
	for _, s := range strs {
		if err := stringAttr(attrs, s.name, s.dst); err != nil {
			return nil, err
		}
		if s.name != "data_base64" && len(*s.dst) > MaxAttrLen {
			return nil, invalid("attribute %q is %d bytes long (at most %d)", s.name, len(*s.dst), MaxAttrLen)
		}
	}
	if raw, ok := attrs["id"]; ok && e.ID == "" && !isNull(raw) {
		return nil, invalid("attribute \"id\" is empty (omit it to let sluice key the event by its content)")
	}
	var ts string
	if err := stringAttr(attrs, "time", &ts); err != nil {
		return nil, err
	}
	if ts != "" {
		t, err := parseTime(ts)
		if err != nil {
			return nil, err
		}
		e.Time = t
	}
	if raw, ok := attrs["data"]; ok && !isNull(raw) {
		if e.DataBase64 != "" {
			return nil, invalid("both \"data\" and \"data_base64\" are set; CloudEvents allows one")
		}
		e.Data = raw
	}
	if e.DataBase64 != "" {
		if _, err := base64.StdEncoding.DecodeString(e.DataBase64); err != nil {
			return nil, invalid("attribute \"data_base64\" is not valid base64: %v", err)
		}
	}
	return e, nil
}

// validJSON reports whether b is one valid JSON text. goccy/go-json's check is six
// times faster than encoding/json's and judges alike (FuzzValid).
func validJSON(b []byte) bool { return gojson.Valid(b) }

// usualMember is the member of the usual event named name (exactly as written):
// its bit in a set of members and where its value goes (nil for data; time's, to
// at). bit is 0 for any other name.
func usualMember(e *Event, at *string, name []byte) (bit int, dst *string) {
	switch string(name) {
	case "id":
		return 1 << 0, &e.ID
	case "source":
		return 1 << 1, &e.Source
	case "type":
		return 1 << 2, &e.Type
	case "specversion":
		return 1 << 3, &e.SpecVersion
	case "time":
		return 1 << 4, at
	case "subject":
		return 1 << 5, &e.Subject
	case "datacontenttype":
		return 1 << 6, &e.DataContentType
	case "dataschema":
		return 1 << 7, &e.DataSchema
	case "data":
		return 1 << 8, nil
	}
	return 0, nil
}

// decodeUsual decodes, in one pass over its members, an event that is a valid JSON
// object of envelope attributes and data, each once and named exactly, every
// attribute a string no longer than MaxAttrLen, not empty, and data not null, with a
// valid time. ok is false for anything else (extensions, data_base64, null or empty
// attributes, repeated members, wrong types, bad input): decodeStructured's general
// path then decides, and names what is wrong. payload is valid UTF-8
// (decodeStructured checks). The event's Data is the payload's own bytes.
func decodeUsual(payload []byte) (e *Event, ok bool) {
	trimmed := bytes.TrimSpace(payload)
	if len(trimmed) == 0 || trimmed[0] != '{' || !validJSON(trimmed) {
		return nil, false
	}
	e = &Event{}
	var seen int
	var at string
	for name, raw := range objectMembers(trimmed) {
		if !plainName(name) {
			return nil, false
		}
		bit, dst := usualMember(e, &at, name)
		if bit == 0 || seen&bit != 0 {
			return nil, false
		}
		seen |= bit
		if dst == nil { // data
			if isNull(raw) {
				return nil, false
			}
			e.Data = raw
			continue
		}
		s, ok := jsonString(raw)
		if !ok || s == "" || len(s) > MaxAttrLen {
			return nil, false
		}
		*dst = s
	}
	if at != "" {
		t, err := parseTime(at)
		if err != nil {
			return nil, false
		}
		e.Time = t
	}
	return e, true
}

// jsonString decodes raw (a valid JSON value, valid UTF-8) if it is a string, as
// the decoder does: one without escapes directly; ok is also false for one whose
// escapes decode to invalid UTF-8.
func jsonString(raw []byte) (string, bool) {
	if raw[0] != '"' {
		return "", false
	}
	if bytes.IndexByte(raw, '\\') < 0 {
		return string(raw[1 : len(raw)-1]), true
	}
	var s string
	if gojson.Unmarshal(raw, &s) != nil || !utf8.ValidString(s) {
		return "", false
	}
	return s, true
}

// decodeObject decodes a JSON object into its members, rejecting trailing data.
func decodeObject(payload []byte) (map[string]json.RawMessage, error) {
	trimmed := bytes.TrimSpace(payload)
	if trimmed[0] != '{' {
		if kind := jsonKind(trimmed); kind != notJSON {
			return nil, invalid("payload is %s, not a JSON object", kind)
		}
		var v any
		return nil, invalid("payload is not JSON: %v", json.Unmarshal(trimmed, &v))
	}
	var attrs map[string]json.RawMessage
	// Valid input is checked by validJSON (strict, no allocation) and split by
	// goccy/go-json, several times faster than a Decoder; invalid input goes
	// through encoding/json's Decoder for its error.
	if validJSON(trimmed) {
		if err := gojson.Unmarshal(trimmed, &attrs); err == nil {
			if topLevelMembers(trimmed) != len(attrs) {
				return nil, invalid("attribute %q appears twice", duplicateMember(trimmed))
			}
			return attrs, nil
		}
		attrs = nil
	}
	dec := json.NewDecoder(bytes.NewReader(trimmed))
	if err := dec.Decode(&attrs); err != nil {
		return nil, invalid("payload is not valid JSON: %v", err)
	}
	if dec.More() {
		return nil, invalid("payload has data after the JSON object at byte %d", dec.InputOffset())
	}
	if topLevelMembers(trimmed) != len(attrs) {
		return nil, invalid("attribute %q appears twice", duplicateMember(trimmed))
	}
	return attrs, nil
}

// topLevelMembers counts the members of the JSON object b (valid JSON) by counting
// the commas at depth 1, outside strings.
func topLevelMembers(b []byte) int {
	depth, commas, inString, empty := 0, 0, false, true
	for i := 0; i < len(b); i++ {
		c := b[i]
		if inString {
			switch c {
			case '\\':
				i++
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case '"':
			inString = true
			if depth == 1 {
				empty = false
			}
		case '{', '[':
			depth++
		case '}', ']':
			depth--
		case ',':
			if depth == 1 {
				commas++
			}
		}
	}
	if empty {
		return 0
	}
	return commas + 1
}

// duplicateMember returns the first name that appears twice at the top of the JSON
// object b.
func duplicateMember(b []byte) string {
	dec := json.NewDecoder(bytes.NewReader(b))
	if _, err := dec.Token(); err != nil {
		return ""
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return ""
		}
		name, _ := tok.(string)
		if seen[name] {
			return name
		}
		seen[name] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return ""
		}
	}
	return ""
}

func stringAttr(attrs map[string]json.RawMessage, name string, dst *string) error {
	raw, ok := attrs[name]
	if !ok || isNull(raw) {
		return nil
	}
	if n := len(raw); n >= 2 && raw[0] == '"' && raw[n-1] == '"' && bytes.IndexByte(raw, '\\') < 0 {
		// A valid JSON string without escapes is its own text.
		*dst = string(raw[1 : n-1])
		return nil
	}
	if err := json.Unmarshal(raw, dst); err != nil {
		return invalid("attribute %q must be a string, got %s", name, jsonKind(raw))
	}
	return nil
}

func parseTime(s string) (time.Time, error) {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, invalid("attribute \"time\" %q is not an RFC 3339 timestamp", s)
	}
	return t.UTC(), nil
}

func isNull(raw json.RawMessage) bool { return bytes.Equal(bytes.TrimSpace(raw), []byte("null")) }

// JSONKind names the kind of the JSON value raw for people: "an object", "an
// array", "a string", "a number", "a boolean", "null".
func JSONKind(raw []byte) string { return jsonKind(raw) }

func jsonKind(raw []byte) string {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return "nothing"
	}
	// The first byte names the kind of valid JSON only ("nope" is not null).
	if !validJSON(raw) {
		return notJSON
	}
	switch raw[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	default:
		if raw[0] == '-' || (raw[0] >= '0' && raw[0] <= '9') {
			return "a number"
		}
		return notJSON
	}
}

const notJSON = "not JSON"

func invalidUTF8Offset(b []byte) int {
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		if r == utf8.RuneError && size == 1 {
			return i
		}
		i += size
	}
	return -1
}

// ceHeaders returns the CloudEvents binary-mode headers, keyed by lower-case
// attribute name.
func ceHeaders(h map[string][]string) map[string]string {
	var out map[string]string
	for k, v := range h {
		if len(k) > 3 && strings.EqualFold(k[:3], "ce-") && len(v) > 0 {
			if out == nil {
				out = make(map[string]string)
			}
			out[strings.ToLower(k[3:])] = v[0]
		}
	}
	return out
}

func headerValue(h map[string][]string, name string) string {
	for k, v := range h {
		if strings.EqualFold(k, name) && len(v) > 0 {
			return v[0]
		}
	}
	return ""
}

func isStructuredContentType(ct string) bool {
	mt, _, _ := mime.ParseMediaType(ct)
	return mt == "application/cloudevents+json"
}

func isJSONContentType(ct string) bool {
	if ct == "" {
		return true
	}
	mt, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return false
	}
	return mt == "application/json" || mt == "text/json" || strings.HasSuffix(mt, "+json")
}

func decodeBinary(ce map[string]string, ct string, payload []byte) (*Event, error) {
	e := &Event{
		ID:              ce["id"],
		Source:          ce["source"],
		Type:            ce["type"],
		SpecVersion:     ce["specversion"],
		Subject:         ce["subject"],
		DataSchema:      ce["dataschema"],
		DataContentType: ct,
	}
	if e.DataContentType == "" {
		e.DataContentType = ce["datacontenttype"]
	}
	if v, ok := ce["id"]; ok && v == "" {
		return nil, invalid("header ce-id is empty")
	}
	for name, v := range ce {
		if !utf8.ValidString(v) {
			return nil, invalid("header ce-%s is not valid UTF-8", name)
		}
		if len(v) > MaxAttrLen {
			return nil, invalid("header ce-%s is %d bytes long (at most %d)", name, len(v), MaxAttrLen)
		}
	}
	if ts := ce["time"]; ts != "" {
		t, err := parseTime(ts)
		if err != nil {
			return nil, err
		}
		e.Time = t
	}
	for name, v := range ce {
		if knownAttrs[name] || name == "datacontenttype" {
			continue
		}
		raw, _ := json.Marshal(v)
		if e.Extensions == nil {
			e.Extensions = make(map[string]json.RawMessage)
		}
		e.Extensions[name] = raw
	}
	if len(payload) == 0 {
		return e, nil
	}
	if isJSONContentType(e.DataContentType) {
		payload = TrimBOM(payload)
		if !utf8.Valid(payload) {
			return nil, invalid("binary-mode data is not valid UTF-8 at byte %d", invalidUTF8Offset(payload))
		}
		if !json.Valid(payload) {
			var v any
			err := json.Unmarshal(payload, &v)
			return nil, invalid("binary-mode data is not valid JSON (content type %q): %v", e.DataContentType, err)
		}
		e.Data = json.RawMessage(bytes.TrimSpace(payload))
		return e, nil
	}
	e.DataBase64 = base64.StdEncoding.EncodeToString(payload)
	return e, nil
}

// checkHeadersAgree rejects a structured event whose ce-* headers say otherwise.
func checkHeadersAgree(ce map[string]string, e *Event) error {
	if len(ce) == 0 {
		return nil
	}
	for _, attr := range [...][2]string{
		{"id", e.ID}, {"source", e.Source}, {"type", e.Type}, {"specversion", e.SpecVersion}, {"subject", e.Subject},
	} {
		name, got := attr[0], attr[1]
		if h, ok := ce[name]; ok && h != got {
			return invalid("header ce-%s %q contradicts the body's %q %q", name, h, name, got)
		}
	}
	return nil
}
