package partition_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/sluicehq/sluice/services/kit/partition"
)

// A claim's states: each save a new object the claim points at, the one before
// kept, older ones deleted; a state that cannot be read gives way to the one
// before it; a worker whose claim was taken over writes no pointer and leaves no
// object.
func TestStates(t *testing.T) {
	ctx := context.Background()
	kv, store, c := claimed(t, "test_states")
	log := slog.New(slog.DiscardHandler)
	names := func() []string { return objectNames(t, store) }
	// A leftover of another owner, and a legacy object.
	if _, err := store.PutString(ctx, "state.0.1.7", "left over"); err != nil {
		t.Fatal(err)
	}
	if _, err := store.PutString(ctx, "legacy", "legacy state"); err != nil {
		t.Fatal(err)
	}
	s := partition.NewStates(store, c, "state", log)
	if b, err := s.Load(ctx, ""); err != nil || b != nil {
		t.Fatalf("a claim with no state loads %q, %v; want nothing", b, err)
	}
	if b, err := s.Load(ctx, "legacy"); err != nil || string(b) != "legacy state" {
		t.Fatalf("with a legacy object: %q, %v", b, err)
	}
	for _, v := range []string{"one", "two", "three"} {
		if err := s.Save(ctx, strings.NewReader(v)); err != nil {
			t.Fatal(err)
		}
	}
	gen := c.Gen
	want := []string{"legacy", stateName(gen, 2), stateName(gen, 3)}
	slices.Sort(want)
	if got := names(); !slices.Equal(got, want) {
		t.Fatalf("objects after three saves: %q, want %q", got, want)
	}
	if c.State() != stateName(gen, 3) {
		t.Fatalf("the claim points at %q", c.State())
	}
	if b, err := s.Load(ctx, ""); err != nil || string(b) != "three" {
		t.Fatalf("load: %q, %v", b, err)
	}
	// The newest lost: the one before it.
	if err := store.Delete(ctx, stateName(gen, 3)); err != nil {
		t.Fatal(err)
	}
	if b, err := s.Load(ctx, ""); err != nil || string(b) != "two" {
		t.Fatalf("the newest state lost, load: %q, %v; want the one before", b, err)
	}
	// Taken over behind this worker's back: its next save fails and leaves nothing.
	e, err := kv.Get(ctx, "partition.0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Update(ctx, "partition.0", e.Value(), e.Revision()); err != nil {
		t.Fatal(err)
	}
	before := names()
	if err := s.Save(ctx, bytes.NewReader([]byte("late"))); !errors.Is(err, partition.ErrLost) {
		t.Fatalf("a save after the claim moved: %v, want ErrLost", err)
	}
	if got := names(); !slices.Equal(got, before) {
		t.Fatalf("a refused save left objects: %q, before %q", got, before)
	}
}

func stateName(gen uint64, n int) string {
	return "state.0." + strconv.FormatUint(gen, 10) + "." + strconv.Itoa(n)
}

// A state that loads but cannot be restored (a file it names is lost) gives way to
// the one before it (Older); the next save keeps that one as the state before it
// and deletes the one that could not be restored.
func TestStatesOlder(t *testing.T) {
	ctx := context.Background()
	_, store, c := claimed(t, "test_states_older")
	log := slog.New(slog.DiscardHandler)
	s := partition.NewStates(store, c, "state", log)
	for _, v := range []string{"one", "two", "three"} {
		if err := s.Save(ctx, strings.NewReader(v)); err != nil {
			t.Fatal(err)
		}
	}
	gen := c.Gen
	// The next run of the ownership.
	if b, err := s.Load(ctx, ""); err != nil || string(b) != "three" {
		t.Fatalf("load: %q, %v", b, err)
	}
	name, b, err := s.Older(ctx)
	if err != nil || name != stateName(gen, 2) || string(b) != "two" {
		t.Fatalf("older: %s %q, %v; want %s", name, b, err, stateName(gen, 2))
	}
	if name, b, err := s.Older(ctx); err != nil || name != "" || b != nil {
		t.Fatalf("older than the oldest: %s %q, %v; want none", name, b, err)
	}
	if err := s.Save(ctx, strings.NewReader("four")); err != nil {
		t.Fatal(err)
	}
	want := []string{stateName(gen, 2), stateName(gen, 4)}
	if got := objectNames(t, store); !slices.Equal(got, want) {
		t.Fatalf("objects after the save: %q, want %q (the new one and the one restored)", got, want)
	}
	// The run after: the claim's state, and the one before it is the one restored.
	if b, err := s.Load(ctx, ""); err != nil || string(b) != "four" {
		t.Fatalf("load: %q, %v", b, err)
	}
	if name, _, err := s.Older(ctx); err != nil || name != stateName(gen, 2) {
		t.Fatalf("older: %s, %v; want %s", name, err, stateName(gen, 2))
	}
}
