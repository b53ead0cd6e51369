package procs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sluicehq/sluice/test/oracle"
)

// TestStalledWorkerIsFenced: the worker that owns the partition is paused (SIGSTOP,
// what a long GC pause or a frozen VM does) while one of its inserts is half sent
// over a slow link to ClickHouse, whose bytes the network holds meanwhile. The other
// worker takes the partition over and stores every event; then the paused one
// resumes and finishes its insert, rows the new owner stored already. The server's
// fence drops it: every unique event is in events once.
func TestStalledWorkerIsFenced(t *testing.T) {
	r := newWorkerRig(t)
	ctx, conn, js, start := context.Background(), r.conn, r.js, r.start
	// Each worker reaches ClickHouse over a link of 64 KiB/s towards the server
	// (until the pause): a batch of a few thousand events takes seconds to send.
	workers, links := map[string]*process{}, map[string]*link{}
	for _, name := range []string{"w0", "w1"} {
		links[name] = newLink(t, "127.0.0.1:0", r.chs.Addr, 64<<10)
		workers[name] = start("pipeline", "PIPELINE_REPLICA="+name, "CLICKHOUSE_ADDR="+links[name].addr,
			"PIPELINE_LEASE_TTL=3s", "PIPELINE_SNAPSHOT_INTERVAL=500ms", "PIPELINE_FLUSH_INTERVAL=1s", "PIPELINE_INSERT_TIMEOUT=5m")
	}
	start("sink", "SINK_TABLES=dead_letters,alerts")

	m := oracle.NewManifest(oracle.Spec{Total: 20_000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 31})
	pubCtx, stopPub := context.WithTimeout(ctx, 10*time.Minute)
	defer stopPub()
	published := make(chan error, 1)
	go func() {
		// About 2,500 publishes a second (the pause paces the producer).
		published <- m.PublishAcked(pubCtx, js, 250, func() { time.Sleep(100 * time.Millisecond) })
	}()

	// The owner (the newest generation in partition_fences) and its insert, running
	// in the server.
	type insert struct {
		worker, queryID string
		gen             uint64
	}
	running := func() (insert, error) {
		var in insert
		if err := conn.QueryRow(ctx, "SELECT worker, gen FROM partition_fences WHERE partition = 0 ORDER BY gen DESC LIMIT 1").Scan(&in.worker, &in.gen); err != nil {
			return in, err
		}
		pattern := fmt.Sprintf("sluice/%s/p0/g%d/%%", r.chs.Database, in.gen)
		var ids []string
		if err := conn.QueryRow(ctx, "SELECT groupArray(query_id) FROM system.processes WHERE query_id LIKE ? AND query LIKE 'INSERT INTO events_fenced%'", pattern).Scan(&ids); err != nil {
			return in, err
		}
		if len(ids) == 0 {
			return in, fmt.Errorf("no insert of %s (generation %d) running", in.worker, in.gen)
		}
		in.queryID = ids[0]
		return in, nil
	}
	isOpen := func(queryID string) (bool, error) {
		var open uint64
		err := conn.QueryRow(ctx, "SELECT count() FROM system.processes WHERE query_id = ?", queryID).Scan(&open)
		return open == 1, err
	}
	// The owner's link holds what it carries while an insert of the owner is open:
	// the insert cannot end then (a small batch, all in the kernel's buffers, would
	// otherwise reach the server while its worker is paused). An insert whose last
	// bytes passed just before the hold ends by itself within moments: the one
	// paused is one still open a second after its link held.
	var stalled insert
	err := oracle.WaitFor(ctx, 2*time.Minute, func() (err error) {
		if stalled, err = running(); err != nil {
			return err
		}
		l := links[stalled.worker]
		l.hold()
		open, err := isOpen(stalled.queryID)
		if err == nil && open {
			time.Sleep(time.Second) // the time an ending insert is given
			open, err = isOpen(stalled.queryID)
		}
		if err != nil || !open {
			l.release()
			return fmt.Errorf("insert %s ended after its link held it (%v)", stalled.queryID, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	victim := workers[stalled.worker]
	if err := victim.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Logf("paused %s during insert %s", stalled.worker, stalled.queryID)
	resumed := false
	defer func() {
		if !resumed {
			_ = victim.cmd.Process.Signal(syscall.SIGCONT)
			links[stalled.worker].release()
		}
	}()
	for name, l := range links {
		if name != stalled.worker {
			l.unlimit()
		}
	}
	// The other worker fences the partition, waits out the open insert (one lease
	// TTL) and stores everything. The paused worker's insert is still on its way
	// then.
	if err := oracle.WaitFor(ctx, time.Minute, func() error {
		var gen uint64
		if err := conn.QueryRow(ctx, "SELECT max(gen) FROM partition_fences WHERE partition = 0").Scan(&gen); err != nil {
			return err
		}
		if gen <= stalled.gen {
			return errors.New("no newer owner yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if open, err := isOpen(stalled.queryID); err != nil {
		t.Fatal(err)
	} else if !open {
		t.Fatalf("insert %s had ended when the next owner fenced the partition: the test did not make the late insert it is about", stalled.queryID)
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	if err := oracle.WaitFor(ctx, 5*time.Minute, func() error {
		c, err := oracle.ReadCounts(ctx, conn)
		if err != nil {
			return err
		}
		if c.Events < uint64(len(m.Events)) {
			return fmt.Errorf("%+v", c)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := victim.cmd.Process.Signal(syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	resumed = true
	links[stalled.worker].unlimit()
	links[stalled.worker].release()
	t.Logf("resumed %s", stalled.worker)
	// Its insert ends (sent whole, or cut off when the worker finds its claim lost).
	if err := oracle.WaitFor(ctx, 5*time.Minute, func() error {
		open, err := isOpen(stalled.queryID)
		if err != nil {
			return err
		}
		if open {
			return fmt.Errorf("insert %s still running", stalled.queryID)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	waitDrained(t, ctx, conn, js, readBy(r.topo, []string{"pipeline", "sink"}), m, nil, 0)
	for name, w := range workers {
		select {
		case <-w.done:
			t.Fatalf("worker %s exited (%v):\n%s", name, w.cmd.ProcessState, w.tail())
		default:
		}
	}
}

// link forwards connections to a server, passing at most rate bytes a second
// towards it (the answers at full speed) until unlimit; rate 0 is no limit. Between
// hold and release it passes nothing towards the server.
type link struct {
	addr string
	rate atomic.Int64 // 0: unlimited
	mu   sync.Mutex
	gate chan struct{} // closed unless held
	// passing is read-held while bytes are written on towards the server: hold
	// waits for those writes, so none begins or goes on once it returns.
	passing sync.RWMutex
}

func (l *link) unlimit() { l.rate.Store(0) }

// hold stops the bytes towards the server; when it returns, none passes until
// release.
func (l *link) hold() {
	l.mu.Lock()
	select {
	case <-l.gate:
		l.gate = make(chan struct{})
	default: // held already
	}
	l.mu.Unlock()
	l.passing.Lock()
	defer l.passing.Unlock()
}

// pass writes b to s once the link is open (and not held meanwhile).
func (l *link) pass(s net.Conn, b []byte) error {
	for {
		<-l.open()
		l.passing.RLock()
		select {
		case <-l.open():
			_, err := s.Write(b)
			l.passing.RUnlock()
			return err
		default: // held since
			l.passing.RUnlock()
		}
	}
}

func (l *link) release() {
	l.mu.Lock()
	defer l.mu.Unlock()
	select {
	case <-l.gate:
	default:
		close(l.gate)
	}
}

// open is closed while the link passes bytes towards the server.
func (l *link) open() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.gate
}

// newLink is a link listening on listen (host:port; port 0 picks one) to target at
// rate bytes a second, until t ends.
func newLink(t *testing.T, listen, target string, rate int64) *link {
	t.Helper()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	l := &link{addr: ln.Addr().String(), gate: make(chan struct{})}
	close(l.gate)
	l.rate.Store(rate)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		_ = ln.Close()
		l.release()
		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				_ = c.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, c, s)
			mu.Unlock()
			wg.Go(func() {
				defer s.Close()
				buf := make([]byte, 4096)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if werr := l.pass(s, buf[:n]); werr != nil {
							return
						}
						// The pace of the link: n bytes take n/rate seconds.
						if r := l.rate.Load(); r > 0 {
							time.Sleep(time.Duration(n) * time.Second / time.Duration(r))
						}
					}
					if err != nil {
						return
					}
				}
			})
			wg.Go(func() {
				defer c.Close()
				_, _ = io.Copy(c, s)
			})
		}
	})
	return l
}
