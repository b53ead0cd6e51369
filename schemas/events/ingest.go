package events

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"iter"
	"math/big"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	gojson "github.com/goccy/go-json"
)

// Envelopes: how a payload is read.
const (
	// EnvelopeCloudEvents reads a CloudEvents event (structured or binary mode): the
	// default.
	EnvelopeCloudEvents = "cloudevents"
	// EnvelopeRaw takes any JSON value as the event's data; the mapping says where
	// the attributes come from.
	EnvelopeRaw = "raw"
)

// Batches: whether one message holds many events.
const (
	// BatchNone: a message is one event (the default).
	BatchNone = "none"
	// BatchArray: a payload that is a JSON array is one event per element; any other
	// JSON value is one event.
	BatchArray = "array"
	// BatchNDJSON: each non-blank line of the payload is an event.
	BatchNDJSON = "ndjson"
)

// What happens to a top-level member of a CloudEvents payload that is not a valid
// extension attribute (an object or array value, or a name other than lower-case
// letters and digits).
const (
	// MembersReject sends the event to the DLQ with a reason naming the member: the
	// default, so a producer's data never lands where queries on data do not look.
	MembersReject = "reject"
	// MembersExtensions keeps such members in extensions, as releases before 0.3 did.
	MembersExtensions = "extensions"
	// MembersData moves them into data (which must then be absent or an object
	// without members of those names).
	MembersData = "data"
)

// Time formats of a mapped time.
const (
	// FormatISO8601 reads RFC 3339 and the usual ISO 8601 variants: a space for the
	// T, no zone (UTC), +hh, +hhmm, fractional seconds after a point or a comma, a
	// date alone (midnight UTC), and a leap second (23:59:60 reads as the next
	// second). The default.
	FormatISO8601 = "iso8601"
	// FormatUnix and the others read Unix time in the unit named, from a JSON number
	// (exponents and fractions allowed) or a string holding one.
	FormatUnix   = "unix"
	FormatUnixMs = "unix_ms"
	FormatUnixUs = "unix_us"
	FormatUnixNs = "unix_ns"
)

// DefaultReceived, as a time mapping's default, takes the time the event was received.
const DefaultReceived = "received"

// Ingest is the ingest section of SLUICE_CONFIG: how payloads become events.
type Ingest struct {
	// InvalidMembers is MembersReject (default), MembersExtensions or MembersData.
	InvalidMembers string `yaml:"invalid_members"`
	// Mappings apply to the subjects they match; the first match wins. A subject no
	// mapping matches is read as CloudEvents, one event per message.
	Mappings []Mapping `yaml:"mappings"`
	// Schemas is a directory of <type>.json JSON Schemas for the data of event
	// types, in addition to the embedded ones (schemas/events/types; one of the
	// directory replaces the embedded schema of its type). They validate data and
	// define typed tables.
	Schemas string `yaml:"schemas"`
	// MaxFuture is how far an event's time may be ahead of when JetStream stored it
	// (DefaultMaxFuture when zero): an event further ahead is invalid. Its time
	// would move the alert rules' event time there, and every event after it would
	// count as late until the clock caught up.
	MaxFuture time.Duration `yaml:"max_future"`
}

// DefaultMaxFuture is Ingest.MaxFuture's default: clocks a few minutes off pass.
const DefaultMaxFuture = 10 * time.Minute

// TypeSchemas compiles the schemas of event types: the embedded ones and those of
// the directory Schemas.
func (in Ingest) TypeSchemas() (*TypeSchemas, error) {
	ts, err := LoadTypeSchemasWith(in.Schemas)
	if err != nil {
		return nil, fmt.Errorf("ingest.schemas: %w", err)
	}
	return ts, nil
}

// Mapping says how the payloads published to subjects matching Subjects become
// events.
type Mapping struct {
	// Name names the mapping in dead-letter reasons (default: its subjects).
	Name string `yaml:"name"`
	// Subjects is a NATS subject pattern (wildcards * and >).
	Subjects string `yaml:"subjects"`
	// Envelope is EnvelopeCloudEvents (default) or EnvelopeRaw.
	Envelope string `yaml:"envelope"`
	// Batch is BatchNone (default), BatchArray or BatchNDJSON.
	Batch string `yaml:"batch"`
	// Where a raw event's attributes come from. Unset: id from none (the event is
	// keyed by its content), source and type from the subject (events.<source>.<type>),
	// time the receive time, subject none.
	ID      *Attr     `yaml:"id"`
	Source  *Attr     `yaml:"source"`
	Type    *Attr     `yaml:"type"`
	Subject *Attr     `yaml:"subject"`
	Time    *TimeAttr `yaml:"time"`
}

