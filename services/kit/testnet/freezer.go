package testnet

import (
	"net"
	"sync"
	"sync/atomic"
	"testing"
)

// Freezer is a TCP proxy to a target that can go silent: connections open when
// FreezeOpen is called pass no more bytes either way and are closed by nothing, as
// over a dead host or a cut network; connections made later pass as before.
type Freezer struct {
	ln   net.Listener
	mu   sync.Mutex
	open []*atomic.Bool // each connection's frozen flag
	wg   sync.WaitGroup
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
	var conns []net.Conn
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
			frozen := &atomic.Bool{}
			f.mu.Lock()
			f.open = append(f.open, frozen)
			conns = append(conns, c, up)
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
		for _, c := range conns {
			c.Close()
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
	for _, frozen := range f.open {
		frozen.Store(true)
	}
}
