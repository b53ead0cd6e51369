// Package oracle generates a known set of events, publishes it the way the nats CLI
// does (a core publish to a subject, optionally with headers), and checks what the
// platform stored against it.
package oracle

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Form is how an event is published.
type Form int

// The forms of publish the manifest mixes.
const (
	Structured      Form = iota // CloudEvents JSON with id
	StructuredMsgID             // CloudEvents JSON with a Nats-Msg-Id header
	Binary                      // ce-* headers, data as payload
	StructuredNoID              // no id: keyed by content
	numForms
)

// Publish is one message in the manifest.
type Publish struct {
	Subject string
	Header  nats.Header
	Data    []byte
	// Event is the index of the unique event this publishes, or -1 for invalid input.
	Event int
	// Repeat marks a publish of an event already published.
	Repeat bool
}

// Event is a unique valid event and what ClickHouse should show of it.
type Event struct {
	ID     string // "" for content-keyed events
	Source string
	Type   string
	Form   Form
}

// Manifest is what a run publishes and what it expects.
type Manifest struct {
	Publishes []Publish
	Events    []Event
	// Invalid holds the payloads that must end in dead_letters.
	Invalid [][]byte
	// MayRepeat counts, by payload, extra copies an invalid input may have in
	// dead_letters: PublishAcked sent it again without a Nats-Msg-Id after an
	// attempt it could not confirm, so JetStream may hold it more than once.
	MayRepeat map[string]int
}

// Spec sizes a manifest.
type Spec struct {
	Total       int     // publishes
	RepeatRatio float64 // share of publishes that repeat an earlier event
	InvalidRate float64 // share of publishes that are invalid
	Seed        uint64
}

// invalidCases are bad inputs, each of which the dedup stage must dead-letter.
var invalidCases = []struct {
	name   string
	header nats.Header
	data   string
}{
	{"truncated JSON", nil, `{"id":"x","source":"a"`},
	{"not an object", nil, `[1,2,3]`},
	{"empty body", nil, ``},
	{"id is a number", nil, `{"id":42,"source":"a","type":"b"}`},
	{"bad time", nil, `{"id":"t1","time":"last tuesday"}`},
	{"time before 1970", nil, `{"id":"t2","time":"1969-07-20T20:17:40Z"}`},
	{"time far ahead of its arrival", nil, `{"id":"t3","time":"2099-01-01T00:00:00Z"}`},
	{"bad specversion", nil, `{"id":"s1","specversion":"0.3"}`},
	{"invalid UTF-8", nil, "{\"id\":\"\xff\xfe\"}"},
	{"schema violation", nil, `{"id":"o1","type":"order.created","data":{"order_id":"o1","amount":-5}}`},
	{"binary data not JSON", nats.Header{"ce-id": {"b"}, "Content-Type": {"application/json"}}, `{oops`},
}

// NewManifest builds a manifest: Total publishes, of which about RepeatRatio repeat
// an earlier event and InvalidRate are invalid, the rest unique events in every form.
func NewManifest(s Spec) *Manifest {
	rng := rand.New(rand.NewPCG(s.Seed, s.Seed^0x9e3779b97f4a7c15))
	m := &Manifest{}
	nInvalid := int(float64(s.Total) * s.InvalidRate)
	nRepeat := int(float64(s.Total) * s.RepeatRatio)
	nUnique := s.Total - nInvalid - nRepeat
	base := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	for i := range nUnique {
		m.Publishes = append(m.Publishes, m.newEvent(i, base.Add(time.Duration(i)*time.Millisecond)))
	}
	for range nRepeat {
		p := m.Publishes[rng.IntN(nUnique)]
		p.Repeat = true
		m.Publishes = append(m.Publishes, p)
	}
	for i := range nInvalid {
		c := invalidCases[i%len(invalidCases)]
		data := []byte(c.data)
		if i >= len(invalidCases) {
			// Make each payload distinct, keeping what is wrong with it, so the check
			// can match them one to one.
			switch {
			case strings.HasPrefix(c.data, "{"):
				data = []byte(`{"n":` + strconv.Itoa(i) + "," + c.data[1:])
			case strings.HasPrefix(c.data, "["):
				data = []byte("[" + strconv.Itoa(i) + "," + c.data[1:])
			}
		}
		if len(data) == 0 {
			data = nil
		}
		m.Publishes = append(m.Publishes, Publish{Subject: "events.bad.input", Header: c.header, Data: data, Event: -1})
		m.Invalid = append(m.Invalid, data)
	}
	rng.Shuffle(len(m.Publishes), func(i, j int) { m.Publishes[i], m.Publishes[j] = m.Publishes[j], m.Publishes[i] })
	// A repeat must come after its original for Repeat to be true to its name; the
	// shuffle may reorder them, which only changes which copy is first.
	return m
}

