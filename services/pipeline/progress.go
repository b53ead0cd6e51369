package pipeline

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// progressPrefix, then the partition, keys each partition's Progress in Bucket.
const progressPrefix = "progress."

// Progress is what a partition's worker reports at each save of its state, for
// `sluice status`: where it is in its input, when its output was last known stored
// and its state saved, and how fast it went since the save before.
type Progress struct {
	Partition int `json:"partition"`
	// Worker saved it; Stream and Filter are its input (Filter empty: all of it).
	Worker string `json:"worker"`
	Stream string `json:"stream"`
	Filter string `json:"filter,omitempty"`
	// Seq is the last input sequence decided and stored.
	Seq uint64 `json:"seq"`
	// StoredAt is when every output up to Seq was last known stored; SavedAt is
	// when the state was saved.
	StoredAt time.Time `json:"stored_at"`
	SavedAt  time.Time `json:"saved_at"`
	// Rate is input messages a second between the save before and this one.
	Rate float64 `json:"rate"`
}

// reportProgress records the partition's progress after a save. A failure is only
// logged: status reads an older record, and the next save writes it again.
func (r *run) reportProgress(ctx context.Context, seq uint64, stored, saved time.Time) {
	p := Progress{Partition: r.in.id, Worker: r.cfg.Replica, Stream: r.in.stream, Filter: r.in.filter,
		Seq: seq, StoredAt: stored, SavedAt: saved}
	if prev := r.lastProgress; prev != nil && saved.After(prev.SavedAt) && seq >= prev.Seq {
		p.Rate = float64(seq-prev.Seq) / saved.Sub(prev.SavedAt).Seconds()
	}
	r.lastProgress = &p
	b, _ := json.Marshal(p)
	ctx, cancel := context.WithTimeout(ctx, r.cfg.LeaseTTL/3)
	defer cancel()
	if _, err := r.kv.Put(ctx, progressPrefix+strconv.Itoa(r.in.id), b); err != nil && ctx.Err() == nil {
		r.log.Warn("report progress", "partition", r.in.id, "err", err)
	}
}

// ReadProgress reads every partition's last reported progress from kv (the
// pipeline's bucket, Bucket), by partition.
func ReadProgress(ctx context.Context, kv jetstream.KeyValue) (map[int]Progress, error) {
	return readRecords[Progress](ctx, kv, progressPrefix, "progress")
}

// readRecords reads the JSON records under prefix+<partition> in kv, by partition.
func readRecords[T any](ctx context.Context, kv jetstream.KeyValue, prefix, what string) (map[int]T, error) {
	lister, err := kv.ListKeysFiltered(ctx, prefix+"*")
	if err != nil {
		return nil, fmt.Errorf("pipeline: %s: %w", what, err)
	}
	out := map[int]T{}
	for key := range lister.Keys() {
		e, err := kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("pipeline: %s %s: %w", what, key, err)
		}
		var v T
		if err := json.Unmarshal(e.Value(), &v); err != nil {
			return nil, fmt.Errorf("pipeline: %s %s: %w", what, key, err)
		}
		if n, err := strconv.Atoi(strings.TrimPrefix(key, prefix)); err == nil {
			out[n] = v
		}
	}
	return out, nil
}

// stallPrefix, then the partition, keys a partition's Stall in Bucket while its
// watchdog finds it stalled.
const stallPrefix = "stalled."

// Stall is a partition's watchdog report, for `sluice status`: which worker found
// it stalled, why, and since when. It is deleted when the partition moves again
// and when a run of it starts (a worker killed while stalled leaves its record to
// the next owner).
type Stall struct {
	Partition int       `json:"partition"`
	Worker    string    `json:"worker"`
	Reason    string    `json:"reason"`
	Since     time.Time `json:"since"`
}

// reportStall records (err set) or clears (nil) the partition's stall. A failure is
// only logged: /readyz and the gauge say it too.
func (r *run) reportStall(ctx context.Context, stalled error) {
	ctx, cancel := context.WithTimeout(ctx, r.cfg.LeaseTTL/3)
	defer cancel()
	key := stallPrefix + strconv.Itoa(r.in.id)
	var err error
	if stalled == nil {
		err = r.kv.Delete(ctx, key)
	} else {
		b, _ := json.Marshal(Stall{Partition: r.in.id, Worker: r.cfg.Replica, Reason: stalled.Error(), Since: time.Now().UTC()})
		_, err = r.kv.Put(ctx, key, b)
	}
	if err != nil && ctx.Err() == nil {
		r.log.Warn("report stall", "partition", r.in.id, "err", err)
	}
}

// ReadStalls reads the partitions' stall records from kv (the pipeline's bucket,
// Bucket), by partition.
func ReadStalls(ctx context.Context, kv jetstream.KeyValue) (map[int]Stall, error) {
	return readRecords[Stall](ctx, kv, stallPrefix, "stall")
}
