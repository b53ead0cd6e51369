package partition

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// File is one file of a checkpoint and the object that holds its content.
type File struct {
	Name   string `json:"name"`
	Object string `json:"object"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Files keeps the files of a claim's incremental checkpoints in an object store:
// a file that never changes once written (immutable) is uploaded once and named in
// every checkpoint that holds it; the others are uploaded with each checkpoint. So
// what a checkpoint uploads is what changed since the one before.
//
// Objects are named <prefix>.<partition>.<gen>.<nonce>.<n>.<file>: the claim's
// generation, a nonce drawn per Files and a count, so that no object is written
// twice, by two writers (an owner that lost the partition and its successor, or
// two runs of one claim) or by two checkpoints (a file that changes). Files deletes only objects of generations up to its claim's that the
// checkpoints it keeps do not name.
//
// Shared files (NewSharedFiles) are written by several writers at once, each
// under its nonce; each deletes only its own objects, and those of a writer that
// has written nothing for a while (one that ended).
//
// A checkpoint is a list of Files, saved by the caller in its state (States); Keep
// says which checkpoints the saved states name, after each save.
type Files struct {
	store     jetstream.ObjectStore
	claim     *Claim
	prefix    string
	nonce     string
	uploads   int
	immutable func(name string) bool
	// cache holds this machine's copies of immutable files, by object name.
	cache string
	log   *slog.Logger
	// uploaded are the immutable files uploaded or restored, by name; fresh the
	// objects uploaded since the last Keep.
	uploaded map[string]File
	fresh    []string
	// kept are the checkpoints the saved states name (the newest last); pruned
	// tells whether the objects left by earlier owners were listed once.
	kept   [][]File
	pruned bool
	// shared: several writers at once (NewSharedFiles); stale is how long a
	// writer's objects stay after its newest; keptAt is when this writer last
	// kept a checkpoint (or began), listedAt when it last listed the objects.
	shared   bool
	stale    time.Duration
	keptAt   time.Time
	listedAt time.Time
}

// NewFiles keeps claim's checkpoint files in store as objects named
// prefix.<partition>.<gen>.<nonce>.<n>.<file>; immutable tells the files that never
// change once written, which are also kept in the directory cache (hard links, by
// object name) for a restore on this machine.
func NewFiles(store jetstream.ObjectStore, claim *Claim, prefix string, immutable func(name string) bool, cache string, log *slog.Logger) *Files {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return &Files{store: store, claim: claim, prefix: prefix, nonce: hex.EncodeToString(b[:]), immutable: immutable, cache: cache, log: log, uploaded: map[string]File{}}
}

// NewSharedFiles keeps checkpoint files, as NewFiles, for one of several writers
// of prefix in store that write at once and hold no claim (the split alert
// stage's replicas, which share one state object: whichever saved last, its
// checkpoint is the state). Objects are named prefix.0.0.<nonce>.<n>.<file>.
//
// A writer deletes its own objects only, once the checkpoints it keeps no longer
// name them, and all objects of another writer whose newest is older than stale
// next to its own newest (by the server's clock: a writer that ended). A writer
// whose checkpoints were not kept for half of stale (saves failing) uploads its
// files again, as others may have deleted them; and a restored checkpoint stays
// its writer's: the next checkpoint must not name its files (Continues).
func NewSharedFiles(store jetstream.ObjectStore, prefix string, immutable func(name string) bool, cache string, stale time.Duration, log *slog.Logger) *Files {
	f := NewFiles(store, nil, prefix, immutable, cache, log)
	f.shared, f.stale, f.keptAt = true, stale, time.Now()
	return f
}

// Continues tells whether checkpoints after a Restore may name the restored
// files: a claim's files carry on its predecessor's (they are the claim's now);
// shared files do not (they remain their writer's, who deletes them).
func (f *Files) Continues() bool { return !f.shared }

// writer returns the nonce of the writer of one of prefix's objects.
func (f *Files) writer(object string) (string, bool) {
	rest, ok := strings.CutPrefix(object, f.prefix+".")
	if !ok {
		return "", false
	}
	fields := strings.SplitN(rest, ".", 5)
	if len(fields) < 5 {
		return "", false
	}
	return fields[2], true
}

// ended adds to drop the objects of the other writers whose newest object is
// older than f.stale next to this writer's newest (both stamped by the server).
func (f *Files) ended(infos []*jetstream.ObjectInfo, drop map[string]bool) {
	newest := map[string]time.Time{}
	for _, info := range infos {
		if w, ok := f.writer(info.Name); ok && info.ModTime.After(newest[w]) {
			newest[w] = info.ModTime
		}
	}
	own, ok := newest[f.nonce]
	if !ok {
		return // none of this writer's objects listed: no clock to go by
	}
	for _, info := range infos {
		if w, ok := f.writer(info.Name); ok && w != f.nonce && own.Sub(newest[w]) > f.stale {
			drop[info.Name] = true
		}
	}
}

// mine tells whether this Files may delete object when no kept checkpoint names
// it: shared files delete only their own.
func (f *Files) mine(object string) bool {
	if !f.shared {
		return true
	}
	w, ok := f.writer(object)
	return ok && w == f.nonce
}

// part and generation are the claim's (0 without one).
func (f *Files) part() int {
	if f.claim == nil {
		return 0
	}
	return f.claim.Partition
}

func (f *Files) generation() uint64 {
	if f.claim == nil {
		return 0
	}
	return f.claim.Gen
}

func (f *Files) object(name string) string {
	f.uploads++
	return fmt.Sprintf("%s.%d.%d.%s.%d.%s", f.prefix, f.part(), f.generation(), f.nonce, f.uploads, name)
}

// gen returns the generation of one of the partition's objects.
func (f *Files) gen(object string) (uint64, bool) {
	head := fmt.Sprintf("%s.%d.", f.prefix, f.part())
	if !strings.HasPrefix(object, head) {
		return 0, false
	}
	var gen uint64
	if _, err := fmt.Sscanf(object[len(head):], "%d.", &gen); err != nil {
		return 0, false
	}
	return gen, true
}

// Upload uploads the files of the checkpoint in dir that are not uploaded yet and
// returns the checkpoint's list. The list is not the partition's state until the
// caller saves it.
func (f *Files) Upload(ctx context.Context, dir string, names []string) ([]File, error) {
	if f.claim != nil {
		if err := f.claim.Valid(); err != nil {
			return nil, err
		}
	}
	if f.shared && time.Since(f.keptAt) > f.stale/2 {
		// Others may take this writer for ended and delete its objects.
		clear(f.uploaded)
	}
	files := make([]File, 0, len(names))
	for _, name := range names {
		if up, ok := f.uploaded[name]; ok && f.immutable(name) {
			files = append(files, up)
			continue
		}
		file, err := f.upload(ctx, dir, name)
		if err != nil {
			return nil, err
		}
		if f.immutable(name) {
			f.uploaded[name] = file
		}
		f.fresh = append(f.fresh, file.Object)
		files = append(files, file)
	}
	return files, nil
}

func (f *Files) upload(ctx context.Context, dir, name string) (File, error) {
	r, err := os.Open(filepath.Join(dir, name))
	if err != nil {
		return File{}, fmt.Errorf("upload checkpoint file: %w", err)
	}
	defer r.Close()
	info, err := r.Stat()
	if err != nil {
		return File{}, fmt.Errorf("upload checkpoint file: %w", err)
	}
	object := f.object(name)
	h := sha256.New()
	if _, err := f.store.Put(ctx, jetstream.ObjectMeta{Name: object}, io.TeeReader(paced(ctx, r, info.Size()), h)); err != nil {
		return File{}, fmt.Errorf("upload checkpoint file %s: %w", name, err)
	}
	if f.immutable(name) {
		// A copy for a restore on this machine (best effort: the object is the copy
		// that counts).
		if err := os.MkdirAll(f.cache, 0o755); err == nil {
			_ = os.Link(filepath.Join(dir, name), filepath.Join(f.cache, object))
		}
	}
	return File{Name: name, Object: object, Size: info.Size(), SHA256: hex.EncodeToString(h.Sum(nil))}, nil
}

// Restore writes the files of a checkpoint into dir (made anew, empty for none).
// An immutable file this machine has (in the cache, its digest right) is linked
// from there; the others are downloaded (and cached), their digests checked. The
// files restored count as uploaded, and the checkpoint as kept (not shared
// files': see Continues).
func (f *Files) Restore(ctx context.Context, files []File, dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("restore checkpoint: %w", err)
	}
	for _, d := range []string{dir, f.cache} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("restore checkpoint: %w", err)
		}
	}
	keep := map[string]bool{}
	for _, file := range files {
		path := filepath.Join(dir, file.Name)
		if !f.immutable(file.Name) {
			if err := f.download(ctx, file, path); err != nil {
				return err
			}
			continue
		}
		keep[file.Object] = true
		cached, err := f.local(ctx, file)
		if err != nil {
			return err
		}
		if err := os.Link(cached, path); err != nil {
			return fmt.Errorf("restore checkpoint: %w", err)
		}
		if !f.shared {
			f.uploaded[file.Name] = file
		}
	}
	if files != nil && !f.shared {
		f.kept = [][]File{files}
	}
	f.tidyCache(keep)
	return nil
}

// Open opens this machine's copy of an immutable file of a checkpoint this Files
// uploaded or restored, for reading (a segment merged into a new one); a copy
// that is missing or damaged is downloaded again first, as Restore does.
func (f *Files) Open(ctx context.Context, file File) (*os.File, error) {
	if err := os.MkdirAll(f.cache, 0o755); err != nil {
		return nil, fmt.Errorf("open checkpoint file: %w", err)
	}
	path, err := f.local(ctx, file)
	if err != nil {
		return nil, err
	}
	r, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open checkpoint file: %w", err)
	}
	return r, nil
}

// local returns the path of this machine's copy of an immutable file (in the
// cache), downloading it when there is none or its size or digest is wrong.
func (f *Files) local(ctx context.Context, file File) (string, error) {
	cached := filepath.Join(f.cache, file.Object)
	if err := check(cached, file); err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			f.log.Warn("a local copy of a checkpoint file is damaged; downloading it again", "partition", f.part(), "file", cached, "err", err)
		}
		if err := f.download(ctx, file, cached); err != nil {
			return "", err
		}
	}
	return cached, nil
}

// check reports whether the file at path has file's size and digest.
func check(path string, file File) error {
	r, err := os.Open(path)
	if err != nil {
		return err
	}
	defer r.Close()
	h := sha256.New()
	n, err := io.Copy(h, r)
	switch {
	case err != nil:
		return err
	case n != file.Size:
		return fmt.Errorf("%d bytes, want %d", n, file.Size)
	case file.SHA256 != "" && hex.EncodeToString(h.Sum(nil)) != file.SHA256:
		return errors.New("its SHA-256 digest is wrong")
	}
	return nil
}

// tidyCache deletes the cached files but those in keep.
func (f *Files) tidyCache(keep map[string]bool) {
	entries, err := os.ReadDir(f.cache)
	if err != nil {
		return
	}
	for _, e := range entries {
		if !keep[e.Name()] {
			_ = os.Remove(filepath.Join(f.cache, e.Name()))
		}
	}
}

// download writes an object to path, through a temporary file, checking its size
// and digest.
func (f *Files) download(ctx context.Context, file File, path string) error {
	r, err := f.store.Get(ctx, file.Object)
	if err != nil {
		return fmt.Errorf("restore checkpoint file %s: %w", file.Name, err)
	}
	defer r.Close()
	tmp := path + ".part"
	w, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("restore checkpoint file %s: %w", file.Name, err)
	}
	_, err = io.Copy(w, r)
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = check(tmp, file)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("restore checkpoint file %s: %w", file.Name, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("restore checkpoint file %s: %w", file.Name, err)
	}
	return nil
}

// Keep is told, after each save of a state, the checkpoint it names. The last two
// are kept (with the one restored, as States keeps two states); the objects of the
// checkpoint before them, and those uploaded for a save that failed, are deleted
// unless a kept one names them. At the first call, every object of the partition
// of a generation up to the claim's that the kept ones do not name is deleted: an
// owner that ended abruptly may have left some. Shared files delete, at the first
// call and every half of stale after, the objects of writers that ended.
func (f *Files) Keep(ctx context.Context, files []File) {
	var dropped []File
	f.keptAt = time.Now()
	f.kept = append(f.kept, files)
	if len(f.kept) > 2 {
		dropped = f.kept[0]
		f.kept = f.kept[len(f.kept)-2:]
	}
	named := map[string]bool{}
	for _, cp := range f.kept {
		for _, file := range cp {
			named[file.Object] = true
		}
	}
	for name, file := range f.uploaded {
		if !named[file.Object] {
			delete(f.uploaded, name) // a file compacted away: its name is not used again
		}
	}
	// Cleanup a stop must not cut short.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	drop := map[string]bool{}
	if !f.pruned || f.shared && time.Since(f.listedAt) > f.stale/2 {
		infos, err := f.store.List(ctx)
		if err != nil && !errors.Is(err, jetstream.ErrNoObjectsFound) {
			f.log.Warn("list the older checkpoint files", "partition", f.part(), "err", err)
			return
		}
		if f.shared {
			f.ended(infos, drop)
		} else {
			for _, info := range infos {
				if gen, ok := f.gen(info.Name); ok && gen <= f.generation() {
					drop[info.Name] = true
				}
			}
		}
		f.pruned, f.listedAt = true, time.Now()
	}
	for _, file := range dropped {
		if f.mine(file.Object) {
			drop[file.Object] = true
		}
	}
	for _, object := range f.fresh {
		drop[object] = true
	}
	f.fresh = nil
	f.tidyCache(named)
	for _, name := range slices.Sorted(maps.Keys(drop)) {
		if named[name] {
			continue
		}
		if err := f.store.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
			f.log.Warn("delete an older checkpoint file", "object", name, "err", err)
		}
	}
}