// Attr is where one attribute comes from: exactly one of Field, Token, Header, Value.
type Attr struct {
	// Field is a path into the payload: names and array indexes joined by dots
	// (actor.login, items.0.sku).
	Field string `yaml:"field"`
	// Token is a token of the NATS subject, counted from 1 (events is 1).
	Token int `yaml:"token"`
	// Header is a NATS header's name.
	Header string `yaml:"header"`
	// Value is a literal.
	Value string `yaml:"value"`
	// Default, when set, is taken when the source is missing, null or empty (for a
	// time: also unparseable); unset, that sends the event to the DLQ.
	Default *string `yaml:"default"`
}

// TimeAttr is where the time comes from, and its format.
type TimeAttr struct {
	Attr `yaml:",inline"`
	// Format is FormatISO8601 (default), one of the Unix formats, or "layout:" and a
	// Go time layout (2006-01-02 15:04:05; UTC when it has no zone).
	Format string `yaml:"format"`
}

// Validate reports every problem of the section.
func (in Ingest) Validate() error {
	var errs []error
	switch in.InvalidMembers {
	case "", MembersReject, MembersExtensions, MembersData:
	default:
		errs = append(errs, fmt.Errorf("ingest.invalid_members must be %q, %q or %q, got %q", MembersReject, MembersExtensions, MembersData, in.InvalidMembers))
	}
	if in.MaxFuture < 0 {
		errs = append(errs, fmt.Errorf("ingest.max_future must not be negative, got %s", in.MaxFuture))
	}
	for i, m := range in.Mappings {
		if err := m.validate(); err != nil {
			errs = append(errs, fmt.Errorf("ingest.mappings[%d]: %w", i, err))
		}
	}
	return errors.Join(errs...)
}

func (m Mapping) validate() error {
	var errs []error
	if !validPattern(m.Subjects) {
		errs = append(errs, fmt.Errorf("subjects %q is not a subject pattern", m.Subjects))
	}
	switch m.Envelope {
	case "", EnvelopeCloudEvents:
		for name, a := range map[string]bool{"id": m.ID != nil, "source": m.Source != nil, "type": m.Type != nil, "subject": m.Subject != nil, "time": m.Time != nil} {
			if a {
				errs = append(errs, fmt.Errorf("%s: attributes are mapped for envelope %q only; a CloudEvent carries its own", name, EnvelopeRaw))
			}
		}
	case EnvelopeRaw:
	default:
		errs = append(errs, fmt.Errorf("envelope must be %q or %q, got %q", EnvelopeCloudEvents, EnvelopeRaw, m.Envelope))
	}
	switch m.Batch {
	case "", BatchNone, BatchArray, BatchNDJSON:
	default:
		errs = append(errs, fmt.Errorf("batch must be %q, %q or %q, got %q", BatchNone, BatchArray, BatchNDJSON, m.Batch))
	}
	for _, a := range []struct {
		name string
		attr *Attr
	}{{"id", m.ID}, {"source", m.Source}, {"type", m.Type}, {"subject", m.Subject}} {
		if a.attr != nil {
			if err := a.attr.validate(); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", a.name, err))
			}
		}
	}
	if m.Time != nil {
		if err := m.Time.Attr.validate(); err != nil {
			errs = append(errs, fmt.Errorf("time: %w", err))
		}
		if err := checkFormat(m.Time.Format); err != nil {
			errs = append(errs, fmt.Errorf("time: %w", err))
		}
		if d := m.Time.Default; d != nil && *d != DefaultReceived {
			if _, err := parseISO8601(*d); err != nil {
				errs = append(errs, fmt.Errorf("time: default must be %q or an ISO 8601 time, got %q", DefaultReceived, *d))
			}
		}
	}
	return errors.Join(errs...)
}

