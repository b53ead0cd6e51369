// Package partitiontest holds test helpers for code that owns partitions.
package partitiontest

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/partition"
)

// Claim runs a group of one partition in kv whose claim worker "a" holds until the
// test ends, and returns the claim.
func Claim(t testing.TB, kv jetstream.KeyValue) *partition.Claim {
	t.Helper()
	claims := make(chan *partition.Claim, 1)
	ctx, cancel := context.WithCancel(context.Background())
	g := &partition.Group{KV: kv, Partitions: 1, Worker: "a", TTL: 3 * time.Second, Log: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() {
		done <- g.Run(ctx, func(ctx context.Context, c *partition.Claim) {
			claims <- c
			<-ctx.Done()
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case c := <-claims:
		return c
	case <-time.After(20 * time.Second):
		t.Fatal("the partition was never claimed")
		return nil
	}
}
