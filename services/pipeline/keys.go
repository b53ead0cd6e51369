package pipeline

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"

	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/dedup/window"
	"github.com/sluicehq/sluice/services/kit/partition"
)

// keyStore is a partition's dedup keys: in memory (memKeys) or on disk (diskKeys),
// by dedup.store.
type keyStore interface {
	dedup.Keys
	Stats() window.Stats
	Range(now uint32, f func(k window.Key, exp uint32) bool) error
	// capture takes the keys as they are, for a state the saver writes later
	// (keys whose window ended by now may be left out).
	capture(now uint32) keysCapture
	// sweep removes the keys whose window ended by now among the next n of a
	// sweep through them, and reports whether the sweep has keys left: the
	// decide loop runs it in steps, between its other work.
	sweep(now uint32, n int) bool
	Close() error
}

// keysCapture writes captured keys into a state (after its header); saved is
// called once that state is the partition's. A run's captures are encoded and
// saved one at a time, in order, and the next capture is taken only after the
// last one was saved or given up (the decide loop's saving flag, and the final
// save after the saver stopped): memKeys counts on it, trimming its log of
// admitted keys by the position the saved capture took.
type keysCapture interface {
	encode(ctx context.Context, w io.Writer) error
	saved(ctx context.Context)
}

// The keys part of a state: for keys in memory, memMagic and the segments that
// hold them (JSON; releases before segments wrote one window.Store snapshot, with
// its own magic, which a restore still reads); for keys on disk, diskMagic and the
// checkpoint's files (JSON).
var (
	memMagic  = []byte("slmem001")
	diskMagic = []byte("sldisk01")
)

// maxSegments bounds the segments a state of keys in memory names: a capture that
// would name more, or whose segments would hold more than twice the keys held (the
// others expired), writes every key held as one segment instead of the keys
// admitted since the last save. It writes them by merging the segments it names
// with the keys admitted since, leaving out those expired: on the saver's time,
// not the decide loop's. Only when no segment holds the keys yet (a store just
// converted, or empty), or the store dropped keys early (full: the segments hold
// keys the store no longer does), is the table copied (window.Store.Clone) in the
// decide loop instead: 120 ms at 1.6M keys here, its 50 MB of fresh memory.
const maxSegments = 16

// segment is one file of the keys in memory's checkpoints: keys and their
// expiries in the window.Store snapshot format (window.WriteKeys).
type segment struct {
	File partition.File `json:"file"`
	Keys int            `json:"keys"`
	// Expires is the latest expiry of its keys: once it is past, the segment holds
	// nothing and the next capture leaves it out.
	Expires uint32 `json:"expires"`
}

// admitted is a key admitted since the last save, and its expiry.
type admitted struct {
	k   window.Key
	exp uint32
}

// addedChunk is how many keys a chunk of an admittedLog holds (96 KiB), and
// spareChunks how many emptied chunks it keeps for use again (12 MiB).
const addedChunk, spareChunks = 4096, 128

// admittedLog is the keys admitted since the last save, in order, in chunks of
// addedChunk: appending never copies the keys held (one slice of them, 350,000
// keys in 10 s at half the benchmark's rate, grew by copies of up to 8 MB into new
// memory, a 33 ms append measured in the decide loop), and a save's chunks are
// used again. A view (first) stays as it was while keys are appended after it.
type admittedLog struct {
	chunks [][]admitted // all full but the last; the first from off
	off    int
	n      int
	spare  [][]admitted
}

func (l *admittedLog) add(a admitted) {
	if len(l.chunks) == 0 || len(l.chunks[len(l.chunks)-1]) == addedChunk {
		var c []admitted
		if k := len(l.spare); k > 0 {
			c, l.spare = l.spare[k-1][:0], l.spare[:k-1]
		} else {
			c = make([]admitted, 0, addedChunk)
		}
		l.chunks = append(l.chunks, c)
	}
	last := &l.chunks[len(l.chunks)-1]
	*last = append(*last, a)
	l.n++
}

// first returns the first n keys as a view: slices of the chunks, which appends
// after them do not touch.
func (l *admittedLog) first(n int) [][]admitted {
	var v [][]admitted
	for i, off := 0, l.off; n > 0; i, off = i+1, 0 {
		c := l.chunks[i][off:]
		c = c[:min(n, len(c)):min(n, len(c))]
		v = append(v, c)
		n -= len(c)
	}
	return v
}