func (a Attr) validate() error {
	set := 0
	for _, ok := range []bool{a.Field != "", a.Token != 0, a.Header != "", a.Value != ""} {
		if ok {
			set++
		}
	}
	if set != 1 {
		return fmt.Errorf("set exactly one of field, token, header and value")
	}
	if a.Token < 0 {
		return fmt.Errorf("token counts from 1, got %d", a.Token)
	}
	if a.Field != "" && strings.Contains("."+a.Field+".", "..") {
		return fmt.Errorf("field %q has an empty step", a.Field)
	}
	return nil
}

func checkFormat(f string) error {
	switch f {
	case "", FormatISO8601, FormatUnix, FormatUnixMs, FormatUnixUs, FormatUnixNs:
		return nil
	}
	if layout, ok := strings.CutPrefix(f, "layout:"); ok && strings.TrimSpace(layout) != "" {
		return nil
	}
	return fmt.Errorf("format must be %s, %s, %s, %s, %s or layout:<Go time layout>, got %q", FormatISO8601, FormatUnix, FormatUnixMs, FormatUnixUs, FormatUnixNs, f)
}

// name is how reasons name the mapping.
func (m *Mapping) name() string {
	if m.Name != "" {
		return m.Name
	}
	return m.Subjects
}

// mappingFor returns the mapping of subject, nil when none matches.
func (in *Ingest) mappingFor(subject string) *Mapping {
	if in == nil {
		return nil
	}
	for i := range in.Mappings {
		if subjectMatches(subject, in.Mappings[i].Subjects) {
			return &in.Mappings[i]
		}
	}
	return nil
}

// validPattern and subjectMatches are NATS subject matching (tokens split by dots,
// * one token, > the rest). A few lines, written here so that the contracts module
// does not depend on nats-server for them.
func validPattern(p string) bool {
	if p == "" {
		return false
	}
	toks := strings.Split(p, ".")
	for i, t := range toks {
		if t == "" || strings.ContainsAny(t, " \t\r\n") || (strings.ContainsAny(t, "*>") && len(t) > 1) || (t == ">" && i != len(toks)-1) {
			return false
		}
	}
	return true
}

func subjectMatches(subject, pattern string) bool {
	for {
		p, prest, pmore := strings.Cut(pattern, ".")
		s, srest, smore := strings.Cut(subject, ".")
		switch {
		case p == ">":
			return s != ""
		case p != "*" && p != s:
			return false
		case !pmore || !smore:
			return pmore == smore
		}
		pattern, subject = prest, srest
	}
}

// attrSource reads where an attribute comes from: its value, whether the source
// had one, or why it cannot be read.
func (a *Attr) read(m Message, payload []byte) (string, bool, error) {
	switch {
	case a.Value != "":
		return a.Value, true, nil
	case a.Header != "":
		v := headerValue(m.Header, a.Header)
		return v, v != "", nil
	case a.Token != 0:
		toks := strings.Split(m.Subject, ".")
		if a.Token > len(toks) {
			return "", false, nil
		}
		return toks[a.Token-1], true, nil
	}
	raw, ok := lookup(payload, a.Field)
	if !ok || isNull(raw) {
		return "", false, nil
	}
	switch raw[0] {
	case '"':
		s, ok := jsonString(raw)
		if !ok {
			return "", false, fmt.Errorf("field %s is not a valid string", a.Field)
		}
		return s, s != "", nil
	case '{', '[':
		return "", false, fmt.Errorf("field %s is %s, not a string, number or boolean", a.Field, jsonKind(raw))
	}
	return string(raw), true, nil // a number or a boolean, as written
}

func (a *Attr) describe() string {
	switch {
	case a.Value != "":
		return "value " + strconv.Quote(a.Value)
	case a.Header != "":
		return "header " + a.Header
	case a.Token != 0:
		return "subject token " + strconv.Itoa(a.Token)
	}
	return "field " + a.Field
}

