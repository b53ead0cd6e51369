// Package poll waits in tests for a condition instead of sleeping.
package poll

import (
	"testing"
	"time"
)

// Until calls cond every 20 ms until it returns nil, and fails t with cond's last
// error after timeout.
func Until(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %v", timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
