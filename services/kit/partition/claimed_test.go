package partition_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/partition/partitiontest"
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
	return kv, store, partitiontest.Claim(t, kv)
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
