package notify

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
	"github.com/sluicehq/sluice/services/kit/configfile"
)

// RouteConfig is one entry of the routes section: which alerts (by label
// matchers) go to which receivers, and how they are grouped into notifications,
// as in Alertmanager.
type RouteConfig struct {
	Receivers []string `yaml:"receivers"`
	// Matchers select alerts by label (team=shop, severity=~"critical|page");
	// none: every alert.
	Matchers []string `yaml:"matchers"`
	// GroupBy lists the labels whose values make a group: one notification carries a
	// group's alerts. ["..."] (the default) groups by every label: each alert alone.
	GroupBy []string `yaml:"group_by"`
	// GroupWait is how long a new group waits for more alerts before its first
	// notification.
	GroupWait time.Duration `yaml:"group_wait"`
	// GroupInterval is how long after a notification a group waits before notifying
	// of changes (new alerts, resolutions).
	GroupInterval time.Duration `yaml:"group_interval"`
	// RepeatInterval is how long after a notification a group still firing and
	// unchanged is notified again (0: never).
	RepeatInterval time.Duration `yaml:"repeat_interval"`
	// Continue lets later routes match an alert this route matched.
	Continue bool `yaml:"continue"`
}

// InhibitConfig is one entry of notify.inhibit: while an alert matching Source
// fires, alerts matching Target with the same values of the Equal labels are not
// notified (a critical alert mutes its warnings).
type InhibitConfig struct {
	Source []string `yaml:"source_matchers"`
	Target []string `yaml:"target_matchers"`
	Equal  []string `yaml:"equal"`
}

// Settings is the notify section of SLUICE_CONFIG.
type Settings struct {
	Inhibit []InhibitConfig `yaml:"inhibit"`
}

// Route is a loaded route.
type Route struct {
	RouteConfig
	index     int
	id        string
	matchers  []Matcher
	receivers []*Receiver
}

// InhibitRule is a loaded notify.inhibit entry (see InhibitConfig).
type InhibitRule struct {
	source, target []Matcher
	equal          []string
}

// DefaultRoute is the route used when the config has none: every alert, alone, to
// every receiver, at once, never repeated.
func DefaultRoute(receivers []*Receiver) RouteConfig {
	names := make([]string, len(receivers))
	for i, r := range receivers {
		names[i] = r.Name
	}
	return RouteConfig{Receivers: names, GroupBy: []string{"..."}}
}

// LoadRoutes decodes the routes section of f over receivers (the default route
// when there is none) and the inhibit rules of the notify section.
func LoadRoutes(f *configfile.File, receivers []*Receiver) ([]*Route, []InhibitRule, error) {
	var cfgs []RouteConfig
	if err := f.Decode("routes", &cfgs); err != nil {
		return nil, nil, err
	}
	var s Settings
	if err := f.Decode("notify", &s); err != nil {
		return nil, nil, err
	}
	if len(cfgs) == 0 && len(receivers) > 0 {
		cfgs = []RouteConfig{DefaultRoute(receivers)}
	}
	routes, err := NewRoutes(cfgs, receivers)
	if err != nil {
		return nil, nil, err
	}
	inhibit, err := newInhibit(s.Inhibit)
	return routes, inhibit, err
}

// NewRoutes checks cfgs against receivers.
func NewRoutes(cfgs []RouteConfig, receivers []*Receiver) ([]*Route, error) {
	byName := map[string]*Receiver{}
	for _, r := range receivers {
		byName[r.Name] = r
	}
	var (
		out  []*Route
		errs []error
	)
	for i, c := range cfgs {
		r := &Route{RouteConfig: c, index: i}
		var err error
		if r.matchers, err = ParseMatchers(c.Matchers); err != nil {
			errs = append(errs, fmt.Errorf("route %d: %w", i+1, err))
			continue
		}
		if len(c.Receivers) == 0 {
			errs = append(errs, fmt.Errorf("route %d: receivers is required", i+1))
		}
		for _, name := range c.Receivers {
			rc := byName[name]
			if rc == nil {
				errs = append(errs, fmt.Errorf("route %d: no receiver is named %q", i+1, name))
				continue
			}
			r.receivers = append(r.receivers, rc)
		}
		if len(r.GroupBy) == 0 {
			r.GroupBy = []string{"..."}
		}
		if c.GroupWait < 0 || c.GroupInterval < 0 || c.RepeatInterval < 0 {
			errs = append(errs, fmt.Errorf("route %d: group_wait, group_interval and repeat_interval must not be negative", i+1))
		}
		h := sha256.New()
		fmt.Fprintf(h, "%d\x00%q\x00%q", i, c.Matchers, r.GroupBy)
		r.id = hex.EncodeToString(h.Sum(nil)[:6])
		out = append(out, r)
	}
	return out, errors.Join(errs...)
}