func (m *Manifest) newEvent(i int, at time.Time) Publish {
	form := Form(i % int(numForms))
	source := "shop" + strconv.Itoa(i%7)
	typ := "page.view"
	id := fmt.Sprintf("ev-%06d", i)
	data := map[string]any{"n": i, "user": "u" + strconv.Itoa(i%100), "path": "/p/" + strconv.Itoa(i%37)}
	subject := "events." + source + "." + typ
	p := Publish{Subject: subject, Event: len(m.Events)}
	switch form {
	case Structured, StructuredMsgID, StructuredNoID:
		ce := map[string]any{"specversion": "1.0", "source": source, "type": typ, "time": at.Format(time.RFC3339Nano), "data": data}
		if form != StructuredNoID {
			ce["id"] = id
		} else {
			id = ""
		}
		p.Data, _ = json.Marshal(ce)
		if form == StructuredMsgID {
			p.Header = nats.Header{nats.MsgIdHdr: {"msgid-" + strconv.Itoa(i)}}
		}
	case Binary:
		p.Header = nats.Header{
			"ce-specversion": {"1.0"}, "ce-id": {id}, "ce-source": {source}, "ce-type": {typ},
			"ce-time": {at.Format(time.RFC3339Nano)}, "Content-Type": {"application/json"},
		}
		p.Data, _ = json.Marshal(data)
	}
	m.Events = append(m.Events, Event{ID: id, Source: source, Type: typ, Form: form})
	return p
}

// PublishAll publishes every message with core NATS publishes, as `nats pub` does,
// flushing every flushEvery messages.
func (m *Manifest) PublishAll(nc *nats.Conn, flushEvery int) error {
	for i, p := range m.Publishes {
		msg := &nats.Msg{Subject: p.Subject, Header: p.Header, Data: p.Data}
		if err := nc.PublishMsg(msg); err != nil {
			return fmt.Errorf("publish %d: %w", i, err)
		}
		if flushEvery > 0 && (i+1)%flushEvery == 0 {
			if err := nc.Flush(); err != nil {
				return fmt.Errorf("flush: %w", err)
			}
		}
	}
	return nc.Flush()
}

// PublishAcked publishes every message through JetStream, batch at a time, and
// publishes again (same headers, so the same Nats-Msg-Id where there is one) each
// one not acknowledged, until it is or ctx ends: a careful producer across NATS
// restarts. pause, if set, is called after each batch (to pace the run).
func (m *Manifest) PublishAcked(ctx context.Context, js jetstream.JetStream, batch int, pause func()) error {
	for start := 0; start < len(m.Publishes); start += batch {
		part := m.Publishes[start:min(start+batch, len(m.Publishes))]
		futures := make([]jetstream.PubAckFuture, len(part))
		for i, p := range part {
			f, err := js.PublishMsgAsync(&nats.Msg{Subject: p.Subject, Header: p.Header, Data: p.Data})
			if err == nil {
				futures[i] = f
			}
		}
		// An ack lost on the way (a route reset while a stream changes leader) leaves
		// its future unresolved for ever: after this long, the rest of the batch is
		// published again, one by one.
		lost, expired := time.After(10*time.Second), false
		for i, p := range part {
			if f := futures[i]; f != nil && expired {
				select {
				case <-f.Ok():
					continue
				default:
				}
			} else if f != nil {
				select {
				case <-f.Ok():
					continue
				case <-f.Err():
				case <-lost:
					expired = true
				case <-ctx.Done():
					return ctx.Err()
				}
			}
			for {
				if p.Event < 0 && p.Header.Get(nats.MsgIdHdr) == "" {
					if m.MayRepeat == nil {
						m.MayRepeat = map[string]int{}
					}
					m.MayRepeat[string(p.Data)]++
				}
				pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
				_, err := js.PublishMsg(pctx, &nats.Msg{Subject: p.Subject, Header: p.Header, Data: p.Data})
				cancel()
				if err == nil {
					break
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("publish %d never acknowledged: %w", start+i, err)
				case <-time.After(100 * time.Millisecond):
				}
			}
		}
		if pause != nil {
			pause()
		}
	}
	return nil
}
