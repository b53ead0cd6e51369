package pipeline

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/keyed"
	"github.com/sluicehq/sluice/services/dedup"
	"github.com/sluicehq/sluice/services/kit/partition"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/streams"
)

// Keys on disk (dedup.store: disk) across moves and store changes: partitions
// restored on another worker from the checkpoints their owner uploaded (an empty
// local disk), then the store switched to memory and back; at each step the input
// published again is all repeats, and every unique event lands once.
func TestKeysOnDisk(t *testing.T) {
	f := setup(t)
	worker := func(name, store string) Config {
		cfg, _ := configFrom(t, name, "")
		cfg.Partitions = 4
		cfg.Window.Store, cfg.DataDir = store, t.TempDir()
		return cfg
	}
	// again publishes [from, from+n) again: repeats, but for the invalid ones, which
	// are dead-lettered again.
	again := func(from, n int) (invalid int) {
		_, invalid, _ = f.input(t, from, n)
		return invalid
	}
	u, i, _ := f.input(t, 1, 1000)
	stopA := f.start(t, worker("a", dedup.StoreDisk))
	f.waitFor(t, u, i, 0)
	stopB := f.start(t, worker("b", dedup.StoreDisk))
	u2, i2, _ := f.input(t, 1001, 1000)
	u, i = u+u2, i+i2
	f.waitFor(t, u, i, 0)
	stopA()
	i += again(1, 2000)
	u3, i3, _ := f.input(t, 2001, 500)
	u, i = u+u3, i+i3
	f.waitFor(t, u, i, 0)
	f.check(t, u, i, 0)
	checkDiskStates(t, f, true)
	stopB()

	// The same worker with its keys in memory, restored from the disk checkpoints.
	stopB = f.start(t, worker("b", dedup.StoreMemory))
	i += again(1, 2500)
	u4, i4, _ := f.input(t, 2501, 500)
	u, i = u+u4, i+i4
	f.waitFor(t, u, i, 0)
	f.check(t, u, i, 0)
	checkDiskStates(t, f, false)
	stopB()

	// And on disk again, from the memory snapshots.
	f.start(t, worker("b", dedup.StoreDisk))
	i += again(1, 3000)
	u5, i5, _ := f.input(t, 3001, 500)
	u, i = u+u5, i+i5
	f.waitFor(t, u, i, 0)
	f.check(t, u, i, 0)
}

// checkDiskStates checks that each partition's state holds its keys as a disk
// checkpoint (the keys part: diskMagic and the files) or, with !disk, as the
// memory store's segments (memMagic and the segments), and that the object store
// holds checkpoint files.
func checkDiskStates(t *testing.T, f *fixture, disk bool) {
	t.Helper()
	ctx := context.Background()
	store, kv := f.buckets(t)
	for p := range 4 {
		e, err := kv.Get(ctx, "partition."+string(rune('0'+p)))
		if err != nil {
			t.Fatal(err)
		}
		name := between(string(e.Value()), `"state":"`, `"`)
		b, err := store.GetBytes(ctx, name)
		if err != nil {
			t.Fatalf("partition %d's state %s: %v", p, name, err)
		}
		n := binary.BigEndian.Uint32(b)
		want := memMagic
		if disk {
			want = diskMagic
		}
		if !bytes.HasPrefix(b[4+n:], want) {
			t.Fatalf("partition %d's state: its keys part begins %.8q, want %q", p, b[4+n:], want)
		}
	}
	infos, err := store.List(ctx)
	if err != nil && !errors.Is(err, jetstream.ErrNoObjectsFound) {
		t.Fatal(err)
	}
	files := 0
	for _, info := range infos {
		if strings.HasPrefix(info.Name, "keys.") {
			files++
		}
	}
	if files == 0 {
		t.Fatal("no checkpoint files in the object store")
	}
}

func between(s, from, to string) string {
	_, after, _ := strings.Cut(s, from)
	v, _, _ := strings.Cut(after, to)
	return v
}

