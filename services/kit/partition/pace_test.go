package partition

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
	"time"
)

// readPaced reads size bytes through paced under ctx and returns how long it took.
func readPaced(t *testing.T, ctx context.Context, size int) (time.Duration, error) {
	t.Helper()
	src := bytes.Repeat([]byte{7}, size)
	start := time.Now()
	got, err := io.ReadAll(paced(ctx, bytes.NewReader(src), int64(size)))
	if err == nil && !bytes.Equal(got, src) {
		t.Fatalf("paced read %d bytes, not the %d written", len(got), size)
	}
	return time.Since(start), err
}

func TestUploadPace(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	never := make(chan struct{})
	t.Run("at the pace", func(t *testing.T) {
		// 1 MiB at 2 MiB/s, the first 256 KiB at once: no sooner than 375 ms.
		took, err := readPaced(t, WithUploadPace(ctx, 2<<20, time.Hour, never), 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if took < 375*time.Millisecond {
			t.Fatalf("1 MiB at 2 MiB/s read in %v", took)
		}
	})
	t.Run("within its time", func(t *testing.T) {
		// At 1 KiB/s it would take 17 minutes: faster, to end within 100 ms of pace.
		if _, err := readPaced(t, WithUploadPace(ctx, 1<<10, 100*time.Millisecond, never), 1<<20); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("hurried", func(t *testing.T) {
		hurry := make(chan struct{})
		close(hurry)
		if _, err := readPaced(t, WithUploadPace(ctx, 1<<10, time.Hour, hurry), 1<<20); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		time.AfterFunc(50*time.Millisecond, cancel)
		if _, err := readPaced(t, WithUploadPace(cctx, 1<<10, time.Hour, never), 1<<20); !errors.Is(err, context.Canceled) {
			t.Fatalf("a paced read whose context ended: %v", err)
		}
	})
	t.Run("unpaced", func(t *testing.T) {
		r := bytes.NewReader(nil)
		if paced(ctx, r, 0) != io.Reader(r) {
			t.Fatal("a context without a pace paces the upload")
		}
	})
}