// drop removes the first n keys, keeping the chunks they emptied as spares.
func (l *admittedLog) drop(n int) {
	l.n -= n
	for n > 0 {
		c := l.chunks[0]
		k := len(c) - l.off
		if n < k || len(c) < addedChunk {
			// Within the first chunk, or the last one (not full): it stays.
			l.off += n
			if l.off == len(c) && len(l.chunks) == 1 {
				l.chunks[0], l.off = c[:0], 0
			}
			return
		}
		n -= k
		if len(l.spare) < spareChunks {
			l.spare = append(l.spare, c[:0])
		}
		l.chunks, l.off = l.chunks[1:], 0
	}
}

// memKeys are the keys in memory. They are saved incrementally: a capture writes
// the keys admitted since the last saved one as a segment, uploaded once
// (partition.Files) and named by every later state until it expires or a capture
// writes every key held as one segment (maxSegments). So a save writes what
// changed, not the whole table, most of the time.
type memKeys struct {
	*window.Store
	// origin is the store's (its stream's creation); nonce names this run's segments.
	origin uint64
	nonce  string
	// dir holds the segments restored or being written (dir/segments) and this
	// machine's copies of those uploaded (dir/cache); temp: a directory made for
	// the run, removed at Close.
	dir   string
	temp  bool
	files *partition.Files

	mu sync.Mutex
	// added are the keys admitted since the last save (a capture that was not saved
	// leaves them for the next); segs are the segments of the last state saved;
	// whole: the next capture writes every key (no segment holds them yet).
	added  admittedLog
	segs   []segment
	whole  bool
	writes int
	// logs counts the logs of added keys begun: Admit begins a new one (and makes
	// the next capture whole) when saves failed so long that the log holds more keys
	// than the table, most of them expired; a capture taken from an earlier log
	// does not trim the new one when it is saved.
	logs int
}

// Admit is window.Store's, noting a key admitted for the next segment.
func (m *memKeys) Admit(k window.Key, exp uint32, seq uint64, now uint32) (bool, error) {
	repeat, err := m.Store.Admit(k, exp, seq, now)
	if err == nil && !repeat && exp > now {
		m.mu.Lock()
		m.added.add(admitted{k, exp})
		if m.added.n%addedChunk == 0 && m.added.n > m.Stats().Keys {
			// Looked at once a chunk: the log would grow for as long as the saves
			// fail. A capture in flight keeps its view of the old log.
			m.added, m.whole = admittedLog{}, true
			m.logs++
		}
		m.mu.Unlock()
	}
	return repeat, err
}

func (m *memKeys) sweep(now uint32, n int) bool { return m.ExpireStep(now, n) }

func (m *memKeys) capture(now uint32) keysCapture {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.writes++
	c := &memCapture{m: m, n: m.added.n, log: m.logs, name: fmt.Sprintf("seg-%s-%d.keys", m.nonce, m.writes), lastSeq: m.Stats().LastSeq}
	inSegs := 0
	for _, sg := range m.segs {
		if sg.Expires > now {
			c.keep = append(c.keep, sg)
			inSegs += sg.Keys
		}
	}
	st := m.Stats()
	c.added = m.added.first(c.n)
	switch {
	case !m.whole && len(c.keep)+1 <= maxSegments && inSegs+c.n <= 2*st.Keys+1024:
	case m.whole || st.EvictedEarly > 0:
		c.all, c.keep, c.added = m.Clone(), nil, nil
	default:
		c.merge, c.keep, c.now = c.keep, nil, now
	}
	return c
}

func (m *memKeys) Close() error {
	if m.temp {
		return os.RemoveAll(m.dir)
	}
	return nil
}

// memCapture is one capture of the keys in memory: the keys admitted since the
// last save (added, the first n of memKeys.added) and the segments of the last
// save still holding keys (keep); or every key held, as a copy of the table (all)
// or as the segments to merge with added, leaving out the keys expired at now.
type memCapture struct {
	m       *memKeys
	n       int
	log     int // memKeys.logs when taken
	name    string
	lastSeq uint64
	all     *window.Store
	added   [][]admitted
	keep    []segment
	merge   []segment
	now     uint32
	// list is the state's segments, once encoded.
	list []segment
}

