// Package events defines the sluice event envelope: a CloudEvents 1.0 event as it
// arrives on NATS (structured or binary mode), normalised and validated, and the JSON
// form the stages pass to each other.
package events

import (
	"encoding/json"

	gojson "github.com/goccy/go-json"
	"time"
)

// SpecVersion is the only CloudEvents version sluice accepts.
const SpecVersion = "1.0"

// Event is a normalised CloudEvent. Every stage after dedup reads and writes this
// JSON form; the sluice* fields are CloudEvents extension attributes that sluice adds.
type Event struct {
	ID              string          `json:"id"`
	Source          string          `json:"source"`
	Type            string          `json:"type"`
	SpecVersion     string          `json:"specversion"`
	Time            time.Time       `json:"time"`
	Subject         string          `json:"subject,omitempty"`
	DataContentType string          `json:"datacontenttype,omitempty"`
	DataSchema      string          `json:"dataschema,omitempty"`
	Data            json.RawMessage `json:"data,omitempty"`
	// DataBase64 holds non-JSON data, base64-encoded, as CloudEvents' data_base64.
	DataBase64 string `json:"data_base64,omitempty"`
	// Extensions holds the CloudEvents extension attributes the producer sent.
	Extensions map[string]json.RawMessage `json:"extensions,omitempty"`

	// Key is the deduplication key (see the dedup service).
	Key string `json:"sluicekey,omitempty"`
	// ReceivedAt is when sluice first consumed the event (the raw stream's timestamp).
	ReceivedAt time.Time `json:"sluicereceived"`
	// NATSSubject is the subject the producer published to.
	NATSSubject string `json:"sluicesubject,omitempty"`
	// Enrichment holds the fields the enrich stage added.
	Enrichment map[string]any `json:"sluiceenrichment,omitempty"`

	// NonStandard counts the top-level members of the payload that were not valid
	// CloudEvents extension attributes and were kept (Ingest.InvalidMembers).
	NonStandard int `json:"-"`

	// decoded caches DecodeData's result (decodedOK: it is set), or
	// DecodeDataFields' (decodedFields: what of data it holds).
	decoded       any
	decodedOK     bool
	decodedFields DataFields
}

// DecodeData decodes the event's data into generic values (objects, arrays,
// strings, float64 numbers, bools, nil), nil when there is none. The result is
// kept: later calls return the same values, so a caller that changes them must
// also set Data to their encoding (as enrich's masks do).
func (e *Event) DecodeData() (any, error) {
	return e.DecodeDataFields(AllData())
}

// Marshal returns the inter-stage JSON form of e. Characters HTML escaping would
// change (&, <, >) are kept as they are, so data reaches ClickHouse as sent.
func (e *Event) Marshal() ([]byte, error) {
	return gojson.MarshalWithOption(e, gojson.DisableHTMLEscape())
}

// Unmarshal decodes the inter-stage JSON form produced by Marshal.
func Unmarshal(b []byte) (*Event, error) {
	var e Event
	if err := gojson.Unmarshal(b, &e); err != nil {
		return nil, &InvalidError{Reason: "inter-stage event is not valid JSON: " + err.Error()}
	}
	return &e, nil
}
