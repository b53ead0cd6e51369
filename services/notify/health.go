package notify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// failingPrefix, then a receiver's name, keys its Failing record in StateBucket
// while deliveries to it fail and are retried.
const failingPrefix = "failing."

// Failing is a receiver that is being retried (backing off): since when, how many
// attempts failed, and the last error.
type Failing struct {
	Since    time.Time `json:"since"`
	Attempts int       `json:"attempts"`
	Error    string    `json:"error"`
	At       time.Time `json:"at"`
}

// ReceiverHealth is what StateBucket says of a receiver: disabled (after 410), or
// failing (retried), or neither.
type ReceiverHealth struct {
	Disabled string   `json:"disabled,omitempty"`
	Failing  *Failing `json:"failing,omitempty"`
}

// ReadReceivers reads the disabled and failing receivers from kv (StateBucket), by
// name.
func ReadReceivers(ctx context.Context, kv jetstream.KeyValue) (map[string]ReceiverHealth, error) {
	lister, err := kv.ListKeysFiltered(ctx, "disabled.*", failingPrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("notify: receivers: %w", err)
	}
	out := map[string]ReceiverHealth{}
	for key := range lister.Keys() {
		e, err := kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("notify: receiver %s: %w", key, err)
		}
		kind, name, _ := strings.Cut(key, ".")
		h := out[name]
		if kind == "disabled" {
			h.Disabled = string(e.Value())
		} else {
			var f Failing
			if err := json.Unmarshal(e.Value(), &f); err != nil {
				return nil, fmt.Errorf("notify: receiver %s: %w", key, err)
			}
			h.Failing = &f
		}
		out[name] = h
	}
	return out, nil
}

// failed records a failed delivery attempt that will be retried.
func (d *deliverer) failed(ctx context.Context, err error) {
	now := time.Now().UTC()
	d.mu.Lock()
	if d.failing == nil {
		d.failing = &Failing{Since: now}
	}
	d.failing.Attempts++
	d.failing.Error, d.failing.At = err.Error(), now
	b, _ := json.Marshal(d.failing)
	d.mu.Unlock()
	if _, perr := d.state.Put(ctx, failingPrefix+d.rc.Name, b); perr != nil && ctx.Err() == nil {
		d.log.Warn("record the receiver's failure", "receiver", d.rc.Name, "err", perr)
	}
}

// delivered clears the failing record after a delivery, if this deliverer made one.
func (d *deliverer) delivered(ctx context.Context) {
	d.mu.Lock()
	was := d.failing != nil
	d.failing = nil
	d.mu.Unlock()
	if was {
		if err := d.state.Delete(ctx, failingPrefix+d.rc.Name); err != nil && ctx.Err() == nil {
			d.log.Warn("clear the receiver's failure", "receiver", d.rc.Name, "err", err)
		}
	}
}
