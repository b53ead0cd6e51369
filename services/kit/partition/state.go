package partition

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// States keeps the saved states of one claim in an object store. Each save is an
// object of its own, named by the claim's generation and a count, and the claim
// (compare-and-set) then points at it: a worker that lost the partition can write
// an object, never the pointer. The state before the newest stays, for a restore
// that cannot read the newest (Load) or restore it (Older); older ones are deleted.
//
// Saves are one at a time; Load comes before the first.
type States struct {
	store jetstream.ObjectStore
	claim *Claim
	// prefix names the objects: <prefix>.<partition>.<gen>.<n>.
	prefix string
	log    *slog.Logger
	saves  int
	// pruned: the claim's older states were listed and deleted once; older is the
	// state before the previous one, deleted at the next save; unsure are states
	// whose save failed in a way that may have written them (a timeout, a stop),
	// deleted once a later save succeeds.
	pruned bool
	older  string
	unsure []string
	// loaded is the state Load (or Older) returned; fellBack tells that it is not
	// the one the claim points at and no save succeeded since: the first keeps it
	// as the state before it, and deletes the claim's.
	loaded   string
	fellBack bool
}

// NewStates keeps claim's states in store as objects named prefix.<partition>.<gen>.<n>.
func NewStates(store jetstream.ObjectStore, claim *Claim, prefix string, log *slog.Logger) *States {
	return &States{store: store, claim: claim, prefix: prefix, log: log}
}

// name is the object of save n under claim generation gen.
func (s *States) name(gen uint64, n int) string {
	return fmt.Sprintf("%s.%d.%d.%d", s.prefix, s.claim.Partition, gen, n)
}

// parse is name's inverse; ok is false for another partition's or prefix's name.
func (s *States) parse(name string) (gen uint64, n int, ok bool) {
	var p int
	if _, err := fmt.Sscanf(name[min(len(name), len(s.prefix)):], ".%d.%d.%d", &p, &gen, &n); err != nil ||
		p != s.claim.Partition || s.name(gen, n) != name {
		return 0, 0, false
	}
	return gen, n, true
}

// list lists the partition's state objects, newest (highest generation, then
// save number) first.
func (s *States) list(ctx context.Context) ([]string, error) {
	infos, err := s.store.List(ctx)
	if errors.Is(err, jetstream.ErrNoObjectsFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	type state struct {
		name string
		gen  uint64
		n    int
	}
	var states []state
	for _, info := range infos {
		if gen, n, ok := s.parse(info.Name); ok {
			states = append(states, state{info.Name, gen, n})
		}
	}
	slices.SortFunc(states, func(a, b state) int {
		if c := cmp.Compare(b.gen, a.gen); c != 0 {
			return c
		}
		return cmp.Compare(b.n, a.n)
	})
	names := make([]string, len(states))
	for i, st := range states {
		names[i] = st.name
	}
	return names, nil
}

// olderThan reads the newest of the partition's states older than name that can
// be read.
func (s *States) olderThan(ctx context.Context, name string) (string, []byte, error) {
	names, err := s.list(ctx)
	if err != nil {
		return "", nil, err
	}
	gen, n, _ := s.parse(name)
	for _, candidate := range names {
		cg, cn, _ := s.parse(candidate)
		if cg > gen || (cg == gen && cn >= n) {
			continue
		}
		if b, err := s.store.GetBytes(ctx, candidate); err == nil {
			return candidate, b, nil
		}
	}
	return "", nil, nil
}

// Load reads the state the claim points at, or, when it has none, the object
// legacy (if not empty: the one state of releases before partitions). It returns
// nil when there is none. A state the claim points at that cannot be read (lost,
// or its digest wrong) is replaced by the newest older one that can, with a
// warning: the input after that one comes again, and its owner finds what was
// stored already.
func (s *States) Load(ctx context.Context, legacy string) ([]byte, error) {
	s.loaded, s.fellBack = "", false
	name := s.claim.State()
	if name == "" {
		name = legacy
	}
	if name == "" {
		return nil, nil
	}
	b, err := s.store.GetBytes(ctx, name)
	if (errors.Is(err, jetstream.ErrObjectNotFound) || errors.Is(err, jetstream.ErrDigestMismatch)) && name != legacy {
		if older, ob, oerr := s.olderThan(ctx, name); oerr == nil && older != "" {
			s.log.Warn("the partition's state cannot be read; restoring the one before it", "partition", s.claim.Partition, "state", name, "err", err, "older", older)
			b, err = ob, nil
			name, s.fellBack = older, true
		}
	}
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		if name != legacy {
			return nil, fmt.Errorf("partition %d's state %s is missing", s.claim.Partition, name)
		}
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read partition %d's state %s: %w", s.claim.Partition, name, err)
	}
	s.loaded = name
	return b, nil
}

