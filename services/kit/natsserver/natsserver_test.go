package natsserver

import (
	"net"
	"strings"
	"testing"
)

// A port in use is said at once, with the address (the server itself only logs it:
// Start waited 10 s and guessed before).
func TestPortInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	_, err = Start(Config{Host: "127.0.0.1", Port: port, StoreDir: t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "cannot listen on "+l.Addr().String()+" (another NATS server or sluice up?)") {
		t.Fatalf("Start on a port in use: %v", err)
	}
	srv, err := Start(Config{Host: "127.0.0.1", Port: -1, StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	srv.Shutdown()
	srv.WaitForShutdown()
}
