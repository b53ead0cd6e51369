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
	defer close(out)
	for {
		msg, err := it.Next()
		if err != nil {
			if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
				return
			}
			log.Warn("read", "err", err)
			continue
		}
		select {
		case out <- msg:
		case <-ctx.Done():
			return
		}
	}
}
