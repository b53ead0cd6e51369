package sink

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/ClickHouse/clickhouse-go/v2"
	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
)

// Combiner joins the fenced events inserts that the partitions of one worker make
// at the same time on one connection into one INSERT (a group commit): while an
// insert runs, the ones asked for meanwhile wait, and the next insert takes them
// all (up to maxRows rows), each row with its own partition and generation, so
// events_fence keeps or drops each partition's rows as it would alone. ClickHouse
// spends much of an insert's cost per insert (a part written, and merged later),
// so P partitions' small inserts cost about what one worker's single insert does.
//
// A combined insert is one INSERT kept whole (wholeInsertSettings): all its rows
// are stored or none. When it fails, every partition in it gets the error and
// retries as it would its own insert (a presence check first when the outcome is
// unknown); when ClickHouse refused it for its data, each part is inserted again
// alone, so a bad row fails only its own partition's insert. An insert that is
// the only one asked for goes alone, as InsertEventsFenced.
//
// Its query id names every partition and generation in it
// (sluice/<db>/p<a>/g<gen>/p<b>/g<gen>/.../c<n>), so a partition's next owner
// waits for it as for its own inserts (NewFence), and so does a replay's hold. Its
// deduplication token, when every fence in it takes one, is made from the
// partitions' own tokens: a retry of the same combination is stored once; a
// partition's retry in another combination is not recognised by the token (the
// presence check still holds it).
type Combiner struct {
	maxRows  int
	onJoin   func()
	mu       sync.Mutex
	lanes    map[driver.Conn]*lane
	n        atomic.Uint64 // query ids
	combined atomic.Uint64
}

// lane is the inserts of one connection: at most one runs at a time.
type lane struct {
	busy  bool
	queue []*request
	cols  EventColumns // the combined rows, used by the insert running
}

type request struct {
	c     *EventColumns
	f     *Fence
	done  chan error    // the insert's outcome (buffered)
	lead  chan struct{} // closed: this request's caller runs the next insert
	taken bool          // in an insert that runs
}

// NewCombiner returns a Combiner whose inserts hold at most maxRows rows (a
// single insert may hold more); onJoin, if set, is called at each insert that
// holds more than one.
func NewCombiner(maxRows int, onJoin func()) *Combiner {
	return &Combiner{maxRows: max(maxRows, 1), onJoin: onJoin, lanes: map[driver.Conn]*lane{}}
}

// Combined is how many inserts held the rows of more than one insert asked for.
func (m *Combiner) Combined() uint64 { return m.combined.Load() }

// Insert inserts c's rows through f on ch, with the inserts other partitions ask
// for at the same time on ch (see Combiner). It returns once the insert holding
// c's rows ended, or, while c's rows wait for another insert to end, when ctx
// does (then they are inserted by nothing).
func (m *Combiner) Insert(ctx context.Context, ch driver.Conn, c *EventColumns, f *Fence) error {
	r := &request{c: c, f: f, done: make(chan error, 1), lead: make(chan struct{})}
	m.mu.Lock()
	l := m.lanes[ch]
	if l == nil {
		l = &lane{}
		m.lanes[ch] = l
	}
	l.queue = append(l.queue, r)
	if l.busy {
		m.mu.Unlock()
		select {
		case err := <-r.done:
			return err
		case <-r.lead:
		case <-ctx.Done():
			m.mu.Lock()
			if r.taken {
				m.mu.Unlock()
				return <-r.done
			}
			select {
			case <-r.lead: // led, but leaves: the next request leads
				l.queue = slices.DeleteFunc(l.queue, func(q *request) bool { return q == r })
				m.handOver(l)
			default:
				l.queue = slices.DeleteFunc(l.queue, func(q *request) bool { return q == r })
			}
			m.mu.Unlock()
			return ctx.Err()
		}
		m.mu.Lock()
	}
	l.busy = true
	// r is the queue's first: the first asked, or handed the lead.
	group, rows := 0, 0
	for group < len(l.queue) && (group == 0 || rows+l.queue[group].c.Len() <= m.maxRows) {
		rows += l.queue[group].c.Len()
		l.queue[group].taken = true
		group++
	}
	run := slices.Clone(l.queue[:group])
	l.queue = slices.Delete(l.queue, 0, group)
	m.mu.Unlock()

	errs := m.insertGroup(ctx, ch, l, run)
	for i, q := range run[1:] {
		q.done <- errs[i+1]
	}
	m.mu.Lock()
	m.handOver(l)
	m.mu.Unlock()
	return errs[0]
}

// handOver passes l's next insert to the first request waiting, or leaves l idle.
// m.mu is held.
func (m *Combiner) handOver(l *lane) {
	if len(l.queue) == 0 {
		l.busy = false
		return
	}
	close(l.queue[0].lead)
}

// insertGroup inserts the rows of run, together when there are several, and
// returns each request's outcome.
func (m *Combiner) insertGroup(ctx context.Context, ch driver.Conn, l *lane, run []*request) []error {
	errs := make([]error, len(run))
	if len(run) == 1 {
		errs[0] = InsertEventsFenced(ctx, ch, run[0].c, run[0].f)
		return errs
	}
	m.combined.Add(1)
	if m.onJoin != nil {
		m.onJoin()
	}
	defer l.cols.Reset()
	rows := 0
	for _, q := range run {
		rows += q.c.Len()
	}
	fz := &fencing{parts: make([]uint32, 0, rows), gens: make([]uint64, 0, rows)}
	id := "sluice/" + run[0].f.db
	tokens := true
	token := sha256.New()
	for _, q := range run {
		l.cols.appendAll(q.c)
		fz.add(q.f, q.c.Len())
		id += "/p" + strconv.FormatUint(uint64(q.f.Partition), 10) + "/g" + strconv.FormatUint(q.f.Gen, 10)
		if tokens = tokens && q.f.tokens; tokens {
			token.Write([]byte(q.f.token(q.c)))
			token.Write([]byte{0})
		}
	}
	if tokens {
		fz.token = "sluice/" + run[0].f.db + "/c/" + hex.EncodeToString(token.Sum(nil)[:16])
	}
	id += "/c" + strconv.FormatUint(m.n.Add(1), 10)
	// The insert runs in the leader's context: when the leader's run stops (its
	// partition lost, or stalled on a silent connection), the insert is cancelled
	// and the others in it retry theirs.
	err := insertEvents(clickhouse.Context(ctx, clickhouse.WithQueryID(id)), ch, &l.cols, insertBlockRows, "", fz)
	if err != nil && isDataError(err) {
		// Nothing was stored (the insert is kept whole): each part alone, so the
		// bad rows fail only their own partition's insert.
		for i, q := range run {
			errs[i] = InsertEventsFenced(ctx, ch, q.c, q.f)
		}
		return errs
	}
	for i := range errs {
		errs[i] = err
	}
	return errs
}

// appendAll adds o's rows after c's.
func (c *EventColumns) appendAll(o *EventColumns) {
	for i := range c.str {
		c.str[i] = append(c.str[i], o.str[i]...)
	}
	for i := range c.times {
		c.times[i] = append(c.times[i], o.times[i]...)
		c.millis[i] = append(c.millis[i], o.millis[i]...)
	}
	c.asn = append(c.asn, o.asn...)
	c.seq = append(c.seq, o.seq...)
}
