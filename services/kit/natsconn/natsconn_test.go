package natsconn

import (
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/settings"
)

// freezer forwards connections to target until frozen; then it passes no more
// bytes either way and closes nothing, as a dead host or a cut network does.
type freezer struct {
	ln     net.Listener
	target string
	frozen atomic.Bool
	wg     sync.WaitGroup
}

func newFreezer(t *testing.T, target string) *freezer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &freezer{ln: ln, target: target}
	f.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			for _, pair := range [][2]net.Conn{{c, up}, {up, c}} {
				f.wg.Go(func() {
					defer pair[1].Close()
					buf := make([]byte, 32<<10)
					for {
						n, err := pair[0].Read(buf)
						if err != nil {
							return
						}
						if f.frozen.Load() {
							continue // swallowed: the peer hears nothing more
						}
						if _, err := pair[1].Write(buf[:n]); err != nil {
							return
						}
					}
				})
			}
			t.Cleanup(func() { c.Close(); up.Close() })
		}
	})
	t.Cleanup(func() { ln.Close(); f.wg.Wait() })
	return f
}

// A server that goes silent is given up within a few pings (the client then
// reconnects elsewhere), not after nats.go's default of minutes.
func TestSilentServerIsLeft(t *testing.T) {
	ns := natstest.Run(t)
	f := newFreezer(t, strings.TrimPrefix(ns.URL, "nats://"))
	disconnected := make(chan struct{})
	var once sync.Once
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) {
		if strings.Contains(string(p), "nats disconnected") {
			once.Do(func() { close(disconnected) })
		}
	}), nil))
	const ping = 100 * time.Millisecond
	nc, err := connect(settings.NATS{URL: "nats://" + f.ln.Addr().String()}, "test", log, ping)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	f.frozen.Store(true)
	frozenAt := time.Now()
	select {
	case <-disconnected:
		t.Logf("left the silent server after %s (pings every %s, %d unanswered)", time.Since(frozenAt), ping, MaxPingsOutstanding)
	case <-time.After(time.Minute):
		// nats.go's defaults would wait 4 minutes or more.
		t.Fatal("still connected to a silent server after a minute")
	}
}

type writerFunc func(p []byte)

func (w writerFunc) Write(p []byte) (int, error) { w(p); return len(p), nil }
