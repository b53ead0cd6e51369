package window

import (
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	"github.com/cockroachdb/pebble/v2/objstorage/objstorageprovider"
	"github.com/cockroachdb/pebble/v2/sstable"
	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/sluicehq/sluice/services/kit/pebblelog"
)

// Disk holds the keys in an embedded LSM (Pebble) on local disk, for windows whose
// keys do not fit in memory. Memory is bounded by the block cache, Pebble's
// memtables and the recent keys: those added since the last capture are held in a
// hash table in memory (the overlay) and reach Pebble only when a checkpoint is
// written. A key's lookup reads the overlays, then Pebble's bloom filters (in the
// cache) and, for a key held or a filter's false positive, a block. The answer is
// exact: a filter only says where to look.
//
// Layout in Pebble: k<key> → expiry; e<expiry><key> → empty, the expiry index that
// lets a checkpoint remove expired keys by a range scan of only them, never a scan
// of the state.
//
// The local files are a cache, not the only copy: a checkpoint writes them into
// files to be uploaded, and a new owner restores from such files. A checkpoint holds
// exactly the keys of the capture it is for, though input goes on while it is
// written: Freeze sets the overlay of the keys added until the capture aside, new
// keys go to a new overlay, and Checkpoint writes the set-aside one into Pebble
// (one ingested table) before it takes Pebble's checkpoint.
type Disk struct {
	db   *pebble.DB
	opts *pebble.Options
	dir  string
	// ingests counts the tables of recent keys written for Pebble to ingest.
	ingests int
	// recent are the keys added since the last Freeze (the deciding goroutine's
	// own); frozen, while a checkpoint is pending, those added before it, read by
	// the deciding goroutine and written into Pebble by Checkpoint.
	recent Table
	frozen atomic.Pointer[frozen]
	// horizon: keys held since before the last capture that expire at or before it
	// are absent (set by Freeze, moves only on).
	horizon atomic.Uint32
	n       atomic.Int64 // keys held
	lastSeq atomic.Uint64
	mu      sync.Mutex // Freeze and Checkpoint
	// gen counts the checkpoints' writes into Pebble; it is the deciding
	// goroutine's iterator's generation: lookups go through one iterator (prefix
	// seeks, its tables kept open) made anew once Pebble has new keys.
	gen   atomic.Uint64
	it    *pebble.Iterator
	itGen uint64
}

// frozen is an overlay set aside at a capture, the capture's horizon and the count
// of keys held then.
type frozen struct {
	t       Table
	horizon uint32
	n       int64
}

// DiskOptions sizes a Disk store.
type DiskOptions struct {
	// CacheBytes is the block cache (filters and hot blocks).
	CacheBytes int64
	Logger     *slog.Logger
}

// DefaultDiskOptions: a 256 MiB block cache.
func DefaultDiskOptions() DiskOptions {
	return DiskOptions{CacheBytes: 256 << 20}
}

const (
	prefixKey    = 'k'
	prefixExpiry = 'e'
)

// minFreeToOpen is the free space OpenDisk asks of the disk.
const minFreeToOpen = 8 << 20

// metaKey holds the count of keys in Pebble as of the checkpoint.
var metaKey = []byte("m")

// OpenDisk opens the store in dir: empty, or the files of a checkpoint, whose
// capture's clock was horizon (keys expiring by then are absent).
func OpenDisk(dir string, horizon uint32, o DiskOptions) (*Disk, error) {
	def := DefaultDiskOptions()
	o.CacheBytes = cmpOr(o.CacheBytes, def.CacheBytes)
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var corruptLogged atomic.Bool
	opts := &pebble.Options{
		Comparer:  &comparer,
		CacheSize: o.CacheBytes,
		// Nothing is written through the memtable (a checkpoint ingests a table).
		MemTableSize: 4 << 20,
		// The files are a cache of the uploaded checkpoints, and nothing is written
		// through the memtable (a checkpoint ingests a table): a write-ahead log
		// would protect nothing.
		DisableWAL: true,
		Logger:     pebblelog.Logger{Log: log.With("component", "pebble")},
		// A background error (a compaction on a full disk) is retried by Pebble
		// again and again: logged once a minute, with how many there were.
		EventListener: &pebble.EventListener{BackgroundError: pebblelog.BackgroundErrors(log.With("component", "pebble"),
			"the dedup keys' background work failed (Pebble retries it)"),
			// A corrupt file fails the reads that meet it (Admit's error ends the
			// run, and the next restores the checkpoint, whose files' digests are
			// checked) rather than the process (Pebble's default: Fatalf).
			DataCorruption: func(info pebble.DataCorruptionInfo) {
				if corruptLogged.CompareAndSwap(false, true) {
					log.Error("a file of the dedup keys on disk is corrupt; its reads fail", "path", info.Path, "err", info.Details)
				}
			}},
	}
	for i := range opts.Levels {
		opts.Levels[i].FilterPolicy = bloom.FilterPolicy(10)
	}
	opts.EnsureDefaults()
	// Pebble writes its metadata at open; an open that fails on a full disk leaves
	// its background work running (a data race in Pebble v2.1.7's failure path), so
	// a disk that is nearly full is refused before.
	if free, err := freeBytes(dir); err == nil && free < minFreeToOpen {
		return nil, fmt.Errorf("open the dedup keys in %s: %d bytes free, %d needed: %w", dir, free, minFreeToOpen, syscall.ENOSPC)
	}
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return nil, fmt.Errorf("open the dedup keys in %s: %w", dir, err)
	}
	d := &Disk{db: db, opts: opts, dir: dir}
	d.horizon.Store(horizon)
	v, closer, err := db.Get(metaKey)
	switch {
	case err == nil:
		if len(v) == 8 {
			d.n.Store(int64(binary.BigEndian.Uint64(v)))
		}
		closer.Close()
	case !errors.Is(err, pebble.ErrNotFound):
		db.Close()
		return nil, fmt.Errorf("read the dedup keys' metadata in %s: %w", dir, err)
	}
	return d, nil
}