func (c *memCapture) encode(ctx context.Context, w io.Writer) error {
	dir := filepath.Join(c.m.dir, "segments")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("dedup keys: %w", err)
	}
	path := filepath.Join(dir, c.name)
	defer os.Remove(path) // uploaded (and linked into the cache) or failed
	seg, err := c.write(ctx, path)
	if err != nil {
		if c.merge != nil {
			// A segment that cannot be read here or downloaded: the next capture
			// copies the table instead, so that the saves go on.
			c.m.mu.Lock()
			c.m.whole = true
			c.m.mu.Unlock()
		}
		return fmt.Errorf("dedup keys: %w", err)
	}
	files, err := c.m.files.Upload(ctx, dir, []string{c.name})
	if err != nil {
		return fmt.Errorf("dedup keys: %w", err)
	}
	seg.File = files[0]
	c.list = append(slices.Clip(c.keep), seg)
	b, err := json.Marshal(c.list)
	if err != nil {
		return err
	}
	_, err = w.Write(append(slices.Clip(memMagic), b...))
	return err
}

// write writes the capture's keys to path as a segment.
func (c *memCapture) write(ctx context.Context, path string) (segment, error) {
	var seg segment
	var each func(yield func(k window.Key, exp uint32) bool)
	var reread error // the second reading of a merge's segments
	switch {
	case c.all != nil:
		seg.Keys = c.all.Stats().Keys
		each = func(yield func(k window.Key, exp uint32) bool) {
			_ = c.all.Range(0, func(k window.Key, exp uint32) bool {
				seg.Expires = max(seg.Expires, exp)
				return yield(k, exp)
			})
		}
	case c.merge != nil:
		// Opened (and their digests checked) once; read twice: once to count the
		// keys (a segment's header), once to write them.
		segs := make([]*os.File, 0, len(c.merge))
		defer func() {
			for _, r := range segs {
				r.Close()
			}
		}()
		for _, sg := range c.merge {
			r, err := c.m.files.Open(ctx, sg.File)
			if err != nil {
				return segment{}, err
			}
			segs = append(segs, r)
		}
		if err := c.merged(segs, func(window.Key, uint32) { seg.Keys++ }); err != nil {
			return segment{}, err
		}
		each = func(yield func(k window.Key, exp uint32) bool) {
			reread = c.merged(segs, func(k window.Key, exp uint32) {
				seg.Expires = max(seg.Expires, exp)
				yield(k, exp)
			})
		}
	default:
		seg.Keys = c.n
		each = func(yield func(k window.Key, exp uint32) bool) {
			for _, chunk := range c.added {
				for _, a := range chunk {
					seg.Expires = max(seg.Expires, a.exp)
					if !yield(a.k, a.exp) {
						return
					}
				}
			}
		}
	}
	f, err := os.Create(path)
	if err != nil {
		return segment{}, err
	}
	err = window.WriteKeys(f, c.m.origin, c.lastSeq, seg.Keys, each)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if reread != nil {
		err = reread
	}
	return seg, err
}

// merged calls f with the keys of the segments to merge (segs, opened in the
// order of c.merge) and those admitted since, in that order (a key in two holds
// the later expiry, as a restore reads them), but those expired at the capture's
// now.
func (c *memCapture) merged(segs []*os.File, f func(k window.Key, exp uint32)) error {
	live := func(k window.Key, exp uint32) {
		if exp > c.now {
			f(k, exp)
		}
	}
	for i, r := range segs {
		if _, err := r.Seek(0, io.SeekStart); err != nil {
			return err
		}
		if _, err := window.ReadKeys(r, c.m.origin, live); err != nil {
			return fmt.Errorf("segment %s: %w", c.merge[i].File.Name, err)
		}
	}
	for _, chunk := range c.added {
		for _, a := range chunk {
			live(a.k, a.exp)
		}
	}
	return nil
}

