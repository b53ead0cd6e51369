// Package streams holds sluice's JetStream topology as files in the JetStream API's
// JSON (streams/*.stream.json and streams/<STREAM>.<name>.consumer.json, loadable by
// `nats stream add --config` and `nats consumer add <STREAM> --config`) and applies
// them idempotently.
package streams

import (
	"bytes"
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"slices"
	"sort"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
)

//go:embed *.json
var files embed.FS

// Names of the streams and durable consumers in the files.
const (
	Events   = "EVENTS"
	Unique   = "UNIQUE"
	Enriched = "ENRICHED"
	Alerts   = "ALERTS"
	DLQ      = "DLQ"
	Notify   = "NOTIFY"
	// Partitions is EVENTS divided by key, for pipeline workers sharing the work.
	Partitions = "PARTITIONS"
	// Rules is the rule input of partitioned pipeline workers, for the one alert
	// runner that evaluates every partition's.
	Rules = "RULES"
)

// Stream is one stream file.
type Stream struct {
	File   string
	Config jetstream.StreamConfig
}

// Consumer is one consumer file; Stream comes from the file name.
type Consumer struct {
	File   string
	Stream string
	Config jetstream.ConsumerConfig
}

// Topology is every stream and consumer sluice uses.
type Topology struct {
	Streams   []Stream
	Consumers []Consumer
}

// Load parses the embedded files.
func Load() (*Topology, error) { return LoadFS(files) }

// LoadFS parses *.stream.json and *.consumer.json files at the top of fsys. Unknown
// fields are errors, so a typo does not silently fall back to a default.
func LoadFS(fsys fs.FS) (*Topology, error) {
	names, err := fs.Glob(fsys, "*.json")
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	t := &Topology{}
	var errs []error
	for _, name := range names {
		b, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, err
		}
		switch {
		case strings.HasSuffix(name, ".stream.json"):
			var cfg jetstream.StreamConfig
			if err := decodeStrict(b, &cfg); err != nil {
				errs = append(errs, fmt.Errorf("streams/%s: %w", name, err))
				continue
			}
			t.Streams = append(t.Streams, Stream{File: name, Config: cfg})
		case strings.HasSuffix(name, ".consumer.json"):
			stream, _, ok := strings.Cut(name, ".")
			if !ok {
				errs = append(errs, fmt.Errorf("streams/%s: name consumer files <STREAM>.<name>.consumer.json", name))
				continue
			}
			var cfg jetstream.ConsumerConfig
			if err := decodeStrict(b, &cfg); err != nil {
				errs = append(errs, fmt.Errorf("streams/%s: %w", name, err))
				continue
			}
			t.Consumers = append(t.Consumers, Consumer{File: name, Stream: stream, Config: cfg})
		default:
			errs = append(errs, fmt.Errorf("streams/%s: name files *.stream.json or <STREAM>.<name>.consumer.json", name))
		}
	}
	return t, errors.Join(errs...)
}

func decodeStrict(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	return nil
}

// Stream returns the stream config by name.
func (t *Topology) Stream(name string) (*jetstream.StreamConfig, bool) {
	for i := range t.Streams {
		if t.Streams[i].Config.Name == name {
			return &t.Streams[i].Config, true
		}
	}
	return nil, false
}

// Consumer returns the consumer config by stream and durable name.
func (t *Topology) Consumer(stream, name string) (*jetstream.ConsumerConfig, bool) {
	for i := range t.Consumers {
		if t.Consumers[i].Stream == stream && t.Consumers[i].Config.Durable == name {
			return &t.Consumers[i].Config, true
		}
	}
	return nil, false
}

// WithReplicas returns t with every stream kept in n copies (the consumers follow
// their stream's). With n 0, Apply leaves each existing stream's copies as they are
// and creates the missing ones with one.
func (t *Topology) WithReplicas(n int) *Topology {
	out := &Topology{Streams: slices.Clone(t.Streams), Consumers: t.Consumers}
	for i := range out.Streams {
		out.Streams[i].Config.Replicas = max(n, 0)
	}
	return out
}

// Apply creates every stream and consumer, or updates it when it exists (asking
// again when a request goes unanswered, see Retry). A change
// JetStream refuses is returned as an error naming the file and, for the fields
// JetStream never lets change, the field.
func (t *Topology) Apply(ctx context.Context, js jetstream.JetStream) error {
	for _, s := range t.Streams {
		replicas, err := checkImmutable(ctx, js, s)
		if err != nil {
			return err
		}
		if s.Config.Replicas == 0 {
			s.Config.Replicas = max(replicas, 1)
		}
		if err := Retry(ctx, func(ctx context.Context) error { _, err := js.CreateOrUpdateStream(ctx, s.Config); return err }); err != nil {
			return fmt.Errorf("streams/%s: apply stream %s: %w", s.File, s.Config.Name, err)
		}
	}
	for _, c := range t.Consumers {
		if err := Retry(ctx, func(ctx context.Context) error {
			_, err := js.CreateOrUpdateConsumer(ctx, c.Stream, c.Config)
			return err
		}); err != nil {
			return fmt.Errorf("streams/%s: apply consumer %s on %s: %w", c.File, c.Config.Durable, c.Stream, err)
		}
	}
	return nil
}

// checkImmutable names the field when the file asks to change one JetStream does not
// allow to change on an existing stream, and returns the existing stream's replicas
// (0 when there is none).
func checkImmutable(ctx context.Context, js jetstream.JetStream, s Stream) (int, error) {
	st, err := OpenStream(ctx, js, s.Config.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("streams/%s: look up stream %s: %w", s.File, s.Config.Name, err)
	}
	have := st.CachedInfo().Config
	want := s.Config
	fields := []struct {
		name       string
		have, want string
	}{
		{"storage", have.Storage.String(), want.Storage.String()},
		{"retention", have.Retention.String(), want.Retention.String()},
	}
	for _, f := range fields {
		if f.have != f.want {
			return 0, fmt.Errorf("streams/%s: field %q: stream %s has %s and JetStream cannot change it to %s; migrate the stream (for example with a mirror) or keep %s",
				s.File, f.name, s.Config.Name, f.have, f.want, f.have)
		}
	}
	return have.Replicas, nil
}
