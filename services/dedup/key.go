package dedup

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strings"

	"github.com/sluicehq/sluice/schemas/events"
)

// Key derivation. A key is the first 128 bits of a SHA-256 over a kind tag and the
// parts that identify the event, in hex. With 128 bits, the chance that any two of
// 1e9 distinct keys collide is about 1.5e-21.
//
// In order of precedence:
//  1. the producer's Nats-Msg-Id header ("m");
//  2. the CloudEvents source and id ("e");
//  3. for an event without id, its content: the NATS subject, the ce-* headers and
//     the payload as published ("c").
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
	if id := headerValue(m.Header, "Nats-Msg-Id"); id != "" {
		return keyOf("m", id)
	}
	if e.ID != "" {
		return keyOf("e", e.Source, e.ID)
	}
	return contentKey(m)
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