// Older reads the newest state older than the one Load returned that can be
// read, for a state that reads but cannot be restored (a checkpoint file it names
// is lost), and returns it in its place: the input after it comes again, as after
// a state Load cannot read. It returns nil when there is none.
func (s *States) Older(ctx context.Context) (string, []byte, error) {
	if s.loaded == "" {
		return "", nil, nil
	}
	name, b, err := s.olderThan(ctx, s.loaded)
	if err != nil {
		return "", nil, fmt.Errorf("partition %d's older states: %w", s.claim.Partition, err)
	}
	if name != "" {
		s.loaded, s.fellBack = name, true
	}
	return name, b, nil
}

// Save writes state as a new object and points the claim at it (ErrLost when
// another worker took the partition over), then deletes the states before the
// previous one.
func (s *States) Save(ctx context.Context, state io.Reader) error {
	if err := s.claim.Valid(); err != nil {
		return err
	}
	prev := s.claim.State()
	if s.fellBack {
		// The claim's state could not be restored: the one restored instead stays
		// as the state before this one, and the claim's goes once this save is in
		// (as the states of failed saves do).
		s.unsure = append(s.unsure, prev)
		prev = s.loaded
	}
	s.saves++
	name := s.name(s.claim.Gen, s.saves)
	if _, err := s.store.Put(ctx, jetstream.ObjectMeta{Name: name}, state); err != nil {
		s.unsure = append(s.unsure, name)
		return fmt.Errorf("save state: %w", err)
	}
	if err := s.claim.SetState(ctx, name); err != nil {
		// Only a refused compare-and-set says the claim does not point at name. A
		// write that timed out or was cancelled may have been applied: name may be
		// the partition's state now, and stays until a later save succeeds (which,
		// finding this write applied, carries on from it: Claim.write).
		if errors.Is(err, ErrLost) {
			_ = s.store.Delete(context.WithoutCancel(ctx), name)
		} else {
			s.unsure = append(s.unsure, name)
		}
		return fmt.Errorf("save state: %w", err)
	}
	s.prune(ctx, name, prev)
	s.fellBack = false
	return nil
}

// prune deletes the partition's state objects but keep and prev; at the first
// save it lists them all (an owner that ended abruptly may have left some), after
// that it deletes the one before prev and those of failed saves.
func (s *States) prune(ctx context.Context, keep, prev string) {
	// Cleanup that a stop must not cut short: a delete cancelled halfway would leave
	// a state no later save deletes.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	var drop []string
	if !s.pruned {
		names, err := s.list(ctx)
		if err != nil {
			s.log.Warn("list the older states", "partition", s.claim.Partition, "err", err)
			return
		}
		for _, name := range names {
			if name != keep && name != prev {
				drop = append(drop, name)
			}
		}
		s.pruned = true
	} else if s.older != "" && s.older != keep && s.older != prev {
		drop = []string{s.older}
	}
	for _, name := range s.unsure {
		if name != keep && name != prev && !slices.Contains(drop, name) {
			drop = append(drop, name)
		}
	}
	s.older, s.unsure = prev, nil
	for _, name := range drop {
		if err := s.store.Delete(ctx, name); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
			s.log.Warn("delete an older state", "object", name, "err", err)
		}
	}
}
