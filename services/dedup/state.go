package dedup

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/services/dedup/window"
	"github.com/sluicehq/sluice/streams"
)

// HeaderExpires carries, on each UNIQUE message, the Unix second its key leaves the
// dedup window. Every replica rebuilds its state from these headers.
const HeaderExpires = "Sluice-Expires"

// ParseKey turns a key as written in Nats-Msg-Id (32 hex digits) into a window.Key.
func ParseKey(s string) (window.Key, bool) {
	var b [16]byte
	if len(s) != 32 {
		return window.Key{}, false
	}
	if _, err := hex.Decode(b[:], []byte(s)); err != nil {
		return window.Key{}, false
	}
	return window.Key{Hi: binary.BigEndian.Uint64(b[:8]), Lo: binary.BigEndian.Uint64(b[8:])}, true
}

// state keeps a window.Store in step with the UNIQUE stream and on disk.
//
// The store is a view of UNIQUE: the keys of the messages published there inside
// their windows. A tail (an ordered, headers-only consumer) applies every UNIQUE
// message to it, this replica's and the others'. At start the state loads its last
// snapshot and replays UNIQUE from the snapshot's sequence, and the stage consumes
// only once the replay has reached the end of UNIQUE as it was at start.
type state struct {
	store    *window.Store
	js       jetstream.JetStream
	path     string // snapshot file; "" keeps none
	interval time.Duration
	log      *slog.Logger
	// snapshotAt is the Unix nanoseconds of the last snapshot written or loaded.
	snapshotAt atomic.Int64
	// clock is the stage's time: the latest stream time seen, in Unix seconds.
	clock atomic.Uint32
}

// advance moves the stage's clock to t if t is later.
func (s *state) advance(t uint32) {
	for {
		c := s.clock.Load()
		if t <= c || s.clock.CompareAndSwap(c, t) {
			return
		}
	}
}

// load reads the snapshot, if there is one. A corrupt snapshot, or one of another
// UNIQUE stream (deleted and created again since), or one ahead of the stream, is
// logged and ignored: the replay of UNIQUE from its start rebuilds the state.
func (s *state) load(now uint32, streamLastSeq uint64) {
	if s.path == "" {
		return
	}
	f, err := os.Open(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return
	}
	if err != nil {
		s.log.Error("cannot open the dedup snapshot; rebuilding from the UNIQUE stream", "path", s.path, "err", err)
		return
	}
	defer f.Close()
	start := time.Now()
	seq, err := s.store.ReadSnapshot(f, now)
	if err != nil {
		s.log.Error("cannot use the dedup snapshot; rebuilding from the UNIQUE stream", "path", s.path, "err", err)
		return
	}
	if seq > streamLastSeq {
		s.log.Error("the dedup snapshot is ahead of the UNIQUE stream (was it purged?); rebuilding from the stream", "path", s.path, "snapshot_seq", seq, "stream_seq", streamLastSeq)
		s.store.Reset()
		return
	}
	if info, err := f.Stat(); err == nil {
		s.snapshotAt.Store(info.ModTime().UnixNano())
	}
	s.log.Info("loaded the dedup snapshot", "keys", s.store.Stats().Keys, "seq", seq, "took", time.Since(start))
}

// save writes the snapshot atomically (a temporary file, fsync, rename).
func (s *state) save() error {
	if s.path == "" {
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(s.path), 0o755); err != nil {
		return fmt.Errorf("dedup snapshot: %w", err)
	}
	tmp := s.path + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("dedup snapshot: %w", err)
	}
	err = s.writeSnapshot(f)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, s.path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("dedup snapshot: %w", err)
	}
	s.snapshotAt.Store(time.Now().UnixNano())
	return nil
}

// writeSnapshot writes a copy of the store (Clone: a few milliseconds a million
// keys, under the store's read lock) to w: the write itself, about 20 MB a
// million keys and a disk's time, runs with the lock free, as Admit needs it.
func (s *state) writeSnapshot(w io.Writer) error {
	return s.store.Clone().WriteSnapshot(w)
}

