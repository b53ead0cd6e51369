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
	lister, err := kv.ListKeysFiltered(ctx, progressPrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("pipeline: progress: %w", err)
	}
	out := map[int]Progress{}
	for key := range lister.Keys() {
		e, err := kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("pipeline: progress %s: %w", key, err)
		}
		var p Progress
		if err := json.Unmarshal(e.Value(), &p); err != nil {
			return nil, fmt.Errorf("pipeline: progress %s: %w", key, err)
		}
		if n, err := strconv.Atoi(strings.TrimPrefix(key, progressPrefix)); err == nil {
			out[n] = p
		}
	}
	return out, nil
}