// lookup finds the JSON value at path (names and array indexes joined by dots) in
// doc, a valid JSON value, without decoding the rest.
func lookup(doc []byte, path string) ([]byte, bool) {
	v := doc[skipSpace(doc, 0):]
	for step := range strings.SplitSeq(path, ".") {
		if len(v) == 0 {
			return nil, false
		}
		var next []byte
		switch v[0] {
		case '{':
			for name, raw := range objectMembers(v) {
				if string(name) == step || (!plainName(name) && unescapedName(name) == step) {
					next = raw
				}
			}
		case '[':
			i, err := strconv.Atoi(step)
			if err != nil || i < 0 {
				return nil, false
			}
			for j, raw := range arrayElements(v) {
				if j == i {
					next = raw
					break
				}
			}
		}
		if next == nil {
			return nil, false
		}
		v = next
	}
	return v, true
}

func unescapedName(name []byte) string {
	s, _ := jsonString(append(append([]byte{'"'}, name...), '"'))
	return s
}

// Members yields the members of raw, a valid JSON object, in order: each name (as
// written between its quotes, escapes not undone) and raw value. It yields nothing
// for a value that is not an object.
func Members(raw []byte) iter.Seq2[[]byte, []byte] {
	raw = raw[skipSpace(raw, 0):]
	if len(raw) == 0 || raw[0] != '{' {
		return func(func([]byte, []byte) bool) {}
	}
	return objectMembers(raw)
}

// MemberName is a name Members yielded, its escapes undone.
func MemberName(name []byte) string {
	if plainName(name) {
		return string(name)
	}
	return unescapedName(name)
}

// Unquote decodes raw, a valid JSON value, if it is a string.
func Unquote(raw []byte) (string, bool) {
	if len(raw) == 0 {
		return "", false
	}
	return jsonString(raw)
}

// Elements yields the elements of raw, a valid JSON array, with their indexes.
func Elements(raw []byte) iter.Seq2[int, []byte] {
	raw = raw[skipSpace(raw, 0):]
	if len(raw) == 0 || raw[0] != '[' {
		return func(func(int, []byte) bool) {}
	}
	return arrayElements(raw)
}

// arrayElements yields the elements of the JSON array b (valid JSON, b[0] its
// opening bracket) with their indexes.
func arrayElements(b []byte) iter.Seq2[int, []byte] {
	return func(yield func(int, []byte) bool) {
		i := skipSpace(b, 1)
		for n := 0; i < len(b) && b[i] != ']'; n++ {
			end := valueEnd(b, i)
			if !yield(n, b[i:end:end]) {
				return
			}
			i = skipSpace(b, end)
			if i < len(b) && b[i] == ',' {
				i = skipSpace(b, i+1)
			}
		}
	}
}

// readTime reads the time of a raw event.
func (t *TimeAttr) read(m Message, payload []byte) (time.Time, bool, error) {
	if t.Field == "" {
		s, ok, err := t.Attr.read(m, payload)
		if !ok || err != nil {
			return time.Time{}, ok, err
		}
		v, err := parseTimeText(s, t.Format)
		return v, true, err
	}
	raw, ok := lookup(payload, t.Field)
	if !ok || isNull(raw) {
		return time.Time{}, false, nil
	}
	var text string
	switch raw[0] {
	case '"':
		s, ok := jsonString(raw)
		if !ok {
			return time.Time{}, true, fmt.Errorf("is not a valid string")
		}
		if s == "" {
			return time.Time{}, false, nil
		}
		text = s
	case '{', '[', 't', 'f':
		return time.Time{}, true, fmt.Errorf("is %s, not a time", jsonKind(raw))
	default:
		text = string(raw)
		if t.Format == "" || t.Format == FormatISO8601 {
			return time.Time{}, true, fmt.Errorf("is the number %s; set the mapping's time format to %s, %s, %s or %s", text, FormatUnix, FormatUnixMs, FormatUnixUs, FormatUnixNs)
		}
	}
	v, err := parseTimeText(text, t.Format)
	return v, true, err
}

func parseTimeText(s, format string) (time.Time, error) {
	switch format {
	case "", FormatISO8601:
		return parseISO8601(s)
	case FormatUnix:
		return parseUnix(s, 1e9)
	case FormatUnixMs:
		return parseUnix(s, 1e6)
	case FormatUnixUs:
		return parseUnix(s, 1e3)
	case FormatUnixNs:
		return parseUnix(s, 1)
	}
	layout := strings.TrimPrefix(format, "layout:")
	v, err := time.Parse(layout, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q does not match the layout %q", s, layout)
	}
	return v.UTC(), nil
}

