package jspub

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natstest"
)

// Publish and Settle store every message once (more than maxPending, so Publish
// settles by itself too); publishing the same ids again stores nothing new; and
// PublishedSince finds the ids stored since a time, not those before it.
func TestPublishSettleAndPublishedSince(t *testing.T) {
	_, js := natstest.Run(t).Connect(t)
	ctx := context.Background()
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "OUT", Subjects: []string{"out.>"}, Duplicates: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	msg := func(i int) *nats.Msg {
		m := nats.NewMsg(fmt.Sprintf("out.%d", i%3))
		m.Header.Set(nats.MsgIdHdr, fmt.Sprintf("id-%d", i))
		m.Data = []byte("x")
		return m
	}
	p := New(js, 16, slog.New(slog.NewTextHandler(io.Discard, nil)))
	publish := func(from, to int) {
		t.Helper()
		for i := from; i < to; i++ {
			if err := p.Publish(ctx, msg(i)); err != nil {
				t.Fatal(err)
			}
		}
		if err := p.Settle(ctx); err != nil {
			t.Fatal(err)
		}
		if p.Pending() != 0 {
			t.Fatalf("%d publishes pending after Settle", p.Pending())
		}
	}
	publish(0, 50)
	time.Sleep(10 * time.Millisecond) // the second half is stored after this time
	mid := time.Now()
	publish(50, 100)
	publish(0, 100) // again: the duplicate window drops them
	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Msgs != 100 {
		t.Fatalf("stream holds %d messages, want 100", info.State.Msgs)
	}
	ids, err := PublishedSince(ctx, js, "OUT", mid)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 50 || !ids["id-50"] || !ids["id-99"] || ids["id-49"] {
		t.Fatalf("published since the middle: %d ids (id-50 %v, id-99 %v, id-49 %v), want id-50..id-99", len(ids), ids["id-50"], ids["id-99"], ids["id-49"])
	}
	all, err := PublishedSince(ctx, js, "OUT", time.Unix(0, 0))
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 100 {
		t.Fatalf("published since the start: %d ids, want 100", len(all))
	}
}
