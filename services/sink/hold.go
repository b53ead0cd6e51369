package sink

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// Hold is a hold on one month of the events table (a row of events_holds): while
// it lasts, every insert through a fence (InsertEventsFenced) that has a row of
// the month fails, and its writer retries it. It lasts until the `until` of its
// last row (server time), which Renew moves on and Release ends: a hold whose
// holder died ends by itself.
type Hold struct {
	Month uint32
	ID    string
	ch    driver.Conn
	ttl   time.Duration
}

// heldMonth is in the error of an insert into a held month (migration 0004's
// view raises it).
const heldMonth = "this month is held while sluice replay swaps its rows"

var holdID = regexp.MustCompile(`^[-_a-zA-Z0-9]+$`)

// HoldMonth records a hold on month (YYYYMM) for ttl, then waits until the fenced
// inserts that were running before it are over (they may have passed the check
// before the hold was there): from then on no row of the month is added through
// a fence until the hold ends.
func HoldMonth(ctx context.Context, ch driver.Conn, month uint32, id string, ttl time.Duration) (*Hold, error) {
	return HoldMonthOn(ctx, ch, nil, month, id, ttl)
}

// HoldMonthOn is HoldMonth on a shard of a cluster: ch reaches the shard (any
// replica), replicas each of its replicas. Once the hold is recorded, every
// replica is made to fetch it (SYSTEM SYNC REPLICA: from then on its view refuses
// the month's fenced inserts) and is waited on for the fenced inserts it was
// running before. Every replica must answer: one that is down could take an insert
// of the month once back, before it has fetched the hold, and the swap would drop
// that insert's rows; so a replica that does not is an error (the hold is
// released). replicas nil: one server, ch.
func HoldMonthOn(ctx context.Context, ch driver.Conn, replicas []driver.Conn, month uint32, id string, ttl time.Duration) (*Hold, error) {
	if !holdID.MatchString(id) {
		return nil, fmt.Errorf("hold %d: id %q: want letters, digits, '-' and '_'", month, id)
	}
	h := &Hold{Month: month, ID: id, ch: ch, ttl: ttl}
	if err := h.set(ctx, ttl); err != nil {
		return nil, err
	}
	fail := func(err error) (*Hold, error) {
		_ = h.Release(context.WithoutCancel(ctx))
		return nil, err
	}
	waitOn := []driver.Conn{ch}
	if replicas != nil {
		waitOn = replicas
		for i, rc := range replicas {
			sctx, cancel := context.WithTimeout(ctx, ttl/3)
			err := rc.Exec(sctx, "SYSTEM SYNC REPLICA events_holds")
			cancel()
			if err != nil {
				return fail(fmt.Errorf("hold %d: replica %d of the shard did not fetch the hold (every replica must, or it could take the month's rows during the swap): %w", month, i+1, err))
			}
		}
	}
	// One replay at a time: two swapping at once would each swap in a shadow made
	// before the other's swap (undoing it), and one's restart of the table's merges
	// could come in the middle of the other's swap. Each run records its hold before
	// it looks (after every replica fetched it, on a cluster), so of two that start
	// together one sees the other at least.
	others, err := otherHolds(ctx, ch, id)
	if err != nil {
		return fail(fmt.Errorf("hold %d: %w", month, err))
	}
	if len(others) > 0 {
		return fail(fmt.Errorf("hold %d: another sluice replay holds %s (one at a time; the hold of a run that died ends by itself within its --hold-ttl)", month, strings.Join(others, ", ")))
	}
	held := time.Now()
	var db string
	if err := ch.QueryRow(ctx, "SELECT currentDatabase()").Scan(&db); err != nil {
		return fail(fmt.Errorf("hold %d: %w", month, err))
	}
	like := escapeLike("sluice/"+db+"/p") + "%"
	for {
		// Running since before the hold was recorded (fetched, on a cluster):
		// longer than the time since.
		var running uint64
		for _, c := range waitOn {
			var n uint64
			err := c.QueryRow(ctx, "SELECT count() FROM system.processes WHERE query_id LIKE ? AND elapsed >= ?", like, time.Since(held).Seconds()).Scan(&n)
			if err != nil {
				return fail(fmt.Errorf("hold %d: running inserts: %w", month, err))
			}
			running += n
		}
		if running == 0 {
			return h, nil
		}
		select {
		case <-ctx.Done():
			return fail(fmt.Errorf("hold %d: %d inserts begun before it still running: %w", month, running, ctx.Err()))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// otherHolds are the holds in force other than id's: "month M (hold H)".
func otherHolds(ctx context.Context, ch driver.Conn, id string) ([]string, error) {
	rows, err := ch.Query(ctx, "SELECT month, hold FROM ("+holdsInForce+") WHERE hold != ? ORDER BY month, hold", id)
	if err != nil {
		return nil, fmt.Errorf("holds in force: %w", err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var (
			month uint32
			hold  string
		)
		if err := rows.Scan(&month, &hold); err != nil {
			return nil, fmt.Errorf("holds in force: %w", err)
		}
		out = append(out, fmt.Sprintf("month %d (hold %s)", month, hold))
	}
	return out, rows.Err()
}

// holdsInForce is each hold in force (month, hold): its newest row's until is ahead.
const holdsInForce = "SELECT month, hold FROM events_holds GROUP BY month, hold HAVING argMax(until, seq) > now()"

// HeldMonthsQuery is the months (YYYYMM) held now, sorted, as one array.
const HeldMonthsQuery = "SELECT arraySort(groupUniqArray(month)) FROM (" + holdsInForce + ")"

// HeldMonths returns the months held now on ch's server.
func HeldMonths(ctx context.Context, ch driver.Conn) ([]uint32, error) {
	var months []uint32
	if err := ch.QueryRow(ctx, HeldMonthsQuery).Scan(&months); err != nil {
		return nil, fmt.Errorf("held months: %w", err)
	}
	return months, nil
}

// Renew makes the hold last ttl from now (server time).
func (h *Hold) Renew(ctx context.Context) error { return h.set(ctx, h.ttl) }

// Release ends the hold.
func (h *Hold) Release(ctx context.Context) error { return h.set(ctx, 0) }

// set records the hold's end, ttl from now on the server's clock (0: now, which
// ends it), as its newest row.
func (h *Hold) set(ctx context.Context, ttl time.Duration) error {
	until := "toDateTime(0)"
	if ttl > 0 {
		until = "now() + " + strconv.Itoa(int((ttl+time.Second-1)/time.Second))
	}
	q := fmt.Sprintf("INSERT INTO events_holds (month, hold, until, seq) SELECT %d, '%s', %s, %d", h.Month, h.ID, until, time.Now().UnixNano())
	if err := h.ch.Exec(ctx, q); err != nil {
		return fmt.Errorf("hold %d: %w", h.Month, err)
	}
	return nil
}
