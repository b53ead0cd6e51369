package partition_test

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition"
)

// claimed starts a nats-server, a KV bucket and an object store named bucket, and
// a group of one partition whose claim worker "a" holds until the test ends.
func claimed(t testing.TB, bucket string) (jetstream.KeyValue, jetstream.ObjectStore, *partition.Claim) {
	t.Helper()
	ctx := context.Background()
	_, js := natstest.Run(t).Connect(t)
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket})
	if err != nil {
		t.Fatal(err)
	}
	store, err := js.CreateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: bucket, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	claims := make(chan *partition.Claim, 1)
	gctx, cancel := context.WithCancel(ctx)
	g := &partition.Group{KV: kv, Partitions: 1, Worker: "a", TTL: 3 * time.Second, Log: slog.New(slog.DiscardHandler)}
	done := make(chan error, 1)
	go func() {
		done <- g.Run(gctx, func(ctx context.Context, c *partition.Claim) {
			claims <- c
			<-ctx.Done()
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case c := <-claims:
		return kv, store, c
	case <-time.After(20 * time.Second):
		t.Fatal("the partition was never claimed")
		return nil, nil, nil
	}
}

// objectNames lists store's objects, sorted.
func objectNames(t testing.TB, store jetstream.ObjectStore) []string {
	t.Helper()
	infos, err := store.List(context.Background())
	if errors.Is(err, jetstream.ErrNoObjectsFound) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, info := range infos {
		names = append(names, info.Name)
	}
	slices.Sort(names)
	return names
}
