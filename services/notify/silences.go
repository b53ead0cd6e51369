package notify

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/kvfollow"
	"github.com/sluicehq/sluice/streams"
)

// SilenceBucket is the KV bucket holding silences, one per key, as JSON:
//
//	nats kv put sluice_silences night '{"matchers":["team=shop"],"ends_at":"2026-11-22T08:00:00Z","comment":"maintenance"}'
const SilenceBucket = "sluice_silences"

// Silence mutes the alerts its matchers all match, from StartsAt (default: when
// it was made) until EndsAt.
type Silence struct {
	ID        string    `json:"id,omitempty"`
	Matchers  []string  `json:"matchers"`
	StartsAt  time.Time `json:"starts_at,omitzero"`
	EndsAt    time.Time `json:"ends_at"`
	CreatedBy string    `json:"created_by,omitempty"`
	Comment   string    `json:"comment,omitempty"`

	matchers []Matcher
}

// ParseSilence decodes and checks a silence stored under id.
func ParseSilence(id string, b []byte) (Silence, error) {
	var s Silence
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("silence %s: %w", id, err)
	}
	s.ID = id
	return s, s.check()
}

func (s *Silence) check() error {
	name := "silence"
	if s.ID != "" { // empty for one being added
		name += " " + s.ID
	}
	if len(s.Matchers) == 0 {
		return fmt.Errorf("%s: matchers is required (a silence of everything is a mistake)", name)
	}
	ms, err := ParseMatchers(s.Matchers)
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	// As Alertmanager: one matcher at least must need a label to be there
	// (team= alone, a shell variable left empty, would mute every alert without a
	// team label; team=~".*" every alert).
	if matchAll(ms, nil) {
		return fmt.Errorf("%s: %s: every matcher matches an alert without the label; at least one must name a value (a silence of everything is a mistake)", name, strings.Join(s.Matchers, ", "))
	}
	if s.EndsAt.IsZero() {
		return fmt.Errorf("%s: ends_at is required", name)
	}
	s.matchers = ms
	return nil
}

// Active reports whether s mutes at now.
func (s *Silence) Active(now time.Time) bool {
	return !now.Before(s.StartsAt) && now.Before(s.EndsAt)
}

func silenced(silences []Silence, labels map[string]string, now time.Time) bool {
	for i := range silences {
		if silences[i].Active(now) && matchAll(silences[i].matchers, labels) {
			return true
		}
	}
	return false
}

// Silences are the silences of the bucket, kept current by a watch.
type Silences struct {
	mu   sync.Mutex
	byID map[string]Silence
}

// SilenceStore opens the silence bucket, creating it when missing; replicas as for
// streams.KeyValue (the CLI passes 0: the bucket as it is).
func SilenceStore(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	kv, err := streams.KeyValue(ctx, js, jetstream.KeyValueConfig{
		Bucket: SilenceBucket, Description: "Silences of the notify stage (sluice silence add|list|rm).", Storage: jetstream.FileStorage, Replicas: replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("silences: bucket %s: %w", SilenceBucket, err)
	}
	return kv, nil
}

// WatchSilences keeps the returned Silences current with the bucket until ctx is
// done or stop is called (kvfollow: also when the bucket is deleted and made again);
// it returns once the bucket's current content is loaded. A silence that does not
// parse is logged and ignored.
func WatchSilences(ctx context.Context, kv jetstream.KeyValue, log *slog.Logger) (s *Silences, stop func(), err error) {
	s = &Silences{byID: map[string]Silence{}}
	stop, err = kvfollow.Follow(ctx, kvfollow.Config{KV: kv, Log: log}, func(e jetstream.KeyValueEntry) { s.apply(e, log) })
	if err != nil {
		return nil, nil, fmt.Errorf("silences: %w", err)
	}
	return s, stop, nil
}

func (s *Silences) apply(e jetstream.KeyValueEntry, log *slog.Logger) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e.Operation() != jetstream.KeyValuePut {
		delete(s.byID, e.Key())
		return
	}
	sil, err := ParseSilence(e.Key(), e.Value())
	if err != nil {
		log.Error("silence ignored", "err", err)
		delete(s.byID, e.Key())
		return
	}
	s.byID[e.Key()] = sil
}

// List returns the silences.
func (s *Silences) List() []Silence {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Collect(maps.Values(s.byID))
}

// AddSilence stores s under a new id and returns it.
func AddSilence(ctx context.Context, kv jetstream.KeyValue, s Silence, now time.Time) (string, error) {
	if s.StartsAt.IsZero() {
		s.StartsAt = now
	}
	if err := s.check(); err != nil {
		return "", err
	}
	if !s.EndsAt.After(s.StartsAt) {
		return "", errors.New("silence ends before it starts")
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	s.ID = ""
	body, err := json.Marshal(s)
	if err != nil {
		return "", err
	}
	if _, err := kv.Create(ctx, id, body); err != nil {
		return "", fmt.Errorf("silence: %w", err)
	}
	return id, nil
}

// ListSilences reads every silence in the bucket (those that do not parse are
// returned as errors).
func ListSilences(ctx context.Context, kv jetstream.KeyValue) ([]Silence, error) {
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("silences: %w", err)
	}
	var (
		out  []Silence
		errs []error
	)
	for key := range keys.Keys() {
		e, err := kv.Get(ctx, key)
		if err != nil {
			if errors.Is(err, jetstream.ErrKeyNotFound) {
				continue
			}
			return nil, fmt.Errorf("silence %s: %w", key, err)
		}
		s, err := ParseSilence(key, e.Value())
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b Silence) int { return a.EndsAt.Compare(b.EndsAt) })
	return out, errors.Join(errs...)
}
