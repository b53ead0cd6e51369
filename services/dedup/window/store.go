package window

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sync"
)

// Store is the dedup state shared by the stage's goroutines: a Table behind a lock,
// bounded by MaxKeys, with the stream sequence of the last key it applied.
type Store struct {
	mu      sync.RWMutex
	t       Table
	maxKeys int
	lastSeq uint64
	evicted uint64 // keys dropped before their expiry because the store was full
	horizon uint32 // the latest expiry dropped early
	// origin identifies the stream the keys come from (its creation time); a snapshot
	// of another stream's keys is not loaded.
	origin uint64
}

// SetOrigin records which stream the store's keys and sequences belong to.
func (s *Store) SetOrigin(origin uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.origin = origin
}

// NewStore returns an empty store holding at most maxKeys keys (0: no bound).
func NewStore(maxKeys int) *Store { return &Store{maxKeys: maxKeys, t: Table{max: maxKeys}} }

// Clone returns a copy of the store, for a snapshot written while this store goes
// on. The copy's memory is made, and its pages faulted in, before the lock is
// taken (at a million keys that took up to 50 ms here, the copy itself about 2):
// Add waits for the copy alone.
func (s *Store) Clone() *Store {
	for {
		s.mu.RLock()
		sh := s.t.shape()
		s.mu.RUnlock()
		cur, old := touchedSlots(sh.cur), touchedSlots(sh.old)
		s.mu.RLock()
		if s.t.shape() == sh {
			c := &Store{t: s.t.cloneInto(cur, old), maxKeys: s.maxKeys, lastSeq: s.lastSeq, evicted: s.evicted, horizon: s.horizon, origin: s.origin}
			s.mu.RUnlock()
			return c
		}
		// The table grew, or ended a move, meanwhile: made again for its new shape.
		s.mu.RUnlock()
	}
}

// Reset empties the store, keeping its cap and origin.
func (s *Store) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.t, s.lastSeq, s.evicted, s.horizon = Table{max: s.maxKeys}, 0, 0, 0
}

// Seen reports whether k is held and still inside its window at now.
func (s *Store) Seen(k Key, now uint32) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.t.Get(k) > now
}

// Add records k until exp, as applied from stream sequence seq. A key whose window
// has already ended at now is not held. When the store is full, expired keys are
// removed first; if it is still full, the keys with the earliest expiries (a tenth of
// the span of expiries held) are dropped early and counted (see Stats).
func (s *Store) Add(k Key, exp uint32, seq uint64, now uint32) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastSeq = max(s.lastSeq, seq)
	if exp <= now {
		return
	}
	if s.maxKeys > 0 && s.t.Len() >= s.maxKeys && s.t.Get(k) == 0 {
		s.t.Expire(now)
		if s.t.Len() >= s.maxKeys {
			lo, hi := s.t.ExpiryRange()
			cut := lo + max(1, (hi-lo)/10)
			s.evicted += uint64(s.t.RemoveIf(func(e uint32) bool { return e <= cut }))
			s.horizon = max(s.horizon, cut)
		}
	}
	s.t.Put(k, exp)
}

// Admit reports whether k is held inside its window at now (a repeat); when it is
// not, it holds k until exp as first seen at seq (Add). The error is always nil.
func (s *Store) Admit(k Key, exp uint32, seq uint64, now uint32) (bool, error) {
	if s.Seen(k, now) {
		return true, nil
	}
	s.Add(k, exp, seq, now)
	return false, nil
}

// Range calls f for every key held and not expired at now, until f returns false.
func (s *Store) Range(now uint32, f func(k Key, exp uint32) bool) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	s.t.Range(func(k Key, exp uint32) bool { return exp <= now || f(k, exp) })
	return nil
}

// Expire removes the keys whose window ended at or before now.
func (s *Store) Expire(now uint32) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.Expire(now)
}