func (c *memCapture) saved(ctx context.Context) {
	m := c.m
	m.mu.Lock()
	m.segs = c.list
	if c.log == m.logs {
		m.whole = false
		m.added.drop(c.n)
	}
	m.mu.Unlock()
	files := make([]partition.File, len(c.list))
	for i, sg := range c.list {
		files[i] = sg.File
	}
	m.files.Keep(ctx, files)
}

// diskKeys are the keys in Pebble under dir (dir/db; dir/cache holds the
// checkpoint files this machine has, dir/checkpoint the one being uploaded); each
// capture's checkpoint uploads what changed since the last (partition.Files).
type diskKeys struct {
	*window.Disk
	// dir is the partition's directory; temp tells one made for converting saved
	// keys into memory (no directory set), removed at Close.
	dir   string
	temp  bool
	files *partition.Files
	// pending is the checkpoint of the capture being saved.
	pending []partition.File
}

// sweep has nothing to do: each checkpoint removes the keys on disk that expired
// by its capture (window.Disk.Checkpoint), in the saver.
func (d *diskKeys) sweep(uint32, int) bool { return false }

func (d *diskKeys) capture(now uint32) keysCapture {
	d.Freeze(now)
	return diskCapture{d}
}

type diskCapture struct{ d *diskKeys }

func (c diskCapture) encode(ctx context.Context, w io.Writer) error {
	dir := filepath.Join(c.d.dir, "checkpoint")
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("%w: %w", errKeysDisk, err)
	}
	defer os.RemoveAll(dir)
	names, err := c.d.Checkpoint(dir)
	if err != nil {
		return fmt.Errorf("%w: %w", errKeysDisk, err)
	}
	files, err := c.d.files.Upload(ctx, dir, names)
	if err != nil {
		return fmt.Errorf("dedup keys: %w", err)
	}
	c.d.pending = files
	b, err := json.Marshal(files)
	if err != nil {
		return err
	}
	_, err = w.Write(append(append([]byte{}, diskMagic...), b...))
	return err
}

func (c diskCapture) saved(ctx context.Context) { c.d.files.Keep(ctx, c.d.pending) }

func (d *diskKeys) Close() error {
	err := d.Disk.Close()
	if d.temp {
		err = errors.Join(err, os.RemoveAll(d.dir))
	}
	return err
}

