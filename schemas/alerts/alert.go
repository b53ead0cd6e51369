// Package alerts defines the alert message the alert stage publishes to the ALERTS
// stream (subject alerts.<rule>.<severity>) and the notify stage and the sink read.
package alerts

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Status of an alert.
const (
	Firing   = "firing"
	Resolved = "resolved"
)

// Alert is one state change of an alert.
type Alert struct {
	// Fingerprint identifies the alert: the rule and its group labels.
	Fingerprint string            `json:"fingerprint"`
	Rule        string            `json:"rule"`
	Status      string            `json:"status"`
	Severity    string            `json:"severity"`
	Labels      map[string]string `json:"labels"`
	Annotations map[string]string `json:"annotations,omitempty"`
	StartsAt    time.Time         `json:"startsAt"`
	EndsAt      time.Time         `json:"endsAt,omitzero"`
	// Value is the windowed value (threshold), change (rate) or seconds of silence
	// (absence) when the alert changed.
	Value *float64 `json:"value,omitempty"`
	// EventKey is the key of the event that caused this change (match rules).
	EventKey string `json:"eventKey,omitempty"`
	// Replay marks an alert produced while re-reading old input.
	Replay bool `json:"replay,omitempty"`
}

// Fingerprint hashes a rule name and its group labels.
func Fingerprint(rule string, labels map[string]string) string {
	keys := make([]string, 0, len(labels))
	for k := range labels {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	h := sha256.New()
	h.Write([]byte(rule))
	for _, k := range keys {
		h.Write([]byte{0})
		h.Write([]byte(k))
		h.Write([]byte{1})
		h.Write([]byte(labels[k]))
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}

// Subject is where a is published: alerts.<rule>.<severity>, with characters NATS
// subjects cannot hold replaced by '_'.
func (a *Alert) Subject() string {
	return "alerts." + token(a.Rule) + "." + token(a.Severity)
}

func token(s string) string {
	if s == "" {
		return "none"
	}
	return strings.Map(func(r rune) rune {
		if r == '.' || r == '*' || r == '>' || r <= ' ' {
			return '_'
		}
		return r
	}, s)
}

// Decode parses an alert message.
func Decode(b []byte) (*Alert, error) {
	var a Alert
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, fmt.Errorf("alert is not valid JSON: %w", err)
	}
	if a.Fingerprint == "" || a.Rule == "" {
		return nil, fmt.Errorf("alert lacks fingerprint or rule")
	}
	return &a, nil
}

// RuleInputSubject is the RULES subject of partition p's rule input: the
// enriched events of the partition that a rule's filter matches, evaluated by one
// alert runner for every partition.
func RuleInputSubject(p int) string { return fmt.Sprintf("rules.%d", p) }

// RuleInputMsgID is the Nats-Msg-Id of the rule input of the event at sequence
// seq of stream (element, from 0, of a batch message; -1 for a message that is
// one event): a partition's owner that decides the input again after a restart
// publishes the same id, which RULES' duplicate window and the owner's own check
// drop.
func RuleInputMsgID(stream string, seq uint64, element int) string {
	if element < 0 {
		return fmt.Sprintf("rule:%s:%d", stream, seq)
	}
	return fmt.Sprintf("rule:%s:%d:%d", stream, seq, element)
}

// HeaderProgress, on a rule input message without a body, is the latest event
// time (RFC 3339, nanoseconds) of the partition's input decided so far, or of its
// idle time: the alert runner closes a window only once every partition's
// progress has passed it.
const HeaderProgress = "Sluice-Progress"

// RuleInputPartition is the partition of a RULES subject (RuleInputSubject).
func RuleInputPartition(subject string) (int, error) {
	rest, ok := strings.CutPrefix(subject, "rules.")
	p, err := strconv.Atoi(rest)
	if !ok || err != nil || p < 0 {
		return 0, fmt.Errorf("subject %q is not rules.<partition>", subject)
	}
	return p, nil
}

// HeaderReplay, set to "true" on rule input, marks input decided again after
// sluice had no state: alert changes it causes are replays (Alert.Replay).
const HeaderReplay = "Sluice-Replay"

// MsgID is the Nats-Msg-Id of the ALERTS message of a: one per alert, status and
// start, so a republication of the same change is dropped by ALERTS' duplicate
// window and recognised by stages that restart.
func MsgID(a *Alert) string {
	return fmt.Sprintf("alert:%s:%s:%d", a.Fingerprint, a.Status, a.StartsAt.UnixMilli())
}