// The keys' disk full (a 32 MiB tmpfs, filled): the partition's checkpoint fails
// with ENOSPC, its run ends without saving and it reports not ready with the
// reason; once space returns it goes on by itself, saves again, and every event
// lands once.
func TestKeysDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts a tmpfs: run it as root (CI does)")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size=32m"); err != nil {
		t.Fatalf("mount a tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	f := setup(t)
	cfg, _ := configFrom(t, "a", "")
	cfg.Window.Store, cfg.Window.Disk.Dir = dedup.StoreDisk, dir
	ready := &telemetry.Readiness{}
	f.startWith(t, cfg, ready)
	u, i, _ := f.input(t, 1, 1000)
	f.waitFor(t, u, i, 0)
	_, kv := f.buckets(t)

	// Fill the disk.
	filler, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	for {
		if _, err := filler.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	filler.Close()
	u2, i2, _ := f.input(t, 1001, 20_000)
	u, i = u+u2, i+i2
	poll.Until(t, time.Minute, func() error {
		if err := ready.Check(); err == nil || !strings.Contains(err.Error(), "no space left on device") {
			return fmt.Errorf("readiness: %v", err)
		}
		return nil
	})
	// Space again: it goes on by itself. (While the disk is full, a run's restore,
	// which deletes the local copy first, can leave room for a save or two; no
	// state ever covers input not stored, full disk or not.)
	_, before := f.claimState(t, kv)
	if err := os.Remove(filepath.Join(dir, "filler")); err != nil {
		t.Fatal(err)
	}
	f.waitFor(t, u, i, 0)
	poll.Until(t, time.Minute, func() error { return ready.Check() })
	// A new state is saved, and the input published again is all repeats.
	poll.Until(t, time.Minute, func() error {
		if _, now := f.claimState(t, kv); now == before {
			return errors.New("no state saved since the disk had space again")
		}
		return nil
	})
	_, i3, _ := f.input(t, 1, 21_000)
	i += i3
	f.waitFor(t, u, i, 0)
	f.check(t, u, i, 0)
}

// fakeMsg is an EVENTS message for the keying step's unit tests: what it reads of
// a message (subject, headers, payload, metadata).
type fakeMsg struct {
	jetstream.Msg
	subject string
	data    []byte
	seq     uint64
}

func (m *fakeMsg) Subject() string      { return m.subject }
func (m *fakeMsg) Headers() nats.Header { return nats.Header{} }
func (m *fakeMsg) Data() []byte         { return m.data }
func (m *fakeMsg) Metadata() (*jetstream.MsgMetadata, error) {
	return &jetstream.MsgMetadata{Stream: streams.Events, Sequence: jetstream.SequencePair{Stream: m.seq}, Timestamp: time.Unix(1_800_000_000, 0)}, nil
}

// The keying step publishes each partition's events in EVENTS' order: an event too
// large for an envelope goes after the envelope of the events read before it, an
// envelope that would pass max_payload is published and a new one begun.
func TestKeyerKeepsOrder(t *testing.T) {
	p := &pipeline{cfg: DefaultConfig(), m: newMetrics(nil), maxPayload: 64 << 10}
	p.cfg.Partitions = 2 // newKeyer makes none for one partition
	k, err := p.newKeyer()
	if err != nil {
		t.Fatal(err)
	}
	p.cfg.Partitions = 1 // then every event is in partition 0
	event := func(seq uint64, pad int) *fakeMsg {
		return &fakeMsg{subject: "events.shop.order", seq: seq,
			data: fmt.Appendf(nil, `{"id":"e-%d","source":"shop","type":"t","data":{"pad":%q}}`, seq, strings.Repeat("x", pad))}
	}
	var env envelopes
	env.reset(1, p.maxPayload)
	var published []uint64 // EVENTS sequences, in publish order
	publish := func(m *nats.Msg) error {
		if m.Header.Get(keyed.HeaderEnvelope) == "" {
			seq, _ := strconv.ParseUint(m.Header.Get(HeaderEventsSeq), 10, 64)
			published = append(published, seq)
			return nil
		}
		return keyed.Decode(m.Data, func(_ int, x keyed.Entry) bool { published = append(published, x.Seq); return true })
	}
	for seq, pad := range []int{10, 20_000, 20_000, 62_000, 10, 30_000, 10} {
		if err := k.key(event(uint64(seq+1), pad), &env, publish); err != nil {
			t.Fatal(err)
		}
	}
	if err := env.flushAll(publish); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(published); got != "[1 2 3 4 5 6 7]" {
		t.Fatalf("published in the order %s", got)
	}
}

// A checkpoint file the partition's state names is lost from the object store
// (each file the newest state names and the one before it does not): the next run
// restores the state before it, with the keys in memory and on disk (whose local
// copies of the tables would otherwise stand in for the lost objects: each run
// has a directory of its own), and with the files of the alert windows lost; the
// input after that state comes again and every event lands once.
func TestLostCheckpointFileFallsBack(t *testing.T) {
	for _, c := range []struct{ store, lose string }{{dedup.StoreMemory, "keys"}, {dedup.StoreDisk, "keys"}, {dedup.StoreMemory, "alert"}} {
		store := c.store
		t.Run(store+"/"+c.lose, func(t *testing.T) {
			f := setup(t)
			ctx := context.Background()
			worker := func(interval time.Duration) Config {
				cfg := testConfig(t, "a")
				cfg.Window.Store, cfg.DataDir, cfg.SnapshotInterval = store, t.TempDir(), interval
				return cfg
			}
			u1, i1, r1 := f.input(t, 1, 1000)
			stop := f.start(t, worker(100*time.Millisecond))
			f.waitFor(t, u1, i1, r1)
			stop()
			// With no periodic save, this run writes two states: at its start (the
			// keys of the first 1,000) and at its stop (the next 1,000's too).
			u2, i2, r2 := f.input(t, 1001, 1000)
			stop = f.start(t, worker(time.Hour))
			f.waitFor(t, u1+u2, i1+i2, r1+r2)
			stop()
			objects, kv := f.buckets(t)
			_, newest := f.claimState(t, kv)
			infos, err := objects.List(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var states []string
			for _, info := range infos {
				if strings.HasPrefix(info.Name, "state.0.") {
					states = append(states, info.Name)
				}
			}
			if len(states) != 2 {
				t.Fatalf("states %v, want the newest and the one before it", states)
			}
			before := states[0]
			if before == newest {
				before = states[1]
			}
			kept := map[string]bool{}
			for _, object := range stateFiles(t, objects, before, c.lose) {
				kept[object] = true
			}
			lost := 0
			for _, object := range stateFiles(t, objects, newest, c.lose) {
				if !kept[object] {
					if err := objects.Delete(ctx, object); err != nil {
						t.Fatal(err)
					}
					lost++
				}
			}
			if lost == 0 {
				t.Fatalf("state %s names no file that %s does not", newest, before)
			}
			t.Logf("deleted %d files of %s", lost, newest)
			u3, i3, r3 := f.input(t, 2001, 500)
			f.start(t, worker(100*time.Millisecond))
			f.waitFor(t, u1+u2+u3, i1+i2+i3, r1+r2+r3)
			f.check(t, u1+u2+u3, i1+i2+i3, r1+r2+r3)
		})
	}
}

// stateFiles is the objects of the checkpoint files state names: of its keys part
// (a disk checkpoint's files or the memory store's segments), or of its alert
// windows (what: "alert").
func stateFiles(t *testing.T, objects jetstream.ObjectStore, state, what string) []string {
	t.Helper()
	b, err := objects.GetBytes(context.Background(), state)
	if err != nil {
		t.Fatal(err)
	}
	n := binary.BigEndian.Uint32(b)
	keys := b[4+n:]
	var names []string
	if what == "alert" {
		var snap snapshot
		if err := json.Unmarshal(b[4:4+n], &snap); err != nil {
			t.Fatal(err)
		}
		for _, sg := range snap.AlertCheckpoint {
			names = append(names, sg.File.Object)
		}
		return names
	}
	switch {
	case bytes.HasPrefix(keys, diskMagic):
		var files []partition.File
		if err := json.Unmarshal(keys[len(diskMagic):], &files); err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			names = append(names, f.Object)
		}
	case bytes.HasPrefix(keys, memMagic):
		var segs []segment
		if err := json.Unmarshal(keys[len(memMagic):], &segs); err != nil {
			t.Fatal(err)
		}
		for _, s := range segs {
			names = append(names, s.File.Object)
		}
	default:
		t.Fatalf("state %s: its keys part begins %.8q", state, keys)
	}
	return names
}
