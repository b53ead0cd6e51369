package chserver

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/testnet"
)

// TestStartWaitsForATakenPort: a server started on a given port that another
// process holds exits at start-up; it is started again once the port is free,
// and the error of one that cannot start says why from its log.
func TestStartWaitsForATakenPort(t *testing.T) {
	if _, err := Binary(); err != nil {
		t.Fatal(err)
	}
	// The port is the local port of an open connection, as an outgoing one of
	// another process can have: nothing listens on it, and it cannot be bound.
	peer, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := peer.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	port := testnet.FreePort(t)
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}}
	conn, err := d.Dial("tcp", peer.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	far := <-accepted
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	type result struct {
		s   *Server
		err error
	}
	done := make(chan result, 1)
	go func() {
		s, err := StartWith(ctx, dir, port, "")
		done <- result{s, err}
	}()
	// The port is let go once a first start has failed on it.
	for {
		b, _ := os.ReadFile(filepath.Join(dir, "log", "error.log"))
		if strings.Contains(string(b), "Address already in use") {
			break
		}
		select {
		case r := <-done:
			t.Fatalf("StartWith returned while the port was taken: %v", r.err)
		case <-ctx.Done():
			t.Fatal("no start-up failed on the taken port")
		case <-time.After(50 * time.Millisecond):
		}
	}
	// The far end closes first: the port is not held in TIME_WAIT.
	_ = far.Close()
	_ = conn.Close()
	r := <-done
	if r.err != nil {
		t.Fatalf("not started once the port was free: %v", r.err)
	}
	defer r.s.Stop()
	if r.s.Addr != net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) || !Answers(r.s.Addr) {
		t.Fatalf("server at %s does not answer on port %d", r.s.Addr, port)
	}
}
