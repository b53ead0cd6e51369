package memlimit

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"runtime"
	"runtime/debug"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/poll"
)

const mib = 1 << 20

func TestPolicy(t *testing.T) {
	if got := Policy(360*mib, 100*mib, 20*mib); got != 360*mib {
		t.Errorf("a small live heap: limit %d MiB, want the floor", got/mib)
	}
	if got := Policy(360*mib, 400*mib, 20*mib); got != 620*mib {
		t.Errorf("a live heap above the floor: limit %d MiB, want 20 + 400 × 1.5 = 620", got/mib)
	}
	if got := Policy(0, 0, 0); got != 0 {
		t.Errorf("nothing: limit %d", got)
	}
}

func limit() int64 { return debug.SetMemoryLimit(-1) }

// gcPercent is Go's GOGC now.
func gcPercent() int {
	p := debug.SetGCPercent(100)
	debug.SetGCPercent(p)
	return p
}

func TestRunFollowsTheLiveHeap(t *testing.T) {
	before, gcBefore := limit(), gcPercent()
	stop := runAtFloor(t, func(string) (string, bool) { return "", false })
	// Set before the limit: the collector runs at four times the live heap below it.
	if p := gcPercent(); p != GCPercent {
		t.Errorf("while Run keeps the limit GOGC is %d, want %d", p, GCPercent)
	}
	// A live heap of 64 MiB: the limit must leave room for it, at least 96 MiB.
	held := make([][]byte, 64)
	for i := range held {
		held[i] = make([]byte, mib)
		held[i][0] = 1
	}
	poll.Until(t, 20*time.Second, func() error {
		runtime.GC()
		if l := limit(); l < 96*mib {
			return fmt.Errorf("with 64 MiB live the limit is %d MiB, want at least 96", l/mib)
		}
		return nil
	})
	runtime.KeepAlive(held)
	held = nil
	poll.Until(t, 20*time.Second, func() error {
		runtime.GC()
		if l := limit(); l != 32*mib {
			return fmt.Errorf("after the heap shrank the limit is %d MiB, want the floor, 32", l/mib)
		}
		return nil
	})
	stop()
	if l := limit(); l != before {
		t.Errorf("after Run the limit is %d, want the one it found, %d", l, before)
	}
	if p := gcPercent(); p != gcBefore {
		t.Errorf("after Run GOGC is %d, want the one it found, %d", p, gcBefore)
	}
}

func TestGOGCWins(t *testing.T) {
	before := gcPercent()
	stop := runAtFloor(t, func(k string) (string, bool) {
		if k == "GOGC" {
			return "150", true
		}
		return "", false
	})
	defer stop()
	if p := gcPercent(); p != before {
		t.Errorf("with GOGC set Run changed it to %d (was %d)", p, before)
	}
}

// runAtFloor starts Run with a floor of 32 MiB and lookup, waits until it has set
// the limit, and returns what stops it (and waits for it to return).
func runAtFloor(t *testing.T, lookup func(string) (string, bool)) func() {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		Run(ctx, 32*mib, lookup, slog.New(slog.NewTextHandler(io.Discard, nil)))
	})
	poll.Until(t, 10*time.Second, func() error {
		if l := limit(); l != 32*mib {
			return fmt.Errorf("limit %d MiB, want the floor, 32", l/mib)
		}
		return nil
	})
	return func() {
		cancel()
		wg.Wait()
	}
}

func TestGOMEMLIMITWins(t *testing.T) {
	before := limit()
	Run(context.Background(), 16*mib, func(k string) (string, bool) {
		if k == "GOMEMLIMIT" {
			return "1GiB", true
		}
		return "", false
	}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if l := limit(); l != before {
		t.Errorf("with GOMEMLIMIT set Run changed the limit to %d", l)
	}
	Run(context.Background(), 0, nil, nil)
	if l := limit(); l != before || before != math.MaxInt64 {
		t.Errorf("with no floor the limit is %d, want Go's default", l)
	}
}