// comparer is Pebble's default order with one change: the bloom filters hold the
// keys' entries only. An expiry index entry's prefix (what a filter holds) is its
// first byte, the same for them all: they are only ever scanned, and would
// otherwise take as much filter memory as the keys.
var comparer = func() pebble.Comparer {
	c := *pebble.DefaultComparer
	c.Name = "sluice.dedup.keys.v1"
	c.Split = func(k []byte) int {
		if len(k) > 0 && k[0] == prefixExpiry {
			return 1
		}
		return len(k)
	}
	return c
}()

func cmpOr(v, def int64) int64 {
	if v > 0 {
		return v
	}
	return def
}

func keyOf(buf []byte, k Key) []byte {
	buf[0] = prefixKey
	binary.BigEndian.PutUint64(buf[1:9], k.Hi)
	binary.BigEndian.PutUint64(buf[9:17], k.Lo)
	return buf[:17]
}

func expiryKey(buf []byte, exp uint32, k Key) []byte {
	buf[0] = prefixExpiry
	binary.BigEndian.PutUint32(buf[1:5], exp)
	binary.BigEndian.PutUint64(buf[5:13], k.Hi)
	binary.BigEndian.PutUint64(buf[13:21], k.Lo)
	return buf[:21]
}

// stored returns k's expiry in Pebble (0: none).
func (d *Disk) stored(k Key) (uint32, error) {
	var kb [17]byte
	v, closer, err := d.db.Get(keyOf(kb[:], k))
	if errors.Is(err, pebble.ErrNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	defer closer.Close()
	if len(v) != 4 {
		return 0, nil
	}
	return binary.BigEndian.Uint32(v), nil
}

// lookup is stored for the deciding goroutine, through its iterator.
func (d *Disk) lookup(k Key) (uint32, error) {
	if gen := d.gen.Load(); d.it == nil || d.itGen != gen {
		if d.it != nil {
			if err := d.it.Close(); err != nil {
				return 0, err
			}
		}
		it, err := d.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixKey}, UpperBound: []byte{prefixKey + 1}, UseL6Filters: true})
		if err != nil {
			return 0, err
		}
		d.it, d.itGen = it, gen
	}
	var kb [17]byte
	key := keyOf(kb[:], k)
	if !d.it.SeekPrefixGE(key) {
		return 0, d.it.Error()
	}
	if v := d.it.Value(); len(v) == 4 && bytes.Equal(d.it.Key(), key) {
		return binary.BigEndian.Uint32(v), nil
	}
	return 0, nil
}

// held reports whether k is held at now, looking newest first: the recent keys,
// those set aside, Pebble; known whether any of them has k at all. As in memory,
// where each capture removes the keys expired by then, a key held since before the
// last capture (Freeze) is held only if it expires after that capture's horizon
// too.
func (d *Disk) held(k Key, now uint32) (held, known bool, err error) {
	if e := d.recent.Get(k); e != 0 {
		return e > now, true, nil
	}
	now = max(now, d.horizon.Load())
	if f := d.frozen.Load(); f != nil {
		if e := f.t.Get(k); e != 0 {
			return e > now, true, nil
		}
	}
	e, err := d.lookup(k)
	return e > now, e != 0, err
}

