package oracle

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// Counts is what the tables hold.
type Counts struct {
	Events, UniqueKeys, DeadLetters uint64
}

// ReadCounts reads the row counts with plain queries (no FINAL).
func ReadCounts(ctx context.Context, conn driver.Conn) (Counts, error) {
	var c Counts
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(key) FROM events").Scan(&c.Events, &c.UniqueKeys); err != nil {
		return c, fmt.Errorf("count events: %w", err)
	}
	if err := conn.QueryRow(ctx, "SELECT count() FROM dead_letters").Scan(&c.DeadLetters); err != nil {
		return c, fmt.Errorf("count dead_letters: %w", err)
	}
	return c, nil
}

// Check compares the tables with the manifest: every unique event exactly once,
// every invalid input in dead_letters with a reason, nothing else.
func (m *Manifest) Check(ctx context.Context, conn driver.Conn) error {
	var errs []error
	c, err := ReadCounts(ctx, conn)
	if err != nil {
		return err
	}
	if c.Events != uint64(len(m.Events)) || c.UniqueKeys != uint64(len(m.Events)) {
		errs = append(errs, fmt.Errorf("events: count()=%d uniqExact(key)=%d, want %d unique events exactly once", c.Events, c.UniqueKeys, len(m.Events)))
	}
	// Events with ids: the exact set of (source, id).
	want := map[string]int{}
	noID := 0
	for _, e := range m.Events {
		if e.ID == "" {
			noID++
			continue
		}
		want[e.Source+"/"+e.ID]++
	}
	rows, err := conn.Query(ctx, "SELECT source, id FROM events")
	if err != nil {
		return fmt.Errorf("read events: %w", err)
	}
	got := map[string]int{}
	gotNoID := 0
	for rows.Next() {
		var source, id string
		if err := rows.Scan(&source, &id); err != nil {
			rows.Close()
			return err
		}
		if id == "" {
			gotNoID++
			continue
		}
		got[source+"/"+id]++
	}
	rows.Close()
	var missing, extra, doubled []string
	for k := range want {
		switch got[k] {
		case 0:
			missing = append(missing, k)
		case 1:
		default:
			doubled = append(doubled, k)
		}
	}
	for k := range got {
		if want[k] == 0 {
			extra = append(extra, k)
		}
	}
	if len(missing)+len(extra)+len(doubled) > 0 {
		errs = append(errs, fmt.Errorf("events: %d missing %v, %d unexpected %v, %d more than once %v",
			len(missing), head(missing), len(extra), head(extra), len(doubled), head(doubled)))
	}
	if gotNoID != noID {
		errs = append(errs, fmt.Errorf("events without id: %d rows, want %d", gotNoID, noID))
	}
	// Dead letters: the exact multiset of payloads, each with a reason.
	rows, err = conn.Query(ctx, "SELECT payload, reason, stage FROM dead_letters")
	if err != nil {
		return fmt.Errorf("read dead_letters: %w", err)
	}
	var gotDL []string
	for rows.Next() {
		var payload, reason, stage string
		if err := rows.Scan(&payload, &reason, &stage); err != nil {
			rows.Close()
			return err
		}
		if reason == "" || stage == "" {
			errs = append(errs, fmt.Errorf("dead letter %q has reason %q, stage %q", payload, reason, stage))
		}
		gotDL = append(gotDL, payload)
	}
	rows.Close()
	// Each invalid input once; one published again without a Nats-Msg-Id after an
	// unacknowledged attempt (MayRepeat) may have been stored, and dead-lettered, once
	// per attempt.
	count := map[string]int{}
	for _, p := range gotDL {
		count[p]++
	}
	wantDL := map[string]int{}
	for _, p := range m.Invalid {
		wantDL[string(p)]++
	}
	var wrong []string
	for p, n := range wantDL {
		if got := count[p]; got < n || got > n+m.MayRepeat[p] {
			wrong = append(wrong, fmt.Sprintf("%.60q: %d, want %d (+%d)", p, got, n, m.MayRepeat[p]))
		}
	}
	for p := range count {
		if wantDL[p] == 0 {
			wrong = append(wrong, fmt.Sprintf("%.60q: %d, want none", p, count[p]))
		}
	}
	if len(wrong) > 0 {
		errs = append(errs, fmt.Errorf("dead_letters: %d payloads, want the %d invalid inputs; differing: %v", len(gotDL), len(m.Invalid), head(wrong)))
	}
	return errors.Join(errs...)
}

func head(s []string) []string {
	slices.Sort(s)
	if len(s) > 5 {
		return s[:5]
	}
	return s
}

// WaitFor polls cond every 100 ms until it returns nil or timeout passes, and
// returns its last error.
func WaitFor(ctx context.Context, timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}