// ExpireStep removes the keys whose window ended at or before now among the next
// n slots of a sweep through the store, and reports whether the sweep has slots
// left (Table.ExpireStep): the lock is held for n slots, not the whole table.
func (s *Store) ExpireStep(now uint32, n int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.t.ExpireStep(now, n)
}

// Stats describes the store.
type Stats struct {
	Keys  int
	Bytes int
	// LastSeq is the stream sequence of the last key applied.
	LastSeq uint64
	// EvictedEarly counts keys dropped before their expiry because the store was full;
	// a repeat of one of them is no longer recognised.
	EvictedEarly uint64
	// Horizon is the latest expiry (Unix seconds) of a key dropped early.
	Horizon uint32
}

// Stats returns the store's figures.
func (s *Store) Stats() Stats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return Stats{Keys: s.t.Len(), Bytes: s.t.Bytes(), LastSeq: s.lastSeq, EvictedEarly: s.evicted, Horizon: s.horizon}
}

// Snapshot format: magic, origin, last sequence, key count, then per key Hi, Lo,
// expiry (little-endian), then a CRC-32 (IEEE) of everything before it.
var magic = [8]byte{'s', 'l', 'd', 'e', 'd', 'u', 'p', '2'}

// ErrCorrupt means a snapshot is truncated or fails its checksum.
var ErrCorrupt = errors.New("dedup snapshot is corrupt")

// ErrOtherOrigin means a snapshot holds the keys of another stream than the store's.
var ErrOtherOrigin = errors.New("dedup snapshot is of another stream")

// WriteSnapshot writes every key held, and the last sequence applied, to w.
func (s *Store) WriteSnapshot(w io.Writer) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return WriteKeys(w, s.origin, s.lastSeq, s.t.Len(), s.t.Range)
}

// WriteKeys writes n keys and their expiries, as each yields them, to w in the
// snapshot format: a snapshot of some keys (a segment of an incremental
// checkpoint) that AddSnapshot adds to a store. origin and lastSeq are a
// store's (SetOrigin, Stats).
func WriteKeys(w io.Writer, origin, lastSeq uint64, n int, each func(f func(k Key, exp uint32) bool)) error {
	crc := crc32.NewIEEE()
	bw := bufio.NewWriterSize(io.MultiWriter(w, crc), 1<<16)
	var buf [20]byte
	bw.Write(magic[:])
	binary.LittleEndian.PutUint64(buf[:8], origin)
	bw.Write(buf[:8])
	binary.LittleEndian.PutUint64(buf[:8], lastSeq)
	bw.Write(buf[:8])
	binary.LittleEndian.PutUint64(buf[:8], uint64(n))
	bw.Write(buf[:8])
	written := 0
	each(func(k Key, exp uint32) bool {
		binary.LittleEndian.PutUint64(buf[0:8], k.Hi)
		binary.LittleEndian.PutUint64(buf[8:16], k.Lo)
		binary.LittleEndian.PutUint32(buf[16:20], exp)
		bw.Write(buf[:])
		written++
		return true
	})
	if written != n {
		return fmt.Errorf("write dedup snapshot: %d keys, %d announced", written, n)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("write dedup snapshot: %w", err)
	}
	binary.LittleEndian.PutUint32(buf[:4], crc.Sum32())
	if _, err := w.Write(buf[:4]); err != nil {
		return fmt.Errorf("write dedup snapshot: %w", err)
	}
	return nil
}

// ReadSnapshot replaces the store's keys with those of a snapshot, leaving out the
// ones expired at now, and returns the snapshot's last sequence. A snapshot whose
// origin is not the store's is refused with ErrOtherOrigin.
func (s *Store) ReadSnapshot(r io.Reader, now uint32) (uint64, error) {
	t := Table{max: s.maxKeys}
	lastSeq, err := s.readSnapshot(r, func(count uint64) {
		if count > 0 && count < 1<<32 {
			t.grow(max(minSlots, int(float64(count)/rebuildLoad)+1))
		}
	}, func(k Key, exp uint32) {
		if exp > now {
			t.Put(k, exp)
		}
	})
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.t, s.lastSeq = t, lastSeq
	return lastSeq, nil
}

