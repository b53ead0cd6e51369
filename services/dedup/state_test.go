package dedup

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/dedup/window"
)

// testKey is the i-th of a set of distinct keys spread as real ones are (keys are
// hashes: the store places them by their bits).
func testKey(i int) window.Key {
	h := sha256.Sum256(binary.BigEndian.AppendUint64(nil, uint64(i)))
	return window.Key{Hi: binary.BigEndian.Uint64(h[:8]), Lo: binary.BigEndian.Uint64(h[8:16])}
}

// heldWriter holds its first Write until released, as a slow disk would.
type heldWriter struct {
	writing chan struct{} // closed at the first Write
	release chan struct{}
	once    sync.Once
	buf     bytes.Buffer
}

func (w *heldWriter) Write(p []byte) (int, error) {
	w.once.Do(func() { close(w.writing) })
	<-w.release
	return w.buf.Write(p)
}

// A snapshot being written does not hold up the stage's Admit: the keys are
// copied under the store's lock and the copy written with the lock free (a
// million keys are about 20 MB to write). The snapshot holds the keys as they
// were when it began.
func TestSnapshotWriteDoesNotHoldAdmit(t *testing.T) {
	const keys, now, exp = 1000, 1_000_000, 2_000_000
	store := window.NewStore(0)
	for i := range keys {
		store.Add(testKey(i), exp, uint64(i+1), now)
	}
	s := &state{store: store}
	w := &heldWriter{writing: make(chan struct{}), release: make(chan struct{})}
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(w.release) }) }
	defer release()
	wrote := make(chan error, 1)
	go func() { wrote <- s.writeSnapshot(w) }()
	select {
	case <-w.writing:
	case err := <-wrote:
		t.Fatalf("the snapshot was written without a write: %v", err)
	}

	admitted := make(chan bool, 1)
	go func() {
		repeat, _ := store.Admit(testKey(keys), exp, keys+1, now)
		admitted <- repeat
	}()
	select {
	case repeat := <-admitted:
		if repeat {
			t.Fatal("a new key was admitted as a repeat")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Admit waited for the snapshot's write to end")
	}

	release()
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	restored := window.NewStore(0)
	seq, err := restored.ReadSnapshot(bytes.NewReader(w.buf.Bytes()), now)
	if err != nil {
		t.Fatal(err)
	}
	if got := restored.Stats().Keys; got != keys || seq != keys {
		t.Fatalf("the snapshot holds %d keys up to seq %d; want %d up to %d (the store as the write began)", got, seq, keys, keys)
	}
}

// The periodic expiry, in steps, removes every key whose window ended and keeps
// the others.
func TestExpireInSteps(t *testing.T) {
	const n = 3 * expireStep
	store := window.NewStore(0)
	for i := range n {
		exp := uint32(200)
		if i%3 == 0 {
			exp = 100
		}
		store.Add(testKey(i), exp, uint64(i+1), 50)
	}
	s := &state{store: store}
	s.expire(150)
	if got := store.Stats().Keys; got != n-n/3 {
		t.Fatalf("%d keys held after the expiry; want %d", got, n-n/3)
	}
	for i := range n {
		if held := store.Seen(testKey(i), 150); held != (i%3 != 0) {
			t.Fatalf("key %d held %v after the expiry at 150", i, held)
		}
	}
}
