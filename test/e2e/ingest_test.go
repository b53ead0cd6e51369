package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/test/oracle"
)

// ingestConfig maps two producers that do not send CloudEvents: a code host's
// event archive relayed as newline-delimited JSON, and sensors posting arrays of
// readings with Unix-millisecond times; readings get a typed table, from a schema
// in the user's directory.
const ingestConfig = `
typed_tables:
  types: [reading]
ingest:
  schemas: %s
  mappings:
    - name: archive
      subjects: events.archive.>
      envelope: raw
      batch: ndjson
      id: {field: id}
      type: {field: type}
      source: {value: archive}
      subject: {field: repo.name, default: ""}
      time: {field: created_at}
    - name: sensors
      subjects: events.sensors.*
      envelope: raw
      batch: array
      id: {field: reading_id}
      source: {token: 3}
      type: {value: reading}
      time: {field: ts, format: unix_ms}
`

// readingSchema is the user's schema of a sensor reading's data.
const readingSchema = `{
  "type": "object",
  "required": ["reading_id", "ts", "celsius"],
  "properties": {
    "reading_id": {"type": "string"},
    "ts": {"type": ["integer", "string"]},
    "celsius": {"type": "number"},
    "probe": {"type": "object", "properties": {"serial": {"type": "string"}, "depth_cm": {"type": "array", "items": {"type": "integer"}}}}
  }
}`

// rawCorpus is what TestRawIngest publishes and what must land.
type rawCorpus struct {
	msgs []*nats.Msg
	// events: "source/id" of each unique valid event, with its event time.
	events map[string]time.Time
	// dead: the payload of each expected dead letter and what its reason says;
	// deadLetters counts them (a batch published twice has its bad elements
	// dead-lettered twice: invalid input has no key to know it by).
	dead        map[string]string
	deadLetters int
	// readings and celsius: the unique valid readings and the sum of their values.
	readings int
	celsius  float64
}

func newRawCorpus(seed uint64) *rawCorpus {
	rng := rand.New(rand.NewPCG(seed, 1))
	c := &rawCorpus{events: map[string]time.Time{}, dead: map[string]string{}}
	base := time.Date(2019, 3, 1, 8, 0, 0, 0, time.UTC)
	types := []string{"PushEvent", "IssuesEvent", "WatchEvent", "PullRequestEvent"}
	id := 5_000_000
	var batches [][]byte
	for b := range 60 {
		var lines []string
		for i := range 25 {
			id++
			at := base.Add(time.Duration(id-5_000_000) * 37 * time.Second)
			ev := map[string]any{
				"id": fmt.Sprint(id), "type": types[rng.IntN(len(types))], "public": true,
				"actor":      map[string]any{"id": 100 + rng.IntN(50), "login": fmt.Sprintf("user%d", rng.IntN(50))},
				"repo":       map[string]any{"id": rng.IntN(1000), "name": fmt.Sprintf("org%d/repo%d", rng.IntN(9), rng.IntN(30))},
				"payload":    map[string]any{"size": 2, "commits": []map[string]any{{"sha": fmt.Sprintf("%x", rng.Uint64())}, {"sha": fmt.Sprintf("%x", rng.Uint64())}}},
				"created_at": at.Format(time.RFC3339),
			}
			switch {
			case i == 7 && b%5 == 0: // no time: the element goes to the DLQ alone
				delete(ev, "created_at")
				line, _ := json.Marshal(ev)
				c.dead[string(line)] = `mapping "archive": time: field created_at is missing or empty`
				lines = append(lines, string(line))
				continue
			case i == 11 && b%7 == 0: // a broken line
				line := fmt.Sprintf(`{"id":"%d","type":`, id)
				c.dead[line] = `mapping "archive": payload is not valid JSON`
				lines = append(lines, line)
				continue
			}
			line, _ := json.Marshal(ev)
			lines = append(lines, string(line))
			c.events["archive/"+fmt.Sprint(id)] = at
		}
		payload := []byte(strings.Join(lines, "\n") + "\n")
		batches = append(batches, payload)
		c.msgs = append(c.msgs, &nats.Msg{Subject: "events.archive.raw", Data: payload})
	}
	// A relay retrying: a few batches come twice, and one event alone again.
	for _, b := range []int{3, 17, 42} {
		c.msgs = append(c.msgs, &nats.Msg{Subject: "events.archive.raw", Data: batches[b]})
		c.deadLetters += strings.Count(string(batches[b]), `"type":`+"\n") // its broken line, if any
		if b%5 == 0 {
			c.deadLetters++ // its element without a time
		}
	}
	first := strings.SplitN(string(batches[0]), "\n", 2)[0]
	c.msgs = append(c.msgs, &nats.Msg{Subject: "events.archive.raw", Data: []byte(first)})

	reading := 0
	for b := range 40 {
		plant := fmt.Sprintf("plant%d", b%4)
		var elems []string
		for i := range 10 {
			reading++
			ts := int64(1_700_000_000_000 + reading*1500)
			if i == 4 && b%3 == 0 { // a time that is no number
				el := fmt.Sprintf(`{"reading_id":"r%d","ts":"soon","celsius":21.5}`, reading)
				c.dead[el] = `mapping "sensors": time: field ts "soon" is not a number`
				elems = append(elems, el)
				continue
			}
			celsius := float64(150+rng.IntN(100)) / 10
			elems = append(elems, fmt.Sprintf(`{"reading_id":"r%d","ts":%d,"celsius":%.1f,"probe":{"serial":"p-%d","depth_cm":[10,20]}}`,
				reading, ts, celsius, b))
			c.readings++
			c.celsius += celsius
			c.events[plant+"/r"+fmt.Sprint(reading)] = time.UnixMilli(ts).UTC()
		}
		c.msgs = append(c.msgs, &nats.Msg{Subject: "events.sensors." + plant, Data: []byte("[" + strings.Join(elems, ",") + "]")})
	}
	// Whole messages that cannot be read: an empty batch, and a CloudEvent whose
	// nested member is not a valid extension attribute.
	c.msgs = append(c.msgs, &nats.Msg{Subject: "events.sensors.plant0", Data: []byte(`[]`)})
	c.dead[`[]`] = "batch payload holds no events"
	nested := `{"id":"ce-1","source":"shop","type":"order.placed","customer":{"id":7}}`
	c.msgs = append(c.msgs, &nats.Msg{Subject: "events.shop.order", Data: []byte(nested)})
	c.dead[nested] = `member "customer" is not a valid CloudEvents extension attribute: it is an object`
	c.deadLetters += len(c.dead)
	rng.Shuffle(len(c.msgs), func(i, j int) { c.msgs[i], c.msgs[j] = c.msgs[j], c.msgs[i] })
	return c
}

