package alert

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
)

// A checkpoint of the engine's state is a list of segments, oldest first (see
// Checkpoints). A segment holds the engine-wide part of the state as of when it
// was written (its header: the newest segment's is the state's) and records of
// groups, by rule and key: a group as appendGroup encodes it, or a tombstone (the
// group went). A base holds every group; a delta the groups that changed or went
// since the segment before it. The state a list holds is, for each rule of the
// newest header and each key, the newest record, read from the segments at once
// (mergeSegments): a restore never holds more than one record per segment.
//
//	magic "slalseg1"
//	header length (uvarint), header:
//	  max time, partitions (count, times)            as the state's (stateMagic)
//	  rules (count), sorted by name; per rule:
//	    name, version (strings), evaluated, first (varints),
//	    flags (byte: 1 has first, 2 whole: the segment holds every group of the rule)
//	records, sorted by rule (its index in the header) and key; per record:
//	  rule index + 1 (uvarint), key (string), length + 1 (uvarint; 0: a tombstone),
//	  the group's encoding (appendGroup)
//	0 (uvarint): the end
//
// A rule's records count only where the rule has the same version in every later
// header and no later segment holds every group of it (whole): a rule that
// changed or went and came back starts with no groups.
var segMagic = []byte("slalseg1")

// segHeader is a segment's engine-wide state.
type segHeader struct {
	maxTime    time.Time
	partitions []time.Time
	rules      []segRule // sorted by name
}

// segRule is a rule's state but its groups.
type segRule struct {
	name, version    string
	evaluated, first int64
	hasFirst         bool
	// whole: the segment holds every group of the rule; older segments' records of
	// it do not count.
	whole bool
}

func (h *segHeader) rule(name string) (int, bool) {
	return slices.BinarySearchFunc(h.rules, name, func(r segRule, name string) int { return strings.Compare(r.name, name) })
}

func (h *segHeader) encode() ([]byte, error) {
	b, err := appendTime(nil, h.maxTime)
	if err != nil {
		return nil, err
	}
	b = binary.AppendUvarint(b, uint64(len(h.partitions)))
	for _, t := range h.partitions {
		if b, err = appendTime(b, t); err != nil {
			return nil, err
		}
	}
	b = binary.AppendUvarint(b, uint64(len(h.rules)))
	for _, r := range h.rules {
		b = appendString(appendString(b, r.name), r.version)
		b = binary.AppendVarint(binary.AppendVarint(b, r.evaluated), r.first)
		b = append(b, boolByte(r.hasFirst)|boolByte(r.whole)<<1)
	}
	return b, nil
}

func decodeSegHeader(b []byte) (*segHeader, error) {
	d := &decoder{b: b}
	h := &segHeader{maxTime: d.time()}
	if n := d.count(16); n > 0 {
		h.partitions = make([]time.Time, n)
		for i := range h.partitions {
			h.partitions[i] = d.time()
		}
	}
	h.rules = make([]segRule, d.count(6))
	for i := range h.rules {
		h.rules[i] = segRule{name: d.string(), version: d.string(), evaluated: d.varint(), first: d.varint()}
		flags := d.byte()
		h.rules[i].hasFirst, h.rules[i].whole = flags&1 != 0, flags&2 != 0
		if i > 0 && d.err == nil && h.rules[i-1].name >= h.rules[i].name {
			d.fail("the rules of a segment are not in order")
		}
	}
	if d.err == nil && len(d.b) > 0 {
		d.fail("%d bytes after a segment's header", len(d.b))
	}
	return h, d.err
}

// segWriter writes a segment.
type segWriter struct {
	w    *bufio.Writer
	last struct {
		rule int
		key  string
	}
	// records counts the records written.
	records int
}

func newSegWriter(w io.Writer, h *segHeader) (*segWriter, error) {
	hb, err := h.encode()
	if err != nil {
		return nil, err
	}
	sw := &segWriter{w: bufio.NewWriterSize(w, 1<<16)}
	sw.last.rule = -1
	sw.w.Write(segMagic)
	sw.w.Write(binary.AppendUvarint(nil, uint64(len(hb))))
	_, err = sw.w.Write(hb)
	return sw, err
}

// record writes the group of key of the header's rule i: rec is its encoding, nil
// a tombstone. Records come in order of rule, then key.
func (sw *segWriter) record(i int, key string, rec []byte) error {
	if i < sw.last.rule || i == sw.last.rule && key <= sw.last.key {
		return fmt.Errorf("alert segment: record %d/%q after %d/%q", i, key, sw.last.rule, sw.last.key)
	}
	sw.last.rule, sw.last.key = i, key
	var b [3 * binary.MaxVarintLen64]byte
	n := binary.PutUvarint(b[:], uint64(i)+1)
	n += binary.PutUvarint(b[n:], uint64(len(key)))
	sw.w.Write(b[:n])
	sw.w.WriteString(key)
	n = 0
	if rec != nil {
		n = binary.PutUvarint(b[:], uint64(len(rec))+1)
	} else {
		n = binary.PutUvarint(b[:], 0)
	}
	sw.w.Write(b[:n])
	_, err := sw.w.Write(rec)
	sw.records++
	return err
}

// end ends the segment.
func (sw *segWriter) end() error {
	sw.w.WriteByte(0)
	return sw.w.Flush()
}

// segReader reads a segment's records in order.
type segReader struct {
	r *bufio.Reader
	h *segHeader
	// rule (an index in h.rules; -1 after the last), key and rec (nil: a
	// tombstone) are the current record, after next.
	rule int
	key  string
	rec  []byte
	err  error
}

