package watchdog

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestWatch(t *testing.T) {
	var d Dog
	reports := make(chan error, 4)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { d.Watch(ctx, 50*time.Millisecond, "stage x", "finished", func(err error) { reports <- err }) })
	defer func() { cancel(); wg.Wait() }()
	d.Read(3)
	select {
	case err := <-reports:
		if err == nil || !strings.Contains(err.Error(), "stage x holds 3 messages and finished none") {
			t.Fatalf("report %v, want stalled", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("held input and finished none: no report")
	}
	d.Done(3, time.Now())
	select {
	case err := <-reports:
		if err != nil {
			t.Fatalf("report %v after it moved, want nil", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("moved again: no report")
	}
	// Holding nothing is never a stall.
	select {
	case err := <-reports:
		t.Fatalf("report %v while idle", err)
	case <-time.After(200 * time.Millisecond): // four checks' worth of idleness; a stall would be reported within
	}
}
