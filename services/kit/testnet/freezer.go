package testnet

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Freezer is a TCP proxy to a target that can go silent: connections open when
// FreezeOpen is called pass no more bytes either way and are closed by nothing, as
// over a dead host or a cut network, until CloseFrozen; connections made later pass
// as before.
type Freezer struct {
	ln   net.Listener
	mu   sync.Mutex
	open []*proxied
	wg   sync.WaitGroup
}

// proxied is one connection through the proxy: the client's, the one to the
// target, and whether it is frozen.
type proxied struct {
	c, up  net.Conn
	frozen atomic.Bool
}

// NewFreezer listens on a loopback port and forwards each connection to target
// until t ends.
func NewFreezer(t testing.TB, target string) *Freezer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &Freezer{ln: ln}
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
			p := &proxied{c: c, up: up}
			frozen := &p.frozen
			f.mu.Lock()
			f.open = append(f.open, p)
			f.mu.Unlock()
			for _, pair := range [][2]net.Conn{{c, up}, {up, c}} {
				f.wg.Go(func() {
					defer pair[1].Close()
					buf := make([]byte, 32<<10)
					for {
						n, err := pair[0].Read(buf)
						if err != nil {
							return
						}
						if frozen.Load() {
							continue // swallowed: the peer hears nothing more
						}
						if _, err := pair[1].Write(buf[:n]); err != nil {
							return
						}
					}
				})
			}
		}
	})
	t.Cleanup(func() {
		ln.Close()
		f.mu.Lock()
		for _, p := range f.open {
			p.c.Close()
			p.up.Close()
		}
		f.mu.Unlock()
		f.wg.Wait()
	})
	return f
}

// Addr is the proxy's host:port.
func (f *Freezer) Addr() string { return f.ln.Addr().String() }

// FreezeOpen silences every connection open now.
func (f *Freezer) FreezeOpen() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.open {
		p.frozen.Store(true)
	}
}

// CloseFrozen closes the frozen connections at both ends, as a dead peer's
// connection is reset in the end (a keepalive, a host back up): their users get an
// error at once instead of waiting for their read timeouts.
func (f *Freezer) CloseFrozen() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.open {
		if p.frozen.Load() {
			p.c.Close()
			p.up.Close()
		}
	}
}