// maxRecord bounds a record's key and group, against a corrupt length.
const maxRecord = 1 << 30

func openSegReader(r io.Reader) (*segReader, error) {
	sr := &segReader{r: bufio.NewReaderSize(r, 1<<16), rule: -1}
	magic := make([]byte, len(segMagic))
	if _, err := io.ReadFull(sr.r, magic); err != nil || string(magic) != string(segMagic) {
		return nil, fmt.Errorf("%w: not an alert segment of this version", ErrCorruptState)
	}
	hb, err := sr.bytes()
	if err != nil {
		return nil, err
	}
	if sr.h, err = decodeSegHeader(hb); err != nil {
		return nil, err
	}
	return sr, nil
}

func (sr *segReader) uvarint() (uint64, error) {
	v, err := binary.ReadUvarint(sr.r)
	if err != nil {
		return 0, fmt.Errorf("%w: a segment is truncated: %w", ErrCorruptState, err)
	}
	return v, nil
}

func (sr *segReader) bytes() ([]byte, error) {
	n, err := sr.uvarint()
	if err != nil {
		return nil, err
	}
	if n > maxRecord {
		return nil, fmt.Errorf("%w: a segment's length of %d", ErrCorruptState, n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(sr.r, b); err != nil {
		return nil, fmt.Errorf("%w: a segment is truncated: %w", ErrCorruptState, err)
	}
	return b, nil
}

// next reads the next record; false at the end or on an error (err).
func (sr *segReader) next() bool {
	if sr.err != nil {
		return false
	}
	fail := func(err error) bool {
		sr.err, sr.rule = err, -1
		return false
	}
	i, err := sr.uvarint()
	if err != nil {
		return fail(err)
	}
	if i == 0 {
		sr.rule = -1
		return false
	}
	if i > uint64(len(sr.h.rules)) {
		return fail(fmt.Errorf("%w: a segment's record of rule %d of %d", ErrCorruptState, i, len(sr.h.rules)))
	}
	key, err := sr.bytes()
	if err != nil {
		return fail(err)
	}
	n, err := sr.uvarint()
	switch {
	case err != nil:
		return fail(err)
	case n > maxRecord:
		return fail(fmt.Errorf("%w: a segment's record of %d bytes", ErrCorruptState, n))
	}
	var rec []byte
	if n > 0 {
		rec = make([]byte, n-1)
		if _, err := io.ReadFull(sr.r, rec); err != nil {
			return fail(fmt.Errorf("%w: a segment is truncated: %w", ErrCorruptState, err))
		}
	}
	prule, pkey := sr.rule, sr.key
	sr.rule, sr.key, sr.rec = int(i-1), string(key), rec
	if sr.rule < prule || sr.rule == prule && sr.key <= pkey {
		return fail(fmt.Errorf("%w: a segment's records are not in order", ErrCorruptState))
	}
	return true
}

// ruleName is the current record's rule.
func (sr *segReader) ruleName() string { return sr.h.rules[sr.rule].name }

// chain tells, for segments (oldest first), which rules' records of each count
// (valid[i]: the rule has the newest header's version in every header from i on,
// and no segment after i holds all its groups), and the header of the segments
// merged into one: the newest's, a rule whole where the oldest segment whose
// records of it count holds all its groups.
func chain(segs []*segReader) (valid []map[string]bool, merged *segHeader) {
	newest := segs[len(segs)-1].h
	valid = make([]map[string]bool, len(segs))
	alive := map[string]string{}
	for _, r := range newest.rules {
		alive[r.name] = r.version
	}
	whole := map[string]bool{}
	for i := len(segs) - 1; i >= 0; i-- {
		valid[i] = map[string]bool{}
		next := map[string]string{}
		for _, r := range segs[i].h.rules {
			if v, ok := alive[r.name]; ok && v == r.version {
				valid[i][r.name] = true
				whole[r.name] = r.whole
				if !r.whole {
					next[r.name] = v
				}
			}
		}
		alive = next
	}
	merged = &segHeader{maxTime: newest.maxTime, partitions: newest.partitions, rules: slices.Clone(newest.rules)}
	for i := range merged.rules {
		merged.rules[i].whole = whole[merged.rules[i].name]
	}
	return valid, merged
}

// mergeSegments reads segments (oldest first) at once and calls f, in order of
// rule name and key, with each group the list holds: the newest record of each
// key of a rule of the newest header (see segMagic), rec nil for a tombstone; i
// is the rule's index in that header. Each reader must be just opened.
func mergeSegments(segs []*segReader, f func(rule int, key string, rec []byte) error) error {
	if len(segs) == 0 {
		return nil
	}
	newest := segs[len(segs)-1].h
	valid, _ := chain(segs)
	for _, sr := range segs {
		sr.next()
	}
	for {
		// The least rule and key, and the newest segment holding it.
		top := -1
		var name string
		for i, sr := range segs {
			if sr.err != nil {
				return sr.err
			}
			if sr.rule < 0 {
				continue
			}
			n := sr.ruleName()
			if top < 0 || n < name || n == name && sr.key <= segs[top].key {
				top, name = i, n
			}
		}
		if top < 0 {
			return nil
		}
		key := segs[top].key
		if valid[top][name] {
			i, _ := newest.rule(name)
			if err := f(i, key, segs[top].rec); err != nil {
				return err
			}
		}
		for _, sr := range segs {
			if sr.rule >= 0 && sr.key == key && sr.ruleName() == name {
				sr.next()
			}
		}
	}
}
