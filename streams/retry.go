package streams

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// attemptTimeout bounds one JetStream API request of Retry. Requests that change the
// cluster's assets answer within milliseconds when they answer at all.
const attemptTimeout = 5 * time.Second

// attempts is how many times Retry asks at most.
const attempts = 12

// placementPause is how long Retry waits before asking again after a placement
// refused for an offline peer.
const placementPause = time.Second

// jsClusterNoPeers is JetStream's error code for a placement that found too few
// peers; with "peer offline" in its description the peers exist but the meta
// leader has not heard from them yet (a node just started or restarted).
const jsClusterNoPeers jetstream.ErrorCode = 10005

// peerOffline reports whether err is a placement refused only because a peer is
// offline: asked again once the meta leader has heard from it, it succeeds.
func peerOffline(err error) bool {
	var api *jetstream.APIError
	return errors.As(err, &api) && api.ErrorCode == jsClusterNoPeers && strings.Contains(api.Description, "peer offline")
}

// Retry runs request, asking again when it timed out, until it succeeds, fails
// otherwise, ctx is done or it timed out attempts times. On a JetStream cluster,
// requests that create the same stream at once (services starting together each
// applying the topology or creating a bucket) can all go unanswered although the
// stream is created (nats-server 2.15.2); asked again, they find it and succeed.
// A placement refused for an offline peer (a cluster just started, or a node
// restarting) is asked again after a pause as well. Each attempt has
// attemptTimeout.
func Retry(ctx context.Context, request func(ctx context.Context) error) error {
	return Again(ctx, func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
		defer cancel()
		return request(ctx)
	})
}

// Again is Retry without a time limit on an attempt: for a request whose context
// must outlive it (a KV watch ends with the context it was made with), or that
// reads for longer than one request's timeout; each JetStream request in it is
// bounded by the client's own timeout.
func Again(ctx context.Context, request func(ctx context.Context) error) error {
	var err error
	for range attempts {
		err = request(ctx)
		if err == nil || ctx.Err() != nil {
			return err
		}
		if peerOffline(err) {
			select {
			case <-ctx.Done():
				return err
			case <-time.After(placementPause):
			}
			continue
		}
		if !TimedOut(err) {
			return err
		}
	}
	return fmt.Errorf("no success in %d attempts: %w", attempts, err)
}

// TimedOut reports whether err is a request to NATS that went unanswered in time:
// asked again once the server answers (it restarted, or a cluster elects its
// leaders), it may succeed.
func TimedOut(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout)
}

// Ensure is Retry for a request that returns a value, such as opening a bucket.
func Ensure[T any](ctx context.Context, request func(ctx context.Context) (T, error)) (T, error) {
	var v T
	err := Retry(ctx, func(ctx context.Context) error {
		var err error
		v, err = request(ctx)
		return err
	})
	return v, err
}

// OpenStream looks stream name up, asked again while JetStream does not answer in
// time (Retry).
func OpenStream(ctx context.Context, js jetstream.JetStream, name string) (jetstream.Stream, error) {
	return Ensure(ctx, func(ctx context.Context) (jetstream.Stream, error) { return js.Stream(ctx, name) })
}

// OpenConsumer looks the durable consumer name of stream up, likewise.
func OpenConsumer(ctx context.Context, js jetstream.JetStream, stream, name string) (jetstream.Consumer, error) {
	return Ensure(ctx, func(ctx context.Context) (jetstream.Consumer, error) { return js.Consumer(ctx, stream, name) })
}

// OrderedConsumer makes an ordered consumer of stream, likewise (the request's
// context is not kept by the consumer).
func OrderedConsumer(ctx context.Context, js jetstream.JetStream, stream string, cfg jetstream.OrderedConsumerConfig) (jetstream.Consumer, error) {
	return Ensure(ctx, func(ctx context.Context) (jetstream.Consumer, error) { return js.OrderedConsumer(ctx, stream, cfg) })
}

// KeyValue opens the bucket of cfg, creating it when missing. With cfg.Replicas 0
// an existing bucket is left as it is (a cluster's operator may have given it more
// copies); with 1 or more the bucket is created or updated to that many.
func KeyValue(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	return Ensure(ctx, func(ctx context.Context) (jetstream.KeyValue, error) {
		if cfg.Replicas == 0 {
			kv, err := js.KeyValue(ctx, cfg.Bucket)
			if !errors.Is(err, jetstream.ErrBucketNotFound) {
				return kv, err
			}
		}
		return js.CreateOrUpdateKeyValue(ctx, cfg)
	})
}

// OpenKeyValue opens the bucket as it is, creating it with cfg only when missing: for
// buckets that are the user's (lookup tables), whose settings sluice must not reset.
func OpenKeyValue(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	return Ensure(ctx, func(ctx context.Context) (jetstream.KeyValue, error) {
		kv, err := js.KeyValue(ctx, cfg.Bucket)
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			kv, err = js.CreateKeyValue(ctx, cfg)
			if errors.Is(err, jetstream.ErrBucketExists) { // created by another process first
				kv, err = js.KeyValue(ctx, cfg.Bucket)
			}
		}
		return kv, err
	})
}

// ObjectStore is KeyValue for an object store.
func ObjectStore(ctx context.Context, js jetstream.JetStream, cfg jetstream.ObjectStoreConfig) (jetstream.ObjectStore, error) {
	return Ensure(ctx, func(ctx context.Context) (jetstream.ObjectStore, error) {
		if cfg.Replicas == 0 {
			store, err := js.ObjectStore(ctx, cfg.Bucket)
			if !errors.Is(err, jetstream.ErrBucketNotFound) {
				return store, err
			}
		}
		return js.CreateOrUpdateObjectStore(ctx, cfg)
	})
}