// expireStep is how many slots of the store one step of the periodic expiry sweeps:
// the store's lock is held a step at a time (Admit waits at most that long), not
// for the whole table (8–30 ms a million keys).
const expireStep = 16 << 10

// expire removes the keys whose window ended at or before now, in steps.
func (s *state) expire(now uint32) {
	for s.store.ExpireStep(now, expireStep) {
	}
}

// tail applies UNIQUE to the store from the sequence after the last applied, until
// ctx is done. caughtUp is closed once the store has applied every message UNIQUE
// held when tail started.
func (s *state) tail(ctx context.Context, caughtUp chan<- struct{}) error {
	stream, err := streams.OpenStream(ctx, s.js, streams.Unique)
	if err != nil {
		return fmt.Errorf("dedup: stream %s: %w", streams.Unique, err)
	}
	target := stream.CachedInfo().State.LastSeq
	start := s.store.Stats().LastSeq + 1
	cfg := jetstream.OrderedConsumerConfig{HeadersOnly: true, DeliverPolicy: jetstream.DeliverByStartSequencePolicy, OptStartSeq: start}
	cons, err := streams.OrderedConsumer(ctx, s.js, streams.Unique, cfg)
	if err != nil {
		return fmt.Errorf("dedup: tail %s: %w", streams.Unique, err)
	}
	it, err := cons.Messages()
	if err != nil {
		return fmt.Errorf("dedup: tail %s: %w", streams.Unique, err)
	}
	// The iterator stops at ctx's end, or when tail returns.
	var wg sync.WaitGroup
	defer wg.Wait()
	stopped := make(chan struct{})
	defer close(stopped)
	defer it.Stop()
	wg.Go(func() {
		select {
		case <-ctx.Done():
			it.Stop()
		case <-stopped:
		}
	})
	began := time.Now()
	signal := func() {
		if caughtUp != nil {
			s.log.Info("dedup state caught up with UNIQUE", "keys", s.store.Stats().Keys, "replayed_to", target, "took", time.Since(began))
			close(caughtUp)
			caughtUp = nil
		}
	}
	if start > target {
		signal()
	}
	for {
		msg, err := it.Next()
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			return nil
		}
		if err != nil {
			s.log.Warn("dedup tail", "err", err)
			continue
		}
		md, err := msg.Metadata()
		if err != nil {
			continue
		}
		s.apply(msg.Headers(), md.Sequence.Stream, md.Timestamp)
		if md.Sequence.Stream >= target {
			signal()
		}
	}
}

// apply records the key of one UNIQUE message.
func (s *state) apply(h nats.Header, seq uint64, stored time.Time) {
	k, ok := ParseKey(h.Get(nats.MsgIdHdr))
	exp, err := strconv.ParseUint(h.Get(HeaderExpires), 10, 32)
	if !ok || err != nil {
		s.log.Debug("UNIQUE message without a dedup key or expiry; not held", "seq", seq)
		s.store.Add(window.Key{}, 0, seq, 0) // still advances the sequence
		return
	}
	s.store.Add(k, uint32(exp), seq, unixSeconds(stored))
}

// maintain expires keys and writes snapshots until ctx is done, then writes a last one.
func (s *state) maintain(ctx context.Context) {
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := s.save(); err != nil {
				s.log.Error("final dedup snapshot", "err", err)
			}
			return
		case <-t.C:
			s.expire(s.clock.Load())
			if err := s.save(); err != nil {
				s.log.Error("dedup snapshot", "err", err)
			}
		}
	}
}

// unixSeconds clamps t to the uint32 seconds the store keeps.
func unixSeconds(t time.Time) uint32 {
	u := t.Unix()
	switch {
	case u < 1:
		return 1
	case u > 1<<32-1:
		return 1<<32 - 1
	}
	return uint32(u)
}

// expirySeconds is t in the store's seconds, rounded up, so that a key is held for at
// least its whole window (rounded down, a window could end up to a second early: a
// 1 s window then held some keys for a few milliseconds).
func expirySeconds(t time.Time) uint32 {
	if t.Nanosecond() > 0 {
		t = t.Add(time.Second)
	}
	return unixSeconds(t)
}