// AddSnapshot adds the keys of a snapshot not expired at now to those held (a key
// held already takes the snapshot's expiry: segments are added oldest first), as
// Add does (so within the store's bound), and returns the snapshot's last
// sequence. A snapshot whose origin is not the store's is refused with
// ErrOtherOrigin; a corrupt one may have added some of its keys.
func (s *Store) AddSnapshot(r io.Reader, now uint32) (uint64, error) {
	lastSeq, err := s.readSnapshot(r, func(uint64) {}, func(k Key, exp uint32) { s.Add(k, exp, 0, now) })
	if err != nil {
		return 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastSeq = max(s.lastSeq, lastSeq)
	return lastSeq, nil
}

// readSnapshot reads a snapshot of the store's origin: sized with its key count,
// then add with each key.
func (s *Store) readSnapshot(r io.Reader, sized func(count uint64), add func(k Key, exp uint32)) (uint64, error) {
	s.mu.RLock()
	origin := s.origin
	s.mu.RUnlock()
	return readKeys(r, origin, sized, add)
}

// ReadKeys reads a snapshot of origin's keys (WriteKeys) from r, calling add with
// each key and its expiry in the order written, and returns its last sequence. A
// snapshot of another origin is refused with ErrOtherOrigin, a truncated or
// damaged one with ErrCorrupt (after add saw the keys before the damage).
func ReadKeys(r io.Reader, origin uint64, add func(k Key, exp uint32)) (uint64, error) {
	return readKeys(r, origin, func(uint64) {}, add)
}

func readKeys(r io.Reader, origin uint64, sized func(count uint64), add func(k Key, exp uint32)) (uint64, error) {
	crc := crc32.NewIEEE()
	br := bufio.NewReaderSize(r, 1<<16)
	var head [32]byte
	if _, err := io.ReadFull(br, head[:]); err != nil {
		return 0, fmt.Errorf("%w: header: %v", ErrCorrupt, err)
	}
	crc.Write(head[:])
	if [8]byte(head[:8]) != magic {
		return 0, fmt.Errorf("%w: not a dedup snapshot of this version", ErrCorrupt)
	}
	if got := binary.LittleEndian.Uint64(head[8:16]); got != origin {
		return 0, fmt.Errorf("%w (origin %d, want %d)", ErrOtherOrigin, got, origin)
	}
	lastSeq := binary.LittleEndian.Uint64(head[16:24])
	count := binary.LittleEndian.Uint64(head[24:32])
	sized(count)
	// Keys are read (and summed) a block at a time: a 20-byte read each costs more
	// than decoding it.
	const perKey, perBlock = 20, 3200
	block := make([]byte, perKey*perBlock)
	for i := uint64(0); i < count; {
		b := block[:perKey*min(perBlock, count-i)]
		if _, err := io.ReadFull(br, b); err != nil {
			return 0, fmt.Errorf("%w: keys %d to %d of %d: %v", ErrCorrupt, i, i+uint64(len(b)/perKey), count, err)
		}
		crc.Write(b)
		for ; len(b) > 0; b = b[perKey:] {
			add(Key{binary.LittleEndian.Uint64(b[0:8]), binary.LittleEndian.Uint64(b[8:16])}, binary.LittleEndian.Uint32(b[16:20]))
			i++
		}
	}
	want := crc.Sum32()
	var sum [4]byte
	if _, err := io.ReadFull(br, sum[:]); err != nil {
		return 0, fmt.Errorf("%w: checksum: %v", ErrCorrupt, err)
	}
	if got := binary.LittleEndian.Uint32(sum[:]); got != want {
		return 0, fmt.Errorf("%w: checksum mismatch", ErrCorrupt)
	}
	return lastSeq, nil
}