// openKeys makes the run's key store from the keys part of its state (nil: none)
// and the state's clock, converting between memory and disk when dedup.store
// changed since the state was saved.
func (r *run) openKeys(ctx context.Context, saved []byte, clock uint32) (keyStore, error) {
	var files []partition.File
	var segs []segment
	var err error
	switch {
	case bytes.HasPrefix(saved, diskMagic):
		err = json.Unmarshal(saved[len(diskMagic):], &files)
	case bytes.HasPrefix(saved, memMagic):
		err = json.Unmarshal(saved[len(memMagic):], &segs)
	}
	if err != nil {
		return nil, fmt.Errorf("pipeline: the dedup keys' checkpoint in %s does not decode: %w (delete the state to start over)", Bucket, err)
	}
	onDisk := files != nil
	// mem is the keys in memory as saved (none when they were saved on disk).
	mem := func() (*memKeys, error) {
		m, err := r.openMem(ctx, segs, clock)
		if err != nil || segs != nil || onDisk || saved == nil {
			return m, err
		}
		if _, err := m.ReadSnapshot(bytes.NewReader(saved), clock); err != nil {
			m.Close()
			return nil, fmt.Errorf("pipeline: the dedup keys in %s: %w (delete the state to start over)", Bucket, err)
		}
		return m, nil
	}
	if r.cfg.Window.Store != dedup.StoreDisk {
		m, err := mem()
		if err != nil {
			return nil, err // not m: a nil *memKeys in a keyStore is not a nil keyStore
		}
		if !onDisk {
			return m, nil
		}
		// Saved on disk, kept in memory from now on.
		d, err := r.openDisk(ctx, files, clock)
		if err == nil {
			defer d.Close()
			err = d.Range(clock, func(k window.Key, exp uint32) bool { m.Add(k, exp, r.seq, clock); return true })
		}
		if err != nil {
			m.Close()
			return nil, err
		}
		return m, nil
	}
	d, err := r.openDisk(ctx, files, clock)
	if err != nil {
		return nil, err // not d: a nil *diskKeys in a keyStore is not a nil keyStore
	}
	if onDisk || saved == nil {
		return d, nil
	}
	// Saved in memory, kept on disk from now on: the next checkpoint writes them.
	m, err := mem()
	if err == nil {
		err = m.Range(clock, func(k window.Key, exp uint32) bool {
			_, err = d.Admit(k, exp, r.seq, clock)
			return err == nil
		})
		// The keys are on disk from now on: this machine's copies of the segments go.
		err = errors.Join(err, m.Close(), os.RemoveAll(m.dir))
	}
	if err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

// openMem makes the keys in memory, with the keys of segs (none: an empty store,
// whose first capture writes every key).
func (r *run) openMem(ctx context.Context, segs []segment, clock uint32) (*memKeys, error) {
	st := window.NewStore(r.cfg.Window.MaxKeys)
	origin := uint64(r.created.UnixNano())
	st.SetOrigin(origin)
	var nonce [4]byte
	_, _ = rand.Read(nonce[:])
	m := &memKeys{Store: st, origin: origin, nonce: hex.EncodeToString(nonce[:]), whole: segs == nil}
	if r.cfg.Window.Disk.Dir != "" {
		m.dir = filepath.Join(r.cfg.Window.Disk.Dir, strconv.Itoa(r.in.id), "memory")
	} else {
		var err error
		if m.dir, err = os.MkdirTemp("", "sluice-keys-"); err != nil {
			return nil, fmt.Errorf("pipeline: %w", err)
		}
		m.temp = true
	}
	m.files = partition.NewFiles(r.store, r.claim, "keys", func(string) bool { return true }, filepath.Join(m.dir, "cache"), r.log)
	fail := func(err error) (*memKeys, error) {
		m.Close()
		return nil, fmt.Errorf("pipeline: partition %d's dedup keys: %w", r.in.id, err)
	}
	files := make([]partition.File, len(segs))
	for i, sg := range segs {
		files[i] = sg.File
	}
	dir := filepath.Join(m.dir, "segments")
	if err := m.files.Restore(ctx, files, dir); err != nil {
		return fail(err)
	}
	for _, sg := range segs {
		f, err := os.Open(filepath.Join(dir, sg.File.Name))
		if err != nil {
			return fail(err)
		}
		_, err = m.AddSnapshot(f, clock)
		f.Close()
		if err != nil {
			return fail(fmt.Errorf("segment %s: %w", sg.File.Name, err))
		}
	}
	m.segs = segs
	if err := os.RemoveAll(dir); err != nil {
		return fail(err)
	}
	return m, nil
}

// openDisk restores the checkpoint files (none: an empty store) into the
// partition's directory and opens them.
func (r *run) openDisk(ctx context.Context, files []partition.File, clock uint32) (*diskKeys, error) {
	dir, temp := filepath.Join(r.cfg.Window.Disk.Dir, strconv.Itoa(r.in.id)), false
	if r.cfg.Window.Disk.Dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "sluice-keys-"); err != nil {
			return nil, fmt.Errorf("pipeline: %w", err)
		}
		temp = true
	}
	fail := func(err error) (*diskKeys, error) {
		if temp {
			_ = os.RemoveAll(dir)
		}
		return nil, fmt.Errorf("pipeline: partition %d's dedup keys: %w", r.in.id, err)
	}
	f := partition.NewFiles(r.store, r.claim, "keys", window.Immutable, filepath.Join(dir, "cache"), r.log)
	db := filepath.Join(dir, "db")
	if err := f.Restore(ctx, files, db); err != nil {
		return fail(err)
	}
	o := window.DiskOptions{CacheBytes: int64(r.cfg.Window.Disk.CacheMB) << 20, Logger: r.log}
	d, err := window.OpenDisk(db, clock, o)
	if err != nil {
		return fail(err)
	}
	return &diskKeys{Disk: d, dir: dir, temp: temp, files: f}, nil
}

// errKeysDisk: the disk under the dedup keys failed a checkpoint.
var errKeysDisk = errors.New("the dedup keys' disk failed")

// errNoKeysDir: dedup.store is disk, and no directory is set for it.
var errNoKeysDir = errors.New("pipeline: dedup.store: disk needs a directory: dedup.disk.dir, or SLUICE_DATA_DIR (--data-dir)")
