package natsconn

import (
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/testnet"
)

// A server that goes silent is given up within a few pings (the client then
// reconnects elsewhere), not after nats.go's default of minutes.
func TestSilentServerIsLeft(t *testing.T) {
	ns := natstest.Run(t)
	f := testnet.NewFreezer(t, strings.TrimPrefix(ns.URL, "nats://"))
	disconnected := make(chan struct{})
	var once sync.Once
	log := slog.New(slog.NewTextHandler(writerFunc(func(p []byte) {
		if strings.Contains(string(p), "nats disconnected") {
			once.Do(func() { close(disconnected) })
		}
	}), nil))
	const ping = 100 * time.Millisecond
	nc, err := connect(settings.NATS{URL: "nats://" + f.Addr()}, "test", log, ping)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	f.FreezeOpen()
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

// The URLs a service logs while it waits for NATS show no password.
func TestRedacted(t *testing.T) {
	got := Redacted("nats://sluice:hunter2@n1:4222, nats://n2:4222,tls://a:b@n3:4222")
	if strings.Contains(got, "hunter2") || strings.Contains(got, ":b@") || !strings.Contains(got, "nats://sluice:xxxxx@n1:4222") || !strings.Contains(got, "nats://n2:4222") {
		t.Fatalf("redacted: %s", got)
	}
}

// A URL at something that is not a NATS server (a silent port such as NATS's own
// monitoring port, or one that answers otherwise) fails with a hint at the port,
// not a bare i/o timeout.
func TestNotNATS(t *testing.T) {
	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	other, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer silent.Close()
	defer other.Close()
	serve := func(l net.Listener, greet string) {
		wg.Go(func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				_, _ = c.Write([]byte(greet))
				_, _ = io.Copy(io.Discard, c) // until the client gives up
				_ = c.Close()
			}
		})
	}
	serve(silent, "")
	serve(other, "HTTP/1.1 400 Bad Request\r\n\r\n")
	for _, c := range []struct {
		addr, want string
	}{
		{silent.Addr().String(), "no NATS greeting in time: is the port a NATS client port"},
		{other.Addr().String(), "is not a NATS server"},
	} {
		_, err := Connect(settings.NATS{URL: "nats://" + c.addr}, "test", slog.New(slog.DiscardHandler))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("connect to %s: %v; want a hint %q", c.addr, err, c.want)
		}
	}
}
