package sink

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/ClickHouse/clickhouse-go/v2/lib/proto"
)

// Fence is one ownership of a partition as ClickHouse sees it: the generation of
// the claim (a NATS KV revision, higher for every later owner) recorded in
// partition_fences. Events inserted through it (InsertEventsFenced) go into
// events_fenced, whose materialized view stores them in events only while Gen is
// the partition's newest generation: once a later owner recorded its own, what this
// one still sends is dropped by the server, however late it arrives.
//
// Every insert made through a Fence carries a query id naming the database,
// partition and generation, so that the next owner can wait (in NewFence) for the
// inserts that were already running when it recorded its generation: those passed
// the filter before the new row was there.
type Fence struct {
	Partition uint32
	Gen       uint64
	// db is the database; prefix of this partition's query ids
	// (sluice/<database>/p<partition>/), and the number of the next one.
	db     string
	prefix string
	n      atomic.Uint64
	// servers are the shard's servers, every replica (or the one server) whether
	// it answered at the fence or not: where the fence's inserts may run.
	servers []driver.Conn
	// tokens: every server of the shard takes insert_deduplication_token
	// (ClickHouse 22.2+), so each events insert through the fence carries one,
	// made from its rows (token).
	tokens bool
}

// tokenSince is the first ClickHouse release that takes insert_deduplication_token.
var tokenSince = proto.Version{Major: 22, Minor: 2}

// takeTokens reports whether each of conns' servers takes
// insert_deduplication_token; false when one does not answer (it may be older).
func takeTokens(conns []driver.Conn) bool {
	for _, c := range conns {
		v, err := c.ServerVersion()
		if err != nil || v.Version.Major < tokenSince.Major || (v.Version.Major == tokenSince.Major && v.Version.Minor < tokenSince.Minor) {
			return false
		}
	}
	return true
}

// token is the insert_deduplication_token of an insert of c's rows through f: the
// database, partition and generation, and a hash of the rows' stream sequences
// and keys. An insert of the same rows by the same owner (a retry) has the same
// token, so the server stores it once however many times it arrives; any other
// insert has another.
func (f *Fence) token(c *EventColumns) string {
	h := sha256.New()
	var b [8]byte
	for i := range c.Len() {
		binary.BigEndian.PutUint64(b[:], c.seq[i])
		h.Write(b[:])
		binary.BigEndian.PutUint64(b[:], uint64(len(c.str[0][i])))
		h.Write(b[:])
		h.Write([]byte(c.str[0][i]))
	}
	return f.prefix + "g" + strconv.FormatUint(f.Gen, 10) + "/" + hex.EncodeToString(h.Sum(nil)[:16])
}

// FenceTable is the table of the partitions' generations; fencedEvents the Null
// table whose materialized view passes the rows of the newest ones to events.
const (
	FenceTable   = "partition_fences"
	fencedEvents = "events_fenced"
)

// fenceFilter keeps the rows of each partition's newest generation (the same
// condition as events_fence's, in migration 0004).
const fenceFilter = "(partition, gen) IN (SELECT partition, max(gen) FROM " + FenceTable + " GROUP BY partition)"

var fenceTable = &Table{Name: FenceTable, Columns: []Column{{"partition", "UInt32"}, {"gen", "UInt64"}, {"worker", "String"}}}

// NewFence records gen as partition's newest generation, then waits, up to settle,
// until no insert of the partition is running in the server, and returns how many
// still are, of any generation: an insert that passed the filter before gen was
// recorded may still be writing its rows, so the caller's high-water mark must
// wait for it. gen must be higher than every generation of the partition's earlier
// writers, earlier runs of the same owner too (partition.Claim.NextGeneration):
// with the same generation, an insert of the run before a stall restart that
// reaches the server late would pass the filter beside the new run's rows.
//
// An insert's rows pass the filter, or not, when the server has all of them (the
// blocks of one insert are squashed into one), and are stored just after. So an
// insert still receiving data when the generation is recorded will be dropped, and
// one past that point is stored within moments: once the wait is over, the table's
// high-water mark, read next by the caller, is final for every earlier owner. The
// server cannot tell the two apart, nor kill an insert that waits for data (18.16),
// so an earlier owner stalled in the middle of sending one (a paused process, a
// cut network) is waited for only until settle, and its insert is dropped when it
// ends.
//
// NewFence fails when the table holds a newer generation than gen: another owner
// took the partition over meanwhile, or the claims' KV bucket was made anew and its
// revisions began again (then every insert would be dropped; the error says what to
// do).
func NewFence(ctx context.Context, ch driver.Conn, partition uint32, gen uint64, worker string, settle time.Duration) (f *Fence, running uint64, err error) {
	f, running, _, err = NewFenceOn(ctx, ch, nil, partition, gen, worker, settle)
	return f, running, err
}

