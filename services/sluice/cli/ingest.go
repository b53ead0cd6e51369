package cli

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	goio "io"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/dedup/window"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/streams"
)

// headerFlags collects repeated --header Name:value flags.
type headerFlags map[string][]string

func (h headerFlags) String() string { return "" }

func (h headerFlags) Set(v string) error {
	name, value, ok := strings.Cut(v, ":")
	if !ok || strings.TrimSpace(name) == "" {
		return fmt.Errorf("want Name:value, got %q", v)
	}
	name = strings.TrimSpace(name)
	h[name] = append(h[name], strings.TrimSpace(value))
	return nil
}

// readSample reads FILE, or stdin for "-".
func readSample(name string, stdin goio.Reader) ([]byte, error) {
	if name != "-" {
		return os.ReadFile(name)
	}
	if stdin == nil {
		stdin = os.Stdin
	}
	return goio.ReadAll(stdin)
}

// ingestHandler is the ingest and dedup steps of the config at path, offline, with
// a store of its own.
func ingestHandler(path string) (*dedup.Handler, *window.Store, error) {
	f, err := configfile.Load(path)
	if err != nil {
		return nil, nil, err
	}
	store := window.NewStore(0)
	h, err := configHandler(f, store)
	return h, store, err
}

// configHandler is the ingest step of config file f, deciding repeats by store
// (nil: none).
func configHandler(f *configfile.File, store *window.Store) (*dedup.Handler, error) {
	in, err := dedup.LoadIngest(f)
	if err != nil {
		return nil, err
	}
	w, err := dedup.LoadWindowConfig(f)
	if err != nil {
		return nil, err
	}
	return dedup.NewHandler(dedup.HandlerConfig{Window: w, Ingest: in, Store: store})
}

// ingestCheck shows, offline, what sample payloads published to a subject become
// under the ingest and dedup sections of SLUICE_CONFIG: each event (as the stages
// pass it on, with its key), a repeat of an event before it, or the dead letter's
// reason. It exits non-zero when any sample would be dead-lettered.
func ingestCheck(args []string, io IO) error {
	fs := flag.NewFlagSet("ingest check", flag.ContinueOnError)
	var path string
	settings.BindConfig(fs, io.Env, &path)
	subject := fs.String("subject", "", "the subject the samples are published to (events.<source>.<type>)")
	eachLine := fs.Bool("each-line", false, "publish each non-blank line of FILE as a message of its own (default: FILE is one message)")
	header := headerFlags{}
	fs.Var(header, "header", "a NATS header of the messages, Name:value (repeatable)")
	positional, err := parsePositional(fs, args, io)
	if err != nil {
		return err
	}
	if len(positional) != 1 || *subject == "" {
		fmt.Fprintln(io.Stderr, "usage: sluice ingest check FILE --subject SUBJECT [--each-line] [--header Name:value]... [--config SLUICE_CONFIG]  (FILE - reads stdin)")
		return errUsage
	}
	if err := eventsSubject(*subject); err != nil {
		return fmt.Errorf("ingest check: %w", err)
	}
	data, err := readSample(positional[0], io.Stdin)
	if err != nil {
		return err
	}
	h, store, err := ingestHandler(path)
	if err != nil {
		return err
	}
	type sample struct {
		label   string
		payload []byte
	}
	msgs := []sample{{"message", data}}
	if *eachLine {
		msgs = nil
		for i, line := range bytes.Split(data, []byte("\n")) {
			if len(bytes.TrimSpace(line)) > 0 {
				msgs = append(msgs, sample{fmt.Sprintf("line %d", i+1), line})
			}
		}
	}
	if len(msgs) == 0 {
		return fmt.Errorf("ingest check: %s has no line that is not blank", positional[0])
	}
	now := time.Now().UTC()
	first := map[window.Key]string{}
	dead, n := 0, 0
	for _, m := range msgs {
		h.DecideAll(events.Message{Subject: *subject, Header: header, Data: m.payload, Received: now}, func(d dedup.Decision) {
			n++
			at := m.label
			if d.Element != nil {
				at = fmt.Sprintf("%s, element %d", m.label, d.Element.Index)
			}
			switch {
			case d.Invalid != nil:
				dead++
				fmt.Fprintf(io.Stdout, "%s: dead letter: %v\n", at, d.Invalid)
			case d.Duplicate:
				fmt.Fprintf(io.Stdout, "%s: repeat of %s (key %s), dropped\n", at, first[d.Key], d.Event.Key)
			default:
				store.Add(d.Key, d.Expires, uint64(n), d.Now)
				first[d.Key] = at
				b, err := d.Event.Marshal()
				if err != nil {
					dead++
					fmt.Fprintf(io.Stdout, "%s: dead letter: cannot encode event: %v\n", at, err)
					return
				}
				var pretty bytes.Buffer
				_ = json.Indent(&pretty, b, "  ", "  ")
				fmt.Fprintf(io.Stdout, "%s: event\n  %s\n", at, pretty.String())
			}
		})
	}
	if dead > 0 {
		return fmt.Errorf("%d of %d would go to the DLQ", dead, n)
	}
	return nil
}

// eventsSubject says why subject is not one a producer's event reaches EVENTS by:
// a wildcard or empty token (NATS would store the message under it as it is), or
// a subject EVENTS does not take (a plain publish to it is kept by no stream and
// gets no error).
func eventsSubject(subject string) error {
	if !server.IsValidPublishSubject(subject) {
		return fmt.Errorf("subject %q is not one a message can be published to: no wildcard tokens (* or >), no empty tokens or spaces", subject)
	}
	t, err := streams.Load()
	if err != nil {
		return err
	}
	cfg, ok := t.Stream(streams.Events)
	if !ok {
		return fmt.Errorf("no stream %s in streams/", streams.Events)
	}
	for _, filter := range cfg.Subjects {
		if server.SubjectMatchesFilter(subject, filter) {
			return nil
		}
	}
	return fmt.Errorf("subject %s is not one %s takes (%s): a message published to it is kept by no stream", subject, streams.Events, strings.Join(cfg.Subjects, ", "))
}
