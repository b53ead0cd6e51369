// Package keyed defines the keying step's envelope: the message in which the
// keying step carries many events of one partition from EVENTS to PARTITIONS.
//
// With more than one partition, the keying step reads EVENTS, keys each event and
// copies it to its partition's subject in PARTITIONS. It copies the events of one
// partition it read together into one envelope (published to
// partitioned.<p>.envelope, with HeaderEnvelope and HeaderCount), so that
// PARTITIONS stores, acks and delivers one message for many events. Each entry is
// one event as EVENTS stored it: its subject, headers (the producer's, Nats-Msg-Id
// included), payload, its sequence in EVENTS and the time EVENTS stored it, its key,
// and, for one element of a batch message, the element's index in its batch.
//
// The encoding is binary: the magic "SLK1", the number of entries (uvarint), then
// each entry as: EVENTS sequence (uvarint), receive time in Unix nanoseconds
// (varint), element index (varint; -1 for a whole message), subject, key, the number
// of header values (uvarint) and each as name and value, then the payload; every
// string and the payload a uvarint length and its bytes.
package keyed

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Headers of an envelope message.
const (
	// HeaderEnvelope marks an envelope; its value is the encoding's version.
	HeaderEnvelope = "Sluice-Envelope"
	// HeaderCount is how many events the envelope holds.
	HeaderCount = "Sluice-Events"
	// Version is the value of HeaderEnvelope for this encoding.
	Version = "1"
	// Token is the last token of an envelope's subject (partitioned.<p>.envelope).
	Token = "envelope"
)

var magic = []byte("SLK1")

// Entry is one event of an envelope.
type Entry struct {
	Subject  string
	Header   map[string][]string
	Data     []byte
	Seq      uint64 // in EVENTS
	Received time.Time
	Key      string
	// Element is the event's index in its batch message, or -1.
	Element int
}

// Encoder builds one envelope.
type Encoder struct {
	buf []byte
	n   int
}

// Reset empties e for a new envelope, keeping its memory.
func (e *Encoder) Reset() { e.buf, e.n = e.buf[:0], 0 }

// Len is the envelope's size in bytes so far, without the count.
func (e *Encoder) Len() int { return len(magic) + binary.MaxVarintLen64 + len(e.buf) }

// Count is how many entries e holds.
func (e *Encoder) Count() int { return e.n }

// Size is what adding x would add to the envelope, at most.
func Size(x *Entry) int {
	n := 3*binary.MaxVarintLen64 + 4*binary.MaxVarintLen64 + len(x.Subject) + len(x.Key) + len(x.Data)
	for k, vs := range x.Header {
		for _, v := range vs {
			n += 2*binary.MaxVarintLen64 + len(k) + len(v)
		}
	}
	return n
}

// Add appends x.
func (e *Encoder) Add(x *Entry) {
	e.n++
	e.buf = binary.AppendUvarint(e.buf, x.Seq)
	e.buf = binary.AppendVarint(e.buf, x.Received.UnixNano())
	e.buf = binary.AppendVarint(e.buf, int64(x.Element))
	e.buf = appendString(e.buf, x.Subject)
	e.buf = appendString(e.buf, x.Key)
	values := 0
	for _, vs := range x.Header {
		values += len(vs)
	}
	e.buf = binary.AppendUvarint(e.buf, uint64(values))
	for k, vs := range x.Header {
		for _, v := range vs {
			e.buf = appendString(e.buf, k)
			e.buf = appendString(e.buf, v)
		}
	}
	e.buf = binary.AppendUvarint(e.buf, uint64(len(x.Data)))
	e.buf = append(e.buf, x.Data...)
}

// Bytes returns the envelope: a new slice, e may be reset after.
func (e *Encoder) Bytes() []byte {
	out := make([]byte, 0, len(magic)+binary.MaxVarintLen64+len(e.buf))
	out = append(out, magic...)
	out = binary.AppendUvarint(out, uint64(e.n))
	return append(out, e.buf...)
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// errShort is the error of an envelope cut short.
var errShort = errors.New("envelope: cut short")

// Decode calls f with each entry of the envelope b, in order, until f returns
// false. An entry's Data shares b's memory; its Header is nil when it has none. A
// malformed envelope is an error naming where it breaks (the entries before it
// were passed to f).
func Decode(b []byte, f func(i int, x Entry) bool) error {
	if len(b) < len(magic) || string(b[:len(magic)]) != string(magic) {
		return errors.New("envelope: not an envelope (no SLK1 magic)")
	}
	d := decoder{b: b[len(magic):]}
	n := d.uvarint()
	if d.err != nil {
		return fmt.Errorf("envelope: count: %w", d.err)
	}
	for i := 0; uint64(i) < n; i++ {
		var x Entry
		x.Seq = d.uvarint()
		x.Received = time.Unix(0, d.varint()).UTC()
		x.Element = int(d.varint())
		x.Subject = string(d.bytes())
		x.Key = string(d.bytes())
		if values := d.uvarint(); values > 0 && d.err == nil {
			if values > uint64(len(d.b)) {
				return fmt.Errorf("envelope: entry %d: %d header values in %d bytes", i, values, len(d.b))
			}
			x.Header = make(map[string][]string, values)
			for range values {
				k := string(d.bytes())
				v := string(d.bytes())
				x.Header[k] = append(x.Header[k], v)
			}
		}
		x.Data = d.bytes()
		if d.err != nil {
			return fmt.Errorf("envelope: entry %d of %d: %w", i, n, d.err)
		}
		if !f(i, x) {
			return nil
		}
	}
	if len(d.b) != 0 {
		return fmt.Errorf("envelope: %d bytes after its %d entries", len(d.b), n)
	}
	return nil
}

type decoder struct {
	b   []byte
	err error
}

func (d *decoder) uvarint() uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.err = errShort
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.err = errShort
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) bytes() []byte {
	n := d.uvarint()
	if d.err != nil {
		return nil
	}
	if n > uint64(len(d.b)) {
		d.err = errShort
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}