// NewFenceOn is NewFence on a shard of a cluster: ch reaches the shard (any
// replica), replicas each of its replicas. Once the generation is recorded, each
// replica is made to fetch it (SYSTEM SYNC REPLICA: from then on its view drops
// the earlier owners' rows too) and is waited on for the earlier owners' running
// inserts. A replica that does not answer within settle is left out and counted
// in unreached: it takes no insert while down, but once back it may take an
// earlier owner's insert before it has fetched the new generation
// (docs/exactly-once.md). replicas nil: one server, ch.
func NewFenceOn(ctx context.Context, ch driver.Conn, replicas []driver.Conn, partition uint32, gen uint64, worker string, settle time.Duration) (f *Fence, running uint64, unreached int, err error) {
	var db string
	if err := ch.QueryRow(ctx, "SELECT currentDatabase()").Scan(&db); err != nil {
		return nil, 0, 0, fmt.Errorf("fence partition %d: %w", partition, err)
	}
	f = &Fence{Partition: partition, Gen: gen, db: db, prefix: "sluice/" + db + "/p" + strconv.FormatUint(uint64(partition), 10) + "/"}
	if err := Insert(ctx, ch, fenceTable, [][]any{{partition, gen, worker}}); err != nil {
		return nil, 0, 0, fmt.Errorf("fence partition %d: record generation %d: %w", partition, gen, err)
	}
	var newest uint64
	if err := ch.QueryRow(ctx, "SELECT max(gen) FROM "+FenceTable+" WHERE partition = ?", partition).Scan(&newest); err != nil {
		return nil, 0, 0, fmt.Errorf("fence partition %d: %w", partition, err)
	}
	if newest != gen {
		return nil, 0, 0, fmt.Errorf("fence partition %d: %s records generation %d, newer than this claim's %d: another worker owns the partition now, or the pipeline's KV bucket was made anew and its revisions began again (then, with every worker stopped, run `ALTER TABLE %s DELETE WHERE partition = %d`; docs/exactly-once.md)",
			partition, FenceTable, newest, gen, FenceTable, partition)
	}
	f.servers = []driver.Conn{ch}
	if replicas != nil {
		f.servers = replicas
	}
	waitOn := []driver.Conn{ch}
	if replicas != nil {
		waitOn = nil
		for _, rc := range replicas {
			sctx, cancel := context.WithTimeout(ctx, settle)
			err := rc.Exec(sctx, "SYSTEM SYNC REPLICA "+FenceTable)
			cancel()
			if err != nil {
				if ctx.Err() != nil {
					return nil, 0, 0, fmt.Errorf("fence partition %d: %w", partition, ctx.Err())
				}
				unreached++
				continue
			}
			waitOn = append(waitOn, rc)
		}
	}
	if running, err = f.waitInserts(ctx, waitOn, settle); err != nil {
		return nil, 0, 0, err
	}
	f.tokens = unreached == 0 && takeTokens(waitOn)
	return f, running, unreached, nil
}

// ErrFenced is Check's error: a newer generation of the partition is recorded, so
// this run's inserts store nothing.
var ErrFenced = errors.New("a newer generation of the partition is recorded")

