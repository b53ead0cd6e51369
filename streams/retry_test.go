package streams

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

func TestRetry(t *testing.T) {
	ctx := context.Background()
	calls := 0
	err := Retry(ctx, func(ctx context.Context) error {
		if _, ok := ctx.Deadline(); !ok {
			t.Fatal("an attempt without a deadline")
		}
		if calls++; calls < 3 {
			return fmt.Errorf("create stream: %w", context.DeadlineExceeded)
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("unanswered twice, then answered: err %v after %d calls", err, calls)
	}
	refused := errors.New("stream name already in use with a different configuration")
	calls = 0
	if err := Retry(ctx, func(context.Context) error { calls++; return refused }); !errors.Is(err, refused) || calls != 1 {
		t.Fatalf("a refusal is not asked again: err %v after %d calls", err, calls)
	}
	calls = 0
	if err := Retry(ctx, func(context.Context) error { calls++; return context.DeadlineExceeded }); !errors.Is(err, context.DeadlineExceeded) || calls != attempts {
		t.Fatalf("never answered: err %v after %d calls", err, calls)
	}
	offline := &jetstream.APIError{Code: 400, ErrorCode: jsClusterNoPeers, Description: "no suitable peers for placement, peer offline"}
	calls = 0
	if err := Retry(ctx, func(context.Context) error {
		if calls++; calls < 2 {
			return fmt.Errorf("create stream: %w", offline)
		}
		return nil
	}); err != nil || calls != 2 {
		t.Fatalf("placed once the peer is online: err %v after %d calls", err, calls)
	}
	tooFew := &jetstream.APIError{Code: 400, ErrorCode: jsClusterNoPeers, Description: "no suitable peers for placement, insufficient resources"}
	calls = 0
	if err := Retry(ctx, func(context.Context) error { calls++; return tooFew }); !errors.Is(err, tooFew) || calls != 1 {
		t.Fatalf("a cluster too small is not asked again: err %v after %d calls", err, calls)
	}
	stopped, cancel := context.WithCancel(ctx)
	cancel()
	calls = 0
	if err := Retry(stopped, func(context.Context) error { calls++; return context.DeadlineExceeded }); err == nil || calls != 1 {
		t.Fatalf("stopped: err %v after %d calls", err, calls)
	}
}
