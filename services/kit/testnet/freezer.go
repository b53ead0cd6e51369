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
// as before. Or late: the connection HoldAfterAnswer picks keeps what its client
// sends until Release delivers it, as a cut network's retransmissions do once it
// heals.
type Freezer struct {
	ln   net.Listener
	mu   sync.Mutex
	open []*proxied
	wg   sync.WaitGroup
	// armed: the next connection the target sends bytes on holds its client's.
	armed atomic.Bool
}

// proxied is one connection through the proxy: the client's, the one to the
// target, and whether it is frozen or its client's bytes are held.
type proxied struct {
	c, up  net.Conn
	frozen atomic.Bool

	mu sync.Mutex
	// held: what the client sends is kept in pending until release; ended: the
	// client closed meanwhile.
	held, ended bool
	pending     []byte
	// answered: the target sent bytes after release.
	released, answered bool
}

// to is the connection direction d (0: the client's bytes, 1: the target's)
// writes to.
func (p *proxied) to(d int) net.Conn {
	if d == 0 {
		return p.up
	}
	return p.c
}

// pass writes b on in direction d, or keeps the client's while held; the first
// answer after HoldAfterAnswer (armed) holds what the client sends next.
func (p *proxied) pass(d int, b []byte, armed *atomic.Bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d == 0 && p.held {
		p.pending = append(p.pending, b...)
		return nil
	}
	if d == 1 && p.released {
		p.answered = true
	}
	_, err := p.to(d).Write(b)
	if d == 1 && armed.CompareAndSwap(true, false) {
		p.held = true
	}
	return err
}

// end closes direction d's writing side once its reading side ended: the
// target's only half (it still answers what it was sent), and once what is held
// is delivered.
func (p *proxied) end(d int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case d == 1:
		_ = p.c.Close()
	case p.held:
		p.ended = true
	default:
		_ = p.up.(*net.TCPConn).CloseWrite()
	}
}

// release delivers what the connection held and lets it pass again.
func (p *proxied) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.held {
		return
	}
	p.held, p.released = false, true
	_, _ = p.up.Write(p.pending)
	p.pending = nil
	if p.ended {
		_ = p.up.(*net.TCPConn).CloseWrite()
	}
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
			for d, from := range []net.Conn{c, up} {
				f.wg.Go(func() {
					buf := make([]byte, 32<<10)
					for {
						n, err := from.Read(buf)
						if err != nil {
							p.end(d)
							return
						}
						if frozen.Load() {
							continue // swallowed: the peer hears nothing more
						}
						if err := p.pass(d, buf[:n], &f.armed); err != nil {
							_ = p.to(d).Close()
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

// HoldAfterAnswer picks the next connection the target sends bytes on: what its
// client sends after that is held (an insert whose data a cut network delays,
// after the server asked for it).
func (f *Freezer) HoldAfterAnswer() { f.armed.Store(true) }

// Held is how many connections hold bytes of their client's.
func (f *Freezer) Held() int {
	return f.count(func(p *proxied) bool { return p.held && len(p.pending) > 0 })
}

// Release delivers what the held connections kept, and lets them pass again.
func (f *Freezer) Release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, p := range f.open {
		p.release()
	}
}

// Answered is how many released connections the target has sent bytes on since.
func (f *Freezer) Answered() int {
	return f.count(func(p *proxied) bool { return p.answered })
}

// count is how many connections is holds for.
func (f *Freezer) count(is func(*proxied) bool) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, p := range f.open {
		p.mu.Lock()
		if is(p) {
			n++
		}
		p.mu.Unlock()
	}
	return n
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
