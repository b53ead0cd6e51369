package stage

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Slow is fault injection for the fault tests (test/procs): with probability P, a
// handler takes D longer, as a slow lookup or receiver would. Unset in production.
type Slow struct {
	P float64
	D time.Duration
}

// ParseSlow reads "<probability>:<duration>", for example "0.01:3s" (the
// SLUICE_TEST_SLOW variable of the stage services).
func ParseSlow(s string) (Slow, error) {
	p, d, ok := strings.Cut(s, ":")
	prob, err := strconv.ParseFloat(p, 64)
	if !ok || err != nil || prob < 0 || prob > 1 {
		return Slow{}, fmt.Errorf("%q: want <probability 0..1>:<duration>", s)
	}
	dur, err := time.ParseDuration(d)
	if err != nil || dur < 0 {
		return Slow{}, fmt.Errorf("%q: want <probability 0..1>:<duration>", s)
	}
	return Slow{P: prob, D: dur}, nil
}

// wrap returns h slowed as s says.
func (s Slow) wrap(h Handler) Handler {
	if s.P <= 0 || s.D <= 0 {
		return h
	}
	return func(msg jetstream.Msg) ([]*nats.Msg, error) {
		if rand.Float64() < s.P {
			time.Sleep(s.D)
		}
		return h(msg)
	}
}