var isoLayouts = []string{
	"2006-01-02T15:04:05Z07:00",
	"2006-01-02T15:04:05Z0700",
	"2006-01-02T15:04:05Z07",
	"2006-01-02T15:04:05",
	"2006-01-02T15:04Z07:00",
	"2006-01-02T15:04",
	"2006-01-02",
}

// parseISO8601 reads RFC 3339 and the usual ISO 8601 variants (see FormatISO8601).
// time.Parse takes fractional seconds after a point or comma where the layout has
// whole seconds.
func parseISO8601(s string) (time.Time, error) {
	in := s
	if len(s) > 10 && (s[10] == ' ' || s[10] == 't') {
		s = s[:10] + "T" + s[11:]
	}
	if n := len(s); n > 0 && s[n-1] == 'z' {
		s = s[:n-1] + "Z"
	}
	leap := false
	if len(s) >= 19 && s[10] == 'T' && s[16] == ':' && s[17:19] == "60" {
		s, leap = s[:17]+"59"+s[19:], true
	}
	for _, layout := range isoLayouts {
		if t, err := time.Parse(layout, s); err == nil {
			if leap {
				// A leap second (23:59:60) reads as the second after 23:59:59.
				t = t.Truncate(time.Second).Add(time.Second)
			}
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("%q is not an ISO 8601 time", in)
}

var (
	maxUnixNanos = new(big.Rat).SetInt64(1<<63 - 1)
	jsonNumber   = regexp.MustCompile(`^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE]([+-]?[0-9]{1,3}))?$`)
)

// parseUnix reads a decimal number (a JSON number or its text: sign, fraction,
// exponent) of units of perUnit nanoseconds, exactly: fractions of a nanosecond are
// dropped (toward the past).
func parseUnix(s string, perUnit int64) (time.Time, error) {
	text := strings.TrimSpace(s)
	parts := jsonNumber.FindStringSubmatch(text)
	if parts == nil {
		return time.Time{}, fmt.Errorf("%q is not a number", s)
	}
	if exp, _ := strconv.Atoi(parts[4]); exp > 40 || exp < -40 {
		return time.Time{}, fmt.Errorf("%s is too far from 1970 to be a time", s)
	}
	r, ok := new(big.Rat).SetString(text)
	if !ok {
		return time.Time{}, fmt.Errorf("%q is not a number", s)
	}
	ns := r.Mul(r, new(big.Rat).SetInt64(perUnit))
	if new(big.Rat).Abs(ns).Cmp(maxUnixNanos) > 0 {
		return time.Time{}, fmt.Errorf("%s is too far from 1970 to be a time", s)
	}
	q := new(big.Int).Quo(ns.Num(), ns.Denom()) // truncated toward zero
	if ns.Sign() < 0 && !ns.IsInt() {
		q.Sub(q, big.NewInt(1))
	}
	return time.Unix(0, q.Int64()).UTC(), nil
}

// decodeRaw reads a raw event: the payload is its data, the mapping says where its
// attributes come from.
func decodeRaw(mp *Mapping, m Message) (*Event, error) {
	payload := bytes.TrimSpace(TrimBOM(m.Data))
	if len(payload) == 0 {
		return nil, invalid("mapping %q: payload is empty (want JSON)", mp.name())
	}
	if !utf8.Valid(payload) {
		return nil, invalid("mapping %q: payload is not valid UTF-8 at byte %d", mp.name(), invalidUTF8Offset(payload))
	}
	if !validJSON(payload) {
		var v any
		return nil, invalid("mapping %q: payload is not valid JSON: %v", mp.name(), json.Unmarshal(payload, &v))
	}
	e := &Event{Data: json.RawMessage(payload), DataContentType: "application/json", SpecVersion: SpecVersion}
	for _, a := range []struct {
		name string
		attr *Attr
		dst  *string
	}{{"id", mp.ID, &e.ID}, {"source", mp.Source, &e.Source}, {"type", mp.Type, &e.Type}, {"subject", mp.Subject, &e.Subject}} {
		if a.attr == nil {
			continue
		}
		v, ok, err := a.attr.read(m, payload)
		if err != nil {
			return nil, invalid("mapping %q: %s: %v", mp.name(), a.name, err)
		}
		if !ok {
			if a.attr.Default == nil {
				return nil, invalid("mapping %q: %s: %s is missing or empty", mp.name(), a.name, a.attr.describe())
			}
			v = *a.attr.Default
		}
		if !utf8.ValidString(v) {
			return nil, invalid("mapping %q: %s: %s is not valid UTF-8", mp.name(), a.name, a.attr.describe())
		}
		if len(v) > MaxAttrLen {
			return nil, invalid("mapping %q: %s: %s is %d bytes long (at most %d)", mp.name(), a.name, a.attr.describe(), len(v), MaxAttrLen)
		}
		*a.dst = v
	}
	if mp.Time != nil {
		t, ok, err := mp.Time.read(m, payload)
		if !ok || err != nil {
			switch d := mp.Time.Default; {
			case d == nil && err != nil:
				return nil, invalid("mapping %q: time: %s %v", mp.name(), mp.Time.describe(), err)
			case d == nil:
				return nil, invalid("mapping %q: time: %s is missing or empty", mp.name(), mp.Time.describe())
			case *d == DefaultReceived:
				t = time.Time{} // complete fills in the receive time
			default:
				t, _ = parseISO8601(*d) // checked by Validate
			}
		}
		if !t.IsZero() && (t.Before(MinTime) || t.After(MaxTime)) {
			return nil, invalid("mapping %q: time: %s %s is outside the range sluice stores (%s to %s)", mp.name(), mp.Time.describe(),
				t.Format(time.RFC3339Nano), MinTime.Format(time.RFC3339), MaxTime.Format(time.RFC3339))
		}
		e.Time = t
	}
	return e, nil
}

// validExtensionName reports whether name is a valid CloudEvents attribute name:
// lower-case ASCII letters and digits.
func validExtensionName(name string) bool {
	if name == "" {
		return false
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// checkMembers applies the decoder's policy to the extensions of e that are not
// valid extension attributes: an object or array value, or a bad name.
func (d *Decoder) checkMembers(e *Event) error {
	var bad []string
	for name, raw := range e.Extensions {
		if !validExtensionName(name) || (len(raw) > 0 && (raw[0] == '{' || raw[0] == '[')) {
			bad = append(bad, name)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	slices.Sort(bad)
	switch d.members {
	case MembersExtensions:
		e.NonStandard = len(bad)
		return nil
	case MembersData:
		return moveToData(e, bad)
	}
	name := bad[0]
	why := "its name is not lower-case letters and digits"
	if raw := e.Extensions[name]; len(raw) > 0 && (raw[0] == '{' || raw[0] == '[') {
		why = "it is " + jsonKind(raw) + " (extensions must be strings, numbers or booleans)"
	}
	return invalid("member %q is not a valid CloudEvents extension attribute: %s; put it in data, or map the subject with envelope: raw (docs/ingest.md)", name, why)
}

// moveToData moves the named extensions into e's data, an object.
func moveToData(e *Event, names []string) error {
	obj := map[string]json.RawMessage{}
	switch {
	case e.DataBase64 != "":
		return invalid("member %q is not a valid CloudEvents extension attribute, and cannot be moved into data: the event's data is base64", names[0])
	case len(e.Data) > 0:
		if e.Data[0] != '{' || gojson.Unmarshal(e.Data, &obj) != nil {
			return invalid("member %q is not a valid CloudEvents extension attribute, and cannot be moved into data: data is %s, not an object", names[0], jsonKind(e.Data))
		}
	}
	for _, name := range names {
		if _, ok := obj[name]; ok {
			return invalid("member %q is not a valid CloudEvents extension attribute, and cannot be moved into data: data has a member of that name", name)
		}
		obj[name] = e.Extensions[name]
		delete(e.Extensions, name)
	}
	if len(e.Extensions) == 0 {
		e.Extensions = nil
	}
	b, err := gojson.MarshalWithOption(obj, gojson.DisableHTMLEscape())
	if err != nil {
		return invalid("cannot move members into data: %v", err)
	}
	e.Data, e.NonStandard = b, len(names)
	if e.DataContentType == "" {
		e.DataContentType = "application/json"
	}
	return nil
}