func newInhibit(cfgs []InhibitConfig) ([]InhibitRule, error) {
	var out []InhibitRule
	for i, c := range cfgs {
		src, err := ParseMatchers(c.Source)
		if err != nil {
			return nil, fmt.Errorf("notify.inhibit %d: source_matchers: %w", i+1, err)
		}
		tgt, err := ParseMatchers(c.Target)
		if err != nil {
			return nil, fmt.Errorf("notify.inhibit %d: target_matchers: %w", i+1, err)
		}
		if len(src) == 0 || len(tgt) == 0 {
			return nil, fmt.Errorf("notify.inhibit %d: source_matchers and target_matchers are required", i+1)
		}
		out = append(out, InhibitRule{source: src, target: tgt, equal: c.Equal})
	}
	return out, nil
}

// groupLabels picks the route's group_by labels of an alert.
func (r *Route) groupLabels(labels map[string]string) map[string]string {
	if slices.Contains(r.GroupBy, "...") {
		return maps.Clone(labels)
	}
	out := make(map[string]string, len(r.GroupBy))
	for _, k := range r.GroupBy {
		out[k] = labels[k]
	}
	return out
}

// groupKey names a route's group: stable across restarts and usable as a KV key
// and in a NATS subject token.
func (r *Route) groupKey(groupLabels map[string]string) string {
	h := sha256.New()
	h.Write([]byte(r.id))
	for _, k := range slices.Sorted(maps.Keys(groupLabels)) {
		h.Write([]byte{0})
		h.Write([]byte(k))
		h.Write([]byte{1})
		h.Write([]byte(groupLabels[k]))
	}
	return hex.EncodeToString(h.Sum(nil)[:10])
}

// Group is one route's group of alerts and where its notifications stand. It is
// kept in the notify KV bucket, so a restart carries on.
type Group struct {
	Key    string                   `json:"key"`
	Route  string                   `json:"route"`
	Labels map[string]string        `json:"labels"`
	Alerts map[string]*alerts.Alert `json:"alerts"`
	// Created is when the group got its first alert; LastFlush when it was last
	// notified; Flushes counts notifications (it makes their ids).
	Created   time.Time `json:"created"`
	LastFlush time.Time `json:"last_flush,omitzero"`
	Flushes   uint64    `json:"flushes"`
	// Changed: alerts came, went or changed since the last notification.
	Changed bool `json:"changed"`
	// Sent is, by receiver, a digest of what it was last sent.
	Sent map[string]string `json:"sent,omitempty"`
}

// due reports whether g should be notified at now.
func (g *Group) due(r *Route, now time.Time) (due, repeat bool) {
	if len(g.Alerts) == 0 {
		return false, false
	}
	if g.LastFlush.IsZero() {
		return !now.Before(g.Created.Add(r.GroupWait)), false
	}
	if g.Changed && !now.Before(g.LastFlush.Add(r.GroupInterval)) {
		return true, false
	}
	if r.RepeatInterval > 0 && !now.Before(g.LastFlush.Add(r.RepeatInterval)) {
		for _, a := range g.Alerts {
			if a.Status == alerts.Firing {
				return true, true
			}
		}
	}
	return false, false
}

// add puts a into g; it reports whether g changed. A resolution of an alert the
// group does not hold (never notified firing) is dropped.
func (g *Group) add(a *alerts.Alert) bool {
	old := g.Alerts[a.Fingerprint]
	switch {
	case old == nil && a.Status == alerts.Resolved:
		return false
	case old != nil && old.Status == a.Status && old.StartsAt.Equal(a.StartsAt):
		return false
	case old != nil && old.Status == alerts.Resolved && a.Status == alerts.Firing && !a.StartsAt.After(old.StartsAt):
		// A firing older than the resolution we hold (redelivered out of order).
		return false
	}
	g.Alerts[a.Fingerprint] = a
	g.Changed = true
	return true
}

// notificationID is the id of g's n-th notification to receiver: the Nats-Msg-Id
// of its NOTIFY message and the webhook-id receivers see, the same on every retry.
func notificationID(g *Group, receiver string) string {
	return "msg_" + g.Key + "_" + strconv.FormatUint(g.Flushes, 10) + "_" + receiver
}
