package notify

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
)

// Payload formats a receiver can ask for.
const (
	// FormatSluice is sluice's own JSON: the group and its alerts as the ALERTS
	// stream holds them.
	FormatSluice = "sluice"
	// FormatAlertmanager is the JSON Alertmanager's webhook receiver sends
	// (version 4), for tools that already read it.
	FormatAlertmanager = "alertmanager"
	// FormatSlack is a Slack incoming-webhook message.
	FormatSlack = "slack"
)

// Notification is what one request to one receiver carries: a group's alerts.
type Notification struct {
	Receiver    string
	GroupKey    string
	GroupLabels map[string]string
	Alerts      []*alerts.Alert
	// Truncated counts alerts left out to keep the request under the size limit.
	Truncated int
}

// Status is firing if any alert fires, else resolved.
func (n *Notification) Status() string {
	for _, a := range n.Alerts {
		if a.Status == alerts.Firing {
			return alerts.Firing
		}
	}
	return alerts.Resolved
}

// common returns the key/values every map shares.
func common(ms []map[string]string) map[string]string {
	out := map[string]string{}
	if len(ms) == 0 {
		return out
	}
	maps.Copy(out, ms[0])
	for _, m := range ms[1:] {
		for k, v := range out {
			if w, ok := m[k]; !ok || w != v {
				delete(out, k)
			}
		}
	}
	return out
}

func (n *Notification) commonLabels() map[string]string {
	ms := make([]map[string]string, len(n.Alerts))
	for i, a := range n.Alerts {
		ms[i] = a.Labels
	}
	return common(ms)
}

func (n *Notification) commonAnnotations() map[string]string {
	ms := make([]map[string]string, len(n.Alerts))
	for i, a := range n.Alerts {
		ms[i] = a.Annotations
	}
	return common(ms)
}

// Render encodes n in format.
func Render(format string, n *Notification) ([]byte, error) {
	switch format {
	case FormatSluice, "":
		return json.Marshal(Payload{
			Version: "1", Receiver: n.Receiver, Status: n.Status(), GroupKey: n.GroupKey, GroupLabels: orEmpty(n.GroupLabels),
			CommonLabels: n.commonLabels(), CommonAnnotations: n.commonAnnotations(), TruncatedAlerts: n.Truncated, Alerts: n.Alerts,
		})
	case FormatAlertmanager:
		p := amPayload{
			Version: "4", GroupKey: n.GroupKey, TruncatedAlerts: n.Truncated, Status: n.Status(), Receiver: n.Receiver,
			GroupLabels: orEmpty(n.GroupLabels), CommonLabels: n.commonLabels(), CommonAnnotations: n.commonAnnotations(),
			Alerts: make([]amAlert, 0, len(n.Alerts)),
		}
		for _, a := range n.Alerts {
			p.Alerts = append(p.Alerts, amAlert{
				Status: a.Status, Labels: orEmpty(a.Labels), Annotations: orEmpty(a.Annotations),
				StartsAt: a.StartsAt, EndsAt: a.EndsAt, Fingerprint: a.Fingerprint,
			})
		}
		return json.Marshal(p)
	case FormatSlack:
		return json.Marshal(slackPayload{Text: slackText(n)})
	}
	return nil, fmt.Errorf("format %q: want sluice, alertmanager or slack", format)
}

func orEmpty(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

// Payload is the body of the sluice format: a group's alerts with the labels
// they share. Receivers written in Go can decode into it.
type Payload struct {
	Version           string            `json:"version"`
	Receiver          string            `json:"receiver"`
	Status            string            `json:"status"`
	GroupKey          string            `json:"groupKey"`
	GroupLabels       map[string]string `json:"groupLabels"`
	CommonLabels      map[string]string `json:"commonLabels"`
	CommonAnnotations map[string]string `json:"commonAnnotations"`
	TruncatedAlerts   int               `json:"truncatedAlerts"`
	Alerts            []*alerts.Alert   `json:"alerts"`
}

// amPayload is Alertmanager's webhook payload, version 4
// (https://prometheus.io/docs/alerting/latest/configuration/#webhook_config).
type amPayload struct {
	Version           string            `json:"version"`
	GroupKey          string            `json:"groupKey"`
	TruncatedAlerts   int               `json:"truncatedAlerts"`
	Status            string            `json:"status"`
	Receiver          string            `json:"receiver"`
	GroupLabels       map[string]string `json:"groupLabels"`
	CommonLabels      map[string]string `json:"commonLabels"`
	CommonAnnotations map[string]string `json:"commonAnnotations"`
	ExternalURL       string            `json:"externalURL"`
	Alerts            []amAlert         `json:"alerts"`
}

type amAlert struct {
	Status       string            `json:"status"`
	Labels       map[string]string `json:"labels"`
	Annotations  map[string]string `json:"annotations"`
	StartsAt     time.Time         `json:"startsAt"`
	EndsAt       time.Time         `json:"endsAt"`
	GeneratorURL string            `json:"generatorURL"`
	Fingerprint  string            `json:"fingerprint"`
}

// slackPayload is a Slack incoming-webhook message
// (https://api.slack.com/messaging/webhooks): mrkdwn text.
type slackPayload struct {
	Text string `json:"text"`
}

func slackText(n *Notification) string {
	firing := 0
	for _, a := range n.Alerts {
		if a.Status == alerts.Firing {
			firing++
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "*[%s:%d]*", strings.ToUpper(n.Status()), len(n.Alerts))
	if len(n.GroupLabels) > 0 {
		b.WriteString(" ")
		for i, k := range slices.Sorted(maps.Keys(n.GroupLabels)) {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "%s=%s", k, slackEscape(n.GroupLabels[k]))
		}
	}
	if firing > 0 && firing < len(n.Alerts) {
		fmt.Fprintf(&b, " (%d firing, %d resolved)", firing, len(n.Alerts)-firing)
	}
	for _, a := range n.Alerts {
		text := a.Annotations["summary"]
		if text == "" {
			text = a.Rule
		}
		icon := ":red_circle:"
		if a.Status == alerts.Resolved {
			icon = ":large_green_circle:"
		}
		fmt.Fprintf(&b, "\n%s *%s* %s", icon, slackEscape(a.Labels["severity"]), slackEscape(text))
	}
	if n.Truncated > 0 {
		fmt.Fprintf(&b, "\n…and %d more", n.Truncated)
	}
	return b.String()
}

// slackEscape escapes the three characters Slack's mrkdwn reserves.
func slackEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}
