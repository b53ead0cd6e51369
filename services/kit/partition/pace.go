package partition

import (
	"context"
	"io"
	"time"

	"golang.org/x/time/rate"
)

// uploadPace is how Files paces the uploads made under a context (WithUploadPace).
type uploadPace struct {
	perSecond int64
	within    time.Duration
	hurry     <-chan struct{}
}

type paceKey struct{}

// paceBurst is the most a paced upload reads at once: two of the object store's
// chunks (128 KiB each).
const paceBurst = 256 << 10

// WithUploadPace returns ctx under which Files uploads each file at perSecond bytes
// a second, or faster where that would take longer than within, until hurry is
// closed (from then on at full speed). A periodic save's upload then spreads over
// time instead of loading the NATS server (and the machine's cores) all at once:
// an unpaced upload of a 10 MB segment of dedup keys held up a worker's input and
// inserts for about 300 ms (docs/benchmarks.md).
func WithUploadPace(ctx context.Context, perSecond int64, within time.Duration, hurry <-chan struct{}) context.Context {
	return context.WithValue(ctx, paceKey{}, uploadPace{perSecond: perSecond, within: within, hurry: hurry})
}

// paced returns r read at ctx's upload pace (WithUploadPace) for a file of size
// bytes, or r itself when ctx has none.
func paced(ctx context.Context, r io.Reader, size int64) io.Reader {
	p, ok := ctx.Value(paceKey{}).(uploadPace)
	if !ok || p.perSecond <= 0 {
		return r
	}
	perSecond := float64(p.perSecond)
	if p.within > 0 {
		perSecond = max(perSecond, float64(size)/p.within.Seconds())
	}
	return &pacedReader{ctx: ctx, r: r, lim: rate.NewLimiter(rate.Limit(perSecond), paceBurst), hurry: p.hurry}
}

// pacedReader reads r no faster than lim allows, until hurry is closed.
type pacedReader struct {
	ctx   context.Context
	r     io.Reader
	lim   *rate.Limiter
	hurry <-chan struct{}
	timer *time.Timer
}

func (p *pacedReader) Read(b []byte) (int, error) {
	if len(b) > paceBurst {
		b = b[:paceBurst]
	}
	n, err := p.r.Read(b)
	if n == 0 {
		return n, err
	}
	select {
	case <-p.hurry:
		return n, err
	default:
	}
	if d := p.lim.ReserveN(time.Now(), n).Delay(); d > 0 {
		if p.timer == nil {
			p.timer = time.NewTimer(d)
		} else {
			p.timer.Reset(d)
		}
		select {
		case <-p.timer.C:
		case <-p.hurry:
			p.timer.Stop()
		case <-p.ctx.Done():
			p.timer.Stop()
			return n, p.ctx.Err()
		}
	}
	return n, err
}