// TestRawIngest publishes JSON that is not CloudEvents, as producers send it (nested
// objects, arrays of readings, newline-delimited batches, repeats, bad elements)
// through both compositions: every unique valid event lands once with its mapped
// attributes and event time, each bad element or message is in dead_letters once
// with a reason naming the field and the mapping, and nothing else lands.
func TestRawIngest(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "reading.json"), []byte(readingSchema), 0o644); err != nil {
				t.Fatal(err)
			}
			p := newPipeline(t, fmt.Sprintf(ingestConfig, dir), nil)
			p.split = mode.split
			p.start()
			rawIngest(t, p)
		})
	}
}

func rawIngest(t *testing.T, p *pipeline) {
	c := newRawCorpus(7)
	for _, m := range c.msgs {
		if err := p.nc.PublishMsg(m); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	err := oracle.WaitFor(ctx, 2*time.Minute, func() error {
		n, err := oracle.ReadCounts(ctx, p.ch)
		if err != nil {
			return err
		}
		if n.Events < uint64(len(c.events)) || n.DeadLetters < uint64(c.deadLetters) {
			return fmt.Errorf("events %d/%d, dead letters %d/%d", n.Events, len(c.events), n.DeadLetters, c.deadLetters)
		}
		return p.idle(ctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	n, err := oracle.ReadCounts(ctx, p.ch)
	if err != nil {
		t.Fatal(err)
	}
	if n.Events != uint64(len(c.events)) || n.UniqueKeys != n.Events || n.DeadLetters != uint64(c.deadLetters) {
		t.Fatalf("tables %+v, want %d unique events once and %d dead letters", n, len(c.events), c.deadLetters)
	}
	rows, err := p.ch.Query(ctx, "SELECT source, id, type, subject, toUnixTimestamp(event_time), event_time_ms, data FROM events")
	if err != nil {
		t.Fatal(err)
	}
	seen := 0
	for rows.Next() {
		var (
			source, id, typ, subject, data string
			sec                            uint32
			ms                             uint16
		)
		if err := rows.Scan(&source, &id, &typ, &subject, &sec, &ms, &data); err != nil {
			t.Fatal(err)
		}
		want, ok := c.events[source+"/"+id]
		if !ok {
			t.Errorf("unexpected event %s/%s", source, id)
			continue
		}
		seen++
		if got := time.Unix(int64(sec), int64(ms)*1e6).UTC(); !got.Equal(want) {
			t.Errorf("%s/%s: event_time %s, want %s", source, id, got, want)
		}
		var obj map[string]any
		if err := json.Unmarshal([]byte(data), &obj); err != nil {
			t.Errorf("%s/%s: data is not the payload: %v", source, id, err)
			continue
		}
		switch source {
		case "archive":
			repo, _ := obj["repo"].(map[string]any)
			if obj["id"] != id || obj["type"] != typ || repo["name"] != subject || obj["actor"] == nil {
				t.Errorf("%s/%s: attributes %s %q do not match data %s", source, id, typ, subject, data)
			}
		default:
			if obj["reading_id"] != id || typ != "reading" || obj["probe"] == nil {
				t.Errorf("%s/%s: attributes do not match data %s", source, id, data)
			}
		}
	}
	rows.Close()
	if seen != len(c.events) {
		t.Errorf("read %d expected events, want %d", seen, len(c.events))
	}
	// The typed table: each reading once, its columns typed, summed with plain SQL.
	err = oracle.WaitFor(ctx, time.Minute, func() error {
		var n, keys, depths uint64
		var sum float64
		if err := p.ch.QueryRow(ctx, "SELECT count(), uniqExact(event_key), sum(celsius), sum(length(probe_depth_cm)) FROM reading").Scan(&n, &keys, &sum, &depths); err != nil {
			return err
		}
		if n != uint64(c.readings) || keys != n || math.Abs(sum-c.celsius) > 1e-6 || depths != 2*n {
			return fmt.Errorf("typed table reading: %d rows, %d keys, sum(celsius) %v, %d depths; want %d readings once, sum %v", n, keys, sum, depths, c.readings, c.celsius)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	dl, err := p.ch.Query(ctx, "SELECT payload, reason FROM dead_letters")
	if err != nil {
		t.Fatal(err)
	}
	defer dl.Close()
	for dl.Next() {
		var payload, reason string
		if err := dl.Scan(&payload, &reason); err != nil {
			t.Fatal(err)
		}
		want, ok := c.dead[payload]
		if !ok {
			t.Errorf("unexpected dead letter %q: %s", payload, reason)
			continue
		}
		if !strings.Contains(reason, want) {
			t.Errorf("dead letter %q: reason %q, want it to say %q", payload, reason, want)
		}
	}
}
