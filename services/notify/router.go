package notify

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"slices"
	"time"

	"github.com/sluicehq/sluice/schemas/alerts"
)

// Router sorts alerts into the groups of their routes and decides, by the groups'
// timers, silences and inhibitions, what each receiver is sent. It is the pure
// part of the notify stage: no I/O, time passed in. Not safe for concurrent use.
type Router struct {
	routes  []*Route
	byID    map[string]*Route
	inhibit []InhibitRule
	groups  map[string]*Group
}

// NewRouter returns a router over routes and inhibit rules, holding groups (as
// restored from the bucket).
func NewRouter(routes []*Route, inhibit []InhibitRule, groups []*Group) *Router {
	r := &Router{routes: routes, byID: map[string]*Route{}, inhibit: inhibit, groups: map[string]*Group{}}
	for _, rt := range routes {
		r.byID[rt.id] = rt
	}
	for _, g := range groups {
		r.groups[g.Key] = g
	}
	return r
}

// Add routes a and returns the groups it changed (to save) and whether it matched
// any route.
func (r *Router) Add(a *alerts.Alert, now time.Time) (changed []*Group, routed bool) {
	for _, rt := range r.routes {
		if !matchAll(rt.matchers, a.Labels) {
			continue
		}
		routed = true
		labels := rt.groupLabels(a.Labels)
		key := rt.groupKey(labels)
		g := r.groups[key]
		if g == nil {
			if a.Status == alerts.Resolved {
				if !rt.Continue {
					break
				}
				continue
			}
			g = &Group{Key: key, Route: rt.id, Labels: labels, Alerts: map[string]*alerts.Alert{}, Created: now}
			r.groups[key] = g
		}
		if g.add(a) {
			changed = append(changed, g)
		}
		if !rt.Continue {
			break
		}
	}
	return changed, routed
}

// Firing is how many distinct alerts (by fingerprint) the groups hold firing.
func (r *Router) Firing() int {
	seen := map[string]struct{}{}
	for _, g := range r.groups {
		for _, a := range g.Alerts {
			if a.Status == alerts.Firing {
				seen[a.Fingerprint] = struct{}{}
			}
		}
	}
	return len(seen)
}

// Outgoing is one notification to send.
type Outgoing struct {
	Receiver     *Receiver
	ID           string
	Notification *Notification
}

// Flush returns the notifications due at now, given the active silences, and
// the groups to save (deleted: those left empty, to remove).
func (r *Router) Flush(now time.Time, silences []Silence) (out []Outgoing, save, deleted []*Group) {
	var firing []*alerts.Alert
	if len(r.inhibit) > 0 {
		for _, g := range r.groups {
			for _, a := range g.Alerts {
				if a.Status == alerts.Firing {
					firing = append(firing, a)
				}
			}
		}
	}
	for _, key := range slices.Sorted(maps.Keys(r.groups)) {
		g := r.groups[key]
		rt := r.byID[g.Route]
		if rt == nil {
			// The route is gone (config changed): the group goes with it.
			delete(r.groups, key)
			deleted = append(deleted, g)
			continue
		}
		due, repeat := g.due(rt, now)
		if !due {
			continue
		}
		sent, muted := false, false
		for _, rc := range rt.receivers {
			n, m := r.notification(g, rc, now, silences, firing)
			muted = muted || m
			if n == nil {
				continue
			}
			digest := digestOf(n.Alerts)
			if !repeat && g.Sent[rc.Name] == digest {
				continue
			}
			if g.Sent == nil {
				g.Sent = map[string]string{}
			}
			g.Sent[rc.Name] = digest
			out = append(out, Outgoing{Receiver: rc, ID: notificationID(g, rc.Name), Notification: n})
			sent = true
		}
		if sent {
			g.Flushes++
		}
		// A group with muted alerts is looked at again each group_interval, so they are
		// sent once their silence or inhibition ends.
		g.LastFlush, g.Changed = now, muted
		for fp, a := range g.Alerts {
			if a.Status == alerts.Resolved {
				delete(g.Alerts, fp)
			}
		}
		if len(g.Alerts) == 0 {
			delete(r.groups, key)
			deleted = append(deleted, g)
			continue
		}
		save = append(save, g)
	}
	return out, save, deleted
}

// notification is what rc is sent of g, or nil: firing alerts not muted, resolved
// ones if rc wants them, replayed ones only if rc asked for them. muted reports
// whether a silence or an inhibition held a firing alert back.
func (r *Router) notification(g *Group, rc *Receiver, now time.Time, silences []Silence, firing []*alerts.Alert) (n *Notification, muted bool) {
	var list []*alerts.Alert
	for _, a := range g.Alerts {
		if a.Replay && !rc.SendReplayed {
			continue
		}
		if a.Status == alerts.Resolved {
			if rc.SendResolved {
				list = append(list, a)
			}
			continue
		}
		if silenced(silences, a.Labels, now) || r.inhibited(a, firing) {
			muted = true
			continue
		}
		list = append(list, a)
	}
	if len(list) == 0 {
		return nil, muted
	}
	slices.SortFunc(list, func(a, b *alerts.Alert) int {
		return cmp.Or(a.StartsAt.Compare(b.StartsAt), cmp.Compare(a.Fingerprint, b.Fingerprint))
	})
	n = &Notification{Receiver: rc.Name, GroupKey: g.Key, GroupLabels: g.Labels, Alerts: list}
	if rc.MaxAlerts > 0 && len(list) > rc.MaxAlerts {
		n.Alerts, n.Truncated = list[:rc.MaxAlerts], len(list)-rc.MaxAlerts
	}
	return n, muted
}

// inhibited reports whether a firing alert matching an inhibit rule's source, with
// the same equal labels, mutes a.
func (r *Router) inhibited(a *alerts.Alert, firing []*alerts.Alert) bool {
	for _, ir := range r.inhibit {
		if !matchAll(ir.target, a.Labels) {
			continue
		}
		for _, s := range firing {
			if s.Fingerprint == a.Fingerprint || !matchAll(ir.source, s.Labels) {
				continue
			}
			same := true
			for _, l := range ir.equal {
				if s.Labels[l] != a.Labels[l] {
					same = false
					break
				}
			}
			if same {
				return true
			}
		}
	}
	return false
}

// Groups returns the groups held.
func (r *Router) Groups() []*Group { return slices.Collect(maps.Values(r.groups)) }

// digestOf summarises what a notification says: which alerts, in which state.
func digestOf(list []*alerts.Alert) string {
	h := sha256.New()
	for _, a := range list {
		h.Write([]byte(a.Fingerprint))
		h.Write([]byte(a.Status))
		h.Write([]byte(a.StartsAt.String()))
	}
	return hex.EncodeToString(h.Sum(nil)[:8])
}
