package stage

import (
	"context"
	"errors"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"
)

// Pump hands the messages of it to out, in order, until it is stopped or ctx ends,
// then closes out. Read errors other than the end are logged and reading goes on
// (the ordered consumer recovers by itself). Run it in a goroutine of its own: a
// full out holds it, which is the caller's back-pressure.
func Pump(ctx context.Context, it jetstream.MessagesContext, out chan<- jetstream.Msg, log *slog.Logger) {
	pump(ctx, it, out, log, false)
}

// PumpUntilStale is Pump for a durable pull consumer, which also ends when the
// server's heartbeats stop coming: after its consumer's leader moved, a pull can
// wait for ever without them (seen in the cluster test after a node's SIGKILL),
// while a new iterator pulls from the new leader. The caller pulls anew when out
// closes; what was delivered and not acked comes again after the ack wait.
func PumpUntilStale(ctx context.Context, it jetstream.MessagesContext, out chan<- jetstream.Msg, log *slog.Logger) {
	pump(ctx, it, out, log, true)
}

func pump(ctx context.Context, it jetstream.MessagesContext, out chan<- jetstream.Msg, log *slog.Logger, stale bool) {
	defer close(out)
	for {
		msg, err := it.Next()
		if err != nil {
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return
			}
			log.Warn("read", "err", err)
			if stale && errors.Is(err, jetstream.ErrNoHeartbeat) {
				return
			}
			continue
		}
		select {
		case out <- msg:
		case <-ctx.Done():
			return
		}
	}
}
