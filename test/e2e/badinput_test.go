package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/services/kit/natsserver"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/test/oracle"
)

// badCase is one bad input and what its dead letter's reason must say.
type badCase struct {
	name   string
	header nats.Header
	data   []byte
	reason string
}

// badCorpus is test/testdata/bad plus the cases too large to keep as files.
func badCorpus(t *testing.T) []badCase {
	t.Helper()
	reasons := map[string]string{
		"truncated.json":                  "not valid JSON",
		"invalid-utf8.json":               "not valid UTF-8 at byte",
		"wrong-type-id.json":              `attribute "id" must be a string, got a number`,
		"wrong-type-source.json":          `attribute "source" must be a string, got an object`,
		"wrong-type-type.json":            `attribute "type" must be a string, got an array`,
		"wrong-type-specversion.json":     `attribute "specversion" must be a string, got a number`,
		"wrong-type-time.json":            `attribute "time" must be a string, got a boolean`,
		"wrong-type-subject.json":         `attribute "subject" must be a string, got a number`,
		"wrong-type-datacontenttype.json": `attribute "datacontenttype" must be a string, got a boolean`,
		"wrong-type-dataschema.json":      `attribute "dataschema" must be a string, got an object`,
		"wrong-type-data_base64.json":     `attribute "data_base64" must be a string, got a number`,
		"nan.json":                        "not valid JSON",
		"infinity.json":                   "not valid JSON",
		"negative-infinity.json":          "not valid JSON",
		"duplicate-keys.json":             `attribute "id" appears twice`,
		"integer-beyond-2-64.json":        `attribute "id" must be a string, got a number`,
		"time-before-1970.json":           "outside the range sluice stores",
		"time-after-2106.json":            "outside the range sluice stores",
		"empty.json":                      "payload is empty",
		"binary-garbage.bin":              "not valid UTF-8",
		"contradicting-headers.json":      `header ce-id "h2" contradicts the body's "id" "h1"`,
	}
	dir := filepath.Join("..", "testdata", "bad")
	files, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var cases []badCase
	for _, f := range files {
		reason, ok := reasons[f.Name()]
		if !ok {
			t.Fatalf("testdata/bad/%s has no expected reason in badCorpus", f.Name())
		}
		data, err := os.ReadFile(filepath.Join(dir, f.Name()))
		if err != nil {
			t.Fatal(err)
		}
		c := badCase{name: f.Name(), data: data, reason: reason}
		if f.Name() == "contradicting-headers.json" {
			c.header = nats.Header{"Content-Type": {"application/cloudevents+json"}, "ce-id": {"h2"}}
		}
		cases = append(cases, c)
	}
	if len(cases) != len(reasons) {
		t.Fatalf("%d files for %d expected reasons", len(cases), len(reasons))
	}
	return append(cases,
		badCase{name: "nesting depth 10,000", data: []byte(`{"id":"deep","data":` + strings.Repeat("[", 10_000) + strings.Repeat("]", 10_000) + `}`), reason: "exceeded max depth"},
		badCase{name: "a 1 MiB string", data: []byte(`{"id":"` + strings.Repeat("x", 1<<20) + `"}`), reason: `attribute "id" is 1048576 bytes long`},
	)
}

// TestBadInput publishes every case of the bad-input corpus between good events: no
// stage stops, each bad input is in dead_letters once with a reason that names the
// problem, and every good event lands. A payload over the server's max_payload is
// refused to the producer by the server and never acknowledged.
func TestBadInput(t *testing.T) {
	for _, mode := range modes {
		t.Run(mode.name, func(t *testing.T) {
			ns := natstest.RunWith(t, natsserver.Config{MaxPayload: 4 << 20})
			p := newPipelineOn(t, ns, "", nil)
			p.split = mode.split
			p.start()
			badInput(t, p)
		})
	}
}

func badInput(t *testing.T, p *pipeline) {
	cases := badCorpus(t)
	good := 0
	pubGood := func() {
		t.Helper()
		good++
		if err := p.nc.Publish("events.good.tick", fmt.Appendf(nil, `{"id":"g%d"}`, good)); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range cases {
		pubGood()
		if err := p.nc.PublishMsg(&nats.Msg{Subject: "events.bad.input", Header: c.header, Data: c.data}); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
	}
	pubGood()
	tooBig := make([]byte, 5<<20)
	if err := p.nc.Publish("events.bad.input", tooBig); !errors.Is(err, nats.ErrMaxPayload) {
		t.Fatalf("a payload over max_payload: err = %v, want nats.ErrMaxPayload", err)
	}
	ctx := context.Background()
	err := oracle.WaitFor(ctx, time.Minute, func() error {
		c, err := oracle.ReadCounts(ctx, p.ch)
		if err != nil {
			return err
		}
		if c.Events < uint64(good) || c.DeadLetters < uint64(len(cases)) {
			return fmt.Errorf("events %d/%d, dead letters %d/%d", c.Events, good, c.DeadLetters, len(cases))
		}
		return p.idle(ctx)
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := oracle.ReadCounts(ctx, p.ch)
	if err != nil {
		t.Fatal(err)
	}
	if c.Events != uint64(good) || c.UniqueKeys != uint64(good) || c.DeadLetters != uint64(len(cases)) {
		t.Fatalf("tables = %+v, want %d events and %d dead letters", c, good, len(cases))
	}
	rows, err := p.ch.Query(ctx, "SELECT payload, reason FROM dead_letters")
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	reasons := map[string]string{}
	for rows.Next() {
		var payload, reason string
		if err := rows.Scan(&payload, &reason); err != nil {
			t.Fatal(err)
		}
		reasons[payload] = reason
	}
	for _, c := range cases {
		reason, ok := reasons[string(c.data)]
		if !ok {
			t.Errorf("%s: not in dead_letters", c.name)
			continue
		}
		if !strings.Contains(reason, c.reason) {
			t.Errorf("%s: reason %q, want it to say %q", c.name, reason, c.reason)
		}
	}
}
