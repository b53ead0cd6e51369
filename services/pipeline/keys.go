package pipeline

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"

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
	// capture removes the keys whose window ended by now and takes the others as
	// they are, for a state the saver writes later.
	capture(now uint32) keysCapture
	Close() error
}

// keysCapture writes captured keys into a state (after its header); saved is
// called once that state is the partition's.
type keysCapture interface {
	encode(ctx context.Context, w io.Writer) error
	saved(ctx context.Context)
}

// The keys part of a state: a window.Store snapshot (its own magic) or, for keys on
// disk, this magic and the checkpoint's files (JSON).
var diskMagic = []byte("sldisk01")

// memKeys are the keys in memory; a capture is a copy of the table.
type memKeys struct{ *window.Store }

func (m memKeys) capture(now uint32) keysCapture {
	m.Expire(now)
	return memCapture{m.Clone()}
}

func (m memKeys) Close() error { return nil }

type memCapture struct{ st *window.Store }

func (c memCapture) encode(_ context.Context, w io.Writer) error { return c.st.WriteSnapshot(w) }
func (c memCapture) saved(context.Context)                       {}

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
	if bytes.HasPrefix(saved, diskMagic) {
		if err := json.Unmarshal(saved[len(diskMagic):], &files); err != nil {
			return nil, fmt.Errorf("pipeline: the dedup keys' checkpoint in %s does not decode: %w (delete the state to start over)", Bucket, err)
		}
	}
	mem := func() (*window.Store, error) {
		st := window.NewStore(r.cfg.Window.MaxKeys)
		st.SetOrigin(uint64(r.created.UnixNano()))
		if saved != nil && files == nil {
			if _, err := st.ReadSnapshot(bytes.NewReader(saved), clock); err != nil {
				return nil, fmt.Errorf("pipeline: the dedup keys in %s: %w (delete the state to start over)", Bucket, err)
			}
		}
		return st, nil
	}
	if r.cfg.Window.Store != dedup.StoreDisk {
		st, err := mem()
		if err != nil {
			return nil, err
		}
		if files == nil {
			return memKeys{st}, nil
		}
		// Saved on disk, kept in memory from now on.
		d, err := r.openDisk(ctx, files, clock)
		if err != nil {
			return nil, err
		}
		defer d.Close()
		if err := d.Range(clock, func(k window.Key, exp uint32) bool { st.Add(k, exp, r.seq, clock); return true }); err != nil {
			return nil, err
		}
		return memKeys{st}, nil
	}
	d, err := r.openDisk(ctx, files, clock)
	if err != nil {
		return nil, err // not d: a nil *diskKeys in a keyStore is not a nil keyStore
	}
	if files != nil || saved == nil {
		return d, nil
	}
	// Saved in memory, kept on disk from now on: the next checkpoint writes them.
	st, err := mem()
	if err == nil {
		err = st.Range(clock, func(k window.Key, exp uint32) bool {
			_, err = d.Admit(k, exp, r.seq, clock)
			return err == nil
		})
	}
	if err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
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
