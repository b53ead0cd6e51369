// Package testnet gives tests loopback addresses.
package testnet

import (
	"net"
	"testing"
)

// FreeAddr is a loopback host:port free now: for a server a test starts, or for an
// address where nothing answers.
func FreeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}