// Admit reports whether k is held inside its window at now (a repeat); when it is
// not, it holds k until exp, as first seen at input sequence seq. A key whose
// window has already ended at now is not held. Admit and Freeze are called
// by one goroutine, in input order.
func (d *Disk) Admit(k Key, exp uint32, seq uint64, now uint32) (bool, error) {
	held, known, err := d.held(k, now)
	if pebble.IsCorruptionError(err) {
		return false, fmt.Errorf("dedup keys: a file on disk is corrupt: %w", err)
	}
	if err != nil {
		return false, fmt.Errorf("dedup keys: %w", err)
	}
	if held {
		return true, nil
	}
	d.lastSeq.Store(max(d.lastSeq.Load(), seq))
	if exp > now {
		if !known {
			d.n.Add(1)
		}
		d.recent.Put(k, exp)
	}
	return false, nil
}

// Freeze is a capture at now: the keys whose window ended by now are absent from
// then on (removed from the files at the next checkpoint), and the keys added until
// now are set aside for the next Checkpoint, which will hold exactly the keys held
// now. A Freeze before the last one's Checkpoint adds to what it set aside.
func (d *Disk) Freeze(now uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.horizon.Store(max(d.horizon.Load(), now))
	f := &frozen{horizon: d.horizon.Load(), n: d.n.Load()}
	if old := d.frozen.Load(); old != nil {
		f.t = old.t.clone()
		d.recent.Range(func(k Key, exp uint32) bool { f.t.Put(k, exp); return true })
	} else {
		f.t = d.recent
	}
	d.frozen.Store(f)
	d.recent = Table{}
}