// Check returns ErrFenced (wrapped) when a server of the shard records a newer
// generation of f's partition than f's: since it did, this run's inserts are
// dropped by the filter and stored by nobody, though the server answered them.
// Within one NATS the claim says so first; a newer generation the claim does not
// know of is another platform writing to this database (a second NATS, a second
// `sluice up` finding the same ClickHouse). A caller checks before it records its
// position as stored. A server that does not answer is left out; none answering
// is an error.
func (f *Fence) Check(ctx context.Context) error {
	var newest uint64
	var answered int
	var last error
	for _, c := range f.servers {
		var n uint64
		if err := c.QueryRow(ctx, "SELECT max(gen) FROM "+FenceTable+" WHERE partition = ?", f.Partition).Scan(&n); err != nil {
			last = err
			continue
		}
		answered++
		newest = max(newest, n)
	}
	if answered == 0 {
		return fmt.Errorf("partition %d: check its fence: %w", f.Partition, last)
	}
	if newest > f.Gen {
		return fmt.Errorf("%s records generation %d of partition %d, newer than this run's %d, and the inserts since store nothing: %w "+
			"(within one NATS another worker took the partition over; otherwise another platform, with a NATS of its own, writes to this ClickHouse database: give each platform a database of its own, CLICKHOUSE_DATABASE)",
			FenceTable, newest, f.Partition, f.Gen, ErrFenced)
	}
	return nil
}

// WaitInserts waits, up to settle, until no insert of f's partition (any
// generation, combined ones too) runs in any server of its shard, and returns how
// many still do. A writer whose insert failed without an answer (a timeout: the
// server may have all its rows and store them yet) waits with it before it looks
// for the rows that insert stored, or it could miss them and store them twice.
func (f *Fence) WaitInserts(ctx context.Context, settle time.Duration) (running uint64, err error) {
	return f.waitInserts(ctx, f.servers, settle)
}

// waitInserts is WaitInserts on servers.
func (f *Fence) waitInserts(ctx context.Context, servers []driver.Conn, settle time.Duration) (running uint64, err error) {
	like := runningLike(f.db, f.Partition)
	deadline := time.Now().Add(settle)
	for {
		running = 0
		for _, c := range servers {
			var n uint64
			if err := c.QueryRow(ctx, "SELECT count() FROM system.processes WHERE query_id LIKE ?", like).Scan(&n); err != nil {
				return 0, fmt.Errorf("partition %d: running inserts: %w", f.Partition, err)
			}
			running += n
		}
		if running == 0 || !time.Now().Before(deadline) {
			return running, nil
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("partition %d: %d inserts still running: %w", f.Partition, running, ctx.Err())
		case <-time.After(min(100*time.Millisecond, settle/10)):
		}
	}
}

// runningLike is the query ids of inserts of partition in db, any generation, as a
// LIKE pattern: the ids of inserts through a Fence
// (sluice/<db>/p<partition>/g<gen>/<n>) and of combined inserts
// (sluice/<db>/p<a>/g<gen a>/p<b>/g<gen b>/.../c<n>, Combiner).
func runningLike(db string, partition uint32) string {
	return escapeLike("sluice/"+db) + "/%p" + strconv.FormatUint(uint64(partition), 10) + "/g%"
}

// escapeLike quotes LIKE's wildcards in s.
func escapeLike(s string) string {
	return strings.NewReplacer(`\`, `\\`, `%`, `\%`, `_`, `\_`).Replace(s)
}

// Context gives ctx's query this fence's next query id.
func (f *Fence) Context(ctx context.Context) context.Context {
	id := f.prefix + "g" + strconv.FormatUint(f.Gen, 10) + "/" + strconv.FormatUint(f.n.Add(1), 10)
	return clickhouse.Context(ctx, clickhouse.WithQueryID(id))
}

// InsertTypedFenced inserts rows into typed table t through f (its fenced table,
// FencedSQL): the server stores them only while f's generation is its partition's
// newest.
func InsertTypedFenced(ctx context.Context, ch driver.Conn, t *TypedTable, rows [][]any, f *Fence) error {
	name, _ := t.fencedNames()
	fenced := &Table{Name: name, Columns: append(slices.Clone(t.Columns), Column{"partition", "UInt32"}, Column{"gen", "UInt64"}), Columnar: true}
	return insertColumns(f.Context(ctx), ch, fenced, rows, func(n int) []any {
		parts, gens := make([]uint32, n), make([]uint64, n)
		for i := range n {
			parts[i], gens[i] = f.Partition, f.Gen
		}
		return []any{parts, gens}
	})
}