// Checkpoint writes the keys set aside by the last Freeze into Pebble, removes the
// keys expired by that capture's horizon, and writes a checkpoint into dir (which
// must not exist). It returns the files' names, relative to dir.
//
// Everything a checkpoint changes goes into one table that Pebble ingests: the new
// keys, the removals, the count. Nothing passes through Pebble's memtable, so
// nothing needs a flush (which, on a full disk, Pebble would retry without end);
// a full disk fails the table's own write, and the checkpoint with it.
func (d *Disk) Checkpoint(dir string) ([]string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.frozen.Load()
	if f == nil {
		return nil, errors.New("dedup keys: a checkpoint without a capture")
	}
	if err := d.write(f); err != nil {
		return nil, fmt.Errorf("dedup keys: write the recent keys: %w", err)
	}
	// Pebble holds them now; lookups go there (through a new iterator).
	d.gen.Add(1)
	d.frozen.Store(nil)
	if err := d.db.Checkpoint(dir); err != nil {
		return nil, fmt.Errorf("dedup keys: checkpoint: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("dedup keys: checkpoint: %w", err)
	}
	var names []string
	for _, e := range entries {
		if e.Type().IsRegular() {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// write writes f into Pebble as one ingested table: the removal of the expiry
// index's entries up to f's horizon and the index entries of f's keys; f's keys but those
// expired by the horizon, and the removal of each key whose window ended by the
// horizon (found by the index, not by a scan of the state) unless f holds it
// again; the count of keys.
func (d *Disk) write(f *frozen) error {
	type entry struct {
		k   Key
		exp uint32 // 0: remove the key
	}
	entries := make([]entry, 0, f.t.Len())
	var removed int64
	var err error
	f.t.Range(func(k Key, exp uint32) bool {
		if exp > f.horizon {
			entries = append(entries, entry{k, exp})
			return true
		}
		// Expired by the capture: not written. A key Pebble holds too is removed
		// (and counted) below, by its index entry.
		var old uint32
		if old, err = d.stored(k); old == 0 {
			removed++
		}
		return err == nil
	})
	if err != nil {
		return err
	}
	byExpiry := func(a, b entry) int {
		return cmp.Or(cmp.Compare(a.exp, b.exp), cmp.Compare(a.k.Hi, b.k.Hi), cmp.Compare(a.k.Lo, b.k.Lo))
	}
	slices.SortFunc(entries, byExpiry)
	index := len(entries) // entries[:index] have index entries to write
	// The keys expired by the horizon: only the index entry of a key's own expiry
	// removes it (a key added again later has a later one).
	var lo, hi [5]byte
	lo[0], hi[0] = prefixExpiry, prefixExpiry
	binary.BigEndian.PutUint32(hi[1:], f.horizon+1)
	it, err := d.db.NewIter(&pebble.IterOptions{LowerBound: lo[:], UpperBound: hi[:]})
	if err != nil {
		return err
	}
	// The index entries up to the horizon go (point deletions: a range deletion
	// in the table would cost every lookup in it a check).
	var gone [][21]byte
	for it.First(); it.Valid(); it.Next() {
		ek := it.Key()
		gone = append(gone, [21]byte(ek))
		k := Key{binary.BigEndian.Uint64(ek[5:13]), binary.BigEndian.Uint64(ek[13:21])}
		if f.t.Get(k) > f.horizon {
			continue // held again, written below
		}
		exp, err := d.stored(k)
		if err != nil {
			it.Close()
			return err
		}
		if exp == binary.BigEndian.Uint32(ek[1:5]) {
			entries = append(entries, entry{k: k})
		}
	}
	if err := errors.Join(it.Error(), it.Close()); err != nil {
		return err
	}
	removed += int64(len(entries) - index)

	d.ingests++
	path := filepath.Join(d.dir, fmt.Sprintf("recent-%d.sst", d.ingests))
	file, err := vfs.Default.Create(path, vfs.WriteCategoryUnspecified)
	if err != nil {
		return err
	}
	// On success, Ingest moves the file into the LSM.
	w := sstable.NewWriter(objstorageprovider.NewFileWritable(file), d.opts.MakeWriterOptions(0, d.db.FormatMajorVersion().MaxTableFormat()))
	fail := func(err error) error {
		_ = w.Close()
		_ = os.Remove(path)
		return err
	}
	var kb [17]byte
	var eb [21]byte
	var v [8]byte
	for i := range gone { // all before the new entries: they expire after the horizon
		if err := w.Delete(gone[i][:]); err != nil {
			return fail(err)
		}
	}
	for _, e := range entries[:index] {
		if err := w.Set(expiryKey(eb[:], e.exp, e.k), nil); err != nil {
			return fail(err)
		}
	}
	slices.SortFunc(entries, func(a, b entry) int { return cmp.Or(cmp.Compare(a.k.Hi, b.k.Hi), cmp.Compare(a.k.Lo, b.k.Lo)) })
	for _, e := range entries {
		if e.exp == 0 {
			err = w.Delete(keyOf(kb[:], e.k))
		} else {
			binary.BigEndian.PutUint32(v[:4], e.exp)
			err = w.Set(keyOf(kb[:], e.k), v[:4])
		}
		if err != nil {
			return fail(err)
		}
	}
	// The count as at the capture, less the keys removed now (the files hold no
	// key added after it).
	binary.BigEndian.PutUint64(v[:], uint64(max(0, f.n-removed)))
	if err := w.Set(metaKey, v[:]); err != nil {
		return fail(err)
	}
	if err := w.Close(); err != nil { // syncs the file
		_ = os.Remove(path)
		return err
	}
	if err := d.db.Ingest(context.Background(), []string{path}); err != nil {
		_ = os.Remove(path)
		return err
	}
	d.n.Add(-removed)
	return nil
}

// Immutable reports whether a file of a checkpoint never changes once written (the
// LSM's tables and blob files): uploaded once, cached locally by hard link.
func Immutable(name string) bool {
	n := len(name)
	return n > 4 && (name[n-4:] == ".sst" || (n > 5 && name[n-5:] == ".blob"))
}

// Range calls f for every key held at now (as held does), until f returns false.
func (d *Disk) Range(now uint32, f func(k Key, exp uint32) bool) error {
	seen := func(k Key) bool {
		if d.recent.Get(k) != 0 {
			return true
		}
		fr := d.frozen.Load()
		return fr != nil && fr.t.Get(k) != 0
	}
	more := true
	d.recent.Range(func(k Key, exp uint32) bool {
		more = exp <= now || f(k, exp)
		return more
	})
	now = max(now, d.horizon.Load()) // older than the last capture
	if fr := d.frozen.Load(); fr != nil && more {
		fr.t.Range(func(k Key, exp uint32) bool {
			more = exp <= now || d.recent.Get(k) != 0 || f(k, exp)
			return more
		})
	}
	if !more {
		return nil
	}
	it, err := d.db.NewIter(&pebble.IterOptions{LowerBound: []byte{prefixKey}, UpperBound: []byte{prefixKey + 1}})
	if err != nil {
		return err
	}
	defer it.Close()
	for it.First(); it.Valid(); it.Next() {
		kb, v := it.Key(), it.Value()
		if len(kb) != 17 || len(v) != 4 {
			continue
		}
		k := Key{binary.BigEndian.Uint64(kb[1:9]), binary.BigEndian.Uint64(kb[9:17])}
		if exp := binary.BigEndian.Uint32(v); exp > now && !seen(k) && !f(k, exp) {
			break
		}
	}
	return it.Error()
}

// Stats returns the store's figures: Keys held (counted as added and removed; a
// key whose window ended counts until a checkpoint removes it), Bytes the disk
// space.
func (d *Disk) Stats() Stats {
	return Stats{Keys: int(max(0, d.n.Load())), Bytes: int(d.db.Metrics().DiskSpaceUsage()), LastSeq: d.lastSeq.Load()}
}

// Close closes the store; its files stay. The deciding goroutine calls it, or
// none does any more.
func (d *Disk) Close() error {
	if d.it != nil {
		_ = d.it.Close()
	}
	return d.db.Close()
}
