package alert

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"time"
)

// The binary form of a State, as snapshots carry it since JSON became too slow and
// too large for them (a threshold rule per user over 5,000 users with two minutes
// of allowed lateness was 50 MB of JSON and 3 s of the decide loop per save):
//
//	magic "slalrt01"
//	max time, partitions (count, times)            time.Time.MarshalBinary, length first
//	rules (count); per rule:
//	  name, version (strings), evaluated, first (varints), has first (byte)
//	  groups (count); per group:
//	    key (string), flags (byte: 1 labels follow)
//	    [labels: count, then name and value strings]
//	    latest, last seen, firing since (varints)
//	    buckets with events (count); per bucket: start as a distance from latest,
//	    then n, sum, min, max (numbers)
//
// Strings are a length (uvarint) and bytes. A number that is a whole number of
// magnitude below 2^52 is a uvarint of its zigzag form shifted left one; any other
// is the uvarint 1 and its eight bytes (IEEE 754, little-endian). A bucket's
// distance from latest is in milliseconds (low bit 0) when it is a whole number of
// them, else in nanoseconds (low bit 1), zigzag.
var stateMagic = []byte("slalrt01")

// ErrCorruptState means an encoded alert state is truncated or malformed.
var ErrCorruptState = errors.New("alert state does not decode")

// MarshalBinary encodes s compactly (see stateMagic). Groups are written in map
// order: two encodings of one state may differ in bytes, never in what they hold.
func (s *State) MarshalBinary() ([]byte, error) {
	b := append([]byte(nil), stateMagic...)
	var err error
	if b, err = appendTime(b, s.MaxTime); err != nil {
		return nil, err
	}
	b = binary.AppendUvarint(b, uint64(len(s.Partitions)))
	for _, t := range s.Partitions {
		if b, err = appendTime(b, t); err != nil {
			return nil, err
		}
	}
	b = binary.AppendUvarint(b, uint64(len(s.Rules)))
	for name, rs := range s.Rules {
		b = appendString(b, name)
		b = appendString(b, rs.Version)
		b = binary.AppendVarint(b, rs.Evaluated)
		b = binary.AppendVarint(b, rs.First)
		b = append(b, boolByte(rs.HasFirst))
		b = binary.AppendUvarint(b, uint64(rs.size()))
		for key, g := range rs.Groups {
			b = appendGroup(appendString(b, key), g)
		}
		if rs.cold != nil {
			// The groups on disk: their records are this encoding already.
			n := 0
			if err := rs.cold.each(func(key string, rec []byte) error {
				b = append(appendString(b, key), rec...)
				n++
				return nil
			}); err != nil {
				return nil, fmt.Errorf("alert state: rule %s: %w", name, err)
			}
			if n != rs.cold.n {
				return nil, fmt.Errorf("alert state: rule %s: %d groups on disk, %d counted", name, n, rs.cold.n)
			}
		}
	}
	return b, nil
}

// UnmarshalBinary replaces s with the state MarshalBinary encoded in data.
func (s *State) UnmarshalBinary(data []byte) error { return s.decode(data, nil) }

// placing tells decode where a rule's groups go: cold, when not nil, takes those
// beyond the groups kept in memory; drop: none is kept (the engine would drop the
// rule's state: a rule that changed or went).
type placing func(name, version string) (r *Rule, cold *coldGroups, drop bool)

// decode is UnmarshalBinary, the groups placed by place (nil: every group in
// memory).
func (s *State) decode(data []byte, place placing) error {
	if len(data) < len(stateMagic) || string(data[:len(stateMagic)]) != string(stateMagic) {
		return fmt.Errorf("%w: not an alert state of this version", ErrCorruptState)
	}
	d := &decoder{b: data[len(stateMagic):]}
	var st State
	st.MaxTime = d.time()
	if n := d.count(16); n > 0 {
		st.Partitions = make([]time.Time, n)
		for i := range st.Partitions {
			st.Partitions[i] = d.time()
		}
	}
	nRules := d.count(6)
	st.Rules = make(map[string]*RuleState, nRules)
	for range nRules {
		name := d.string()
		rs := &RuleState{Version: d.string(), Evaluated: d.varint(), First: d.varint(), HasFirst: d.byte() == 1}
		nGroups := d.count(6)
		var (
			r    *Rule
			cold *coldGroups
			drop bool
		)
		if place != nil {
			r, cold, drop = place(name, rs.Version)
		}
		rs.Groups = make(map[string]*GroupState, min(nGroups, 1<<16))
		for range nGroups {
			key := d.string()
			g := d.group()
			if d.err != nil {
				return d.err
			}
			switch {
			case drop:
			case cold != nil && cold.s.restoring <= 0:
				if g.Labels != nil && r.keyHoldsLabels(key) {
					g.Labels = nil
				}
				cold.restore(r, key, g)
			default:
				rs.Groups[key] = g
				if cold != nil {
					cold.s.restoring--
				}
			}
		}
		if d.err != nil {
			return d.err
		}
		if cold != nil {
			if err := cold.restored(); err != nil {
				return err
			}
			rs.cold = cold
		}
		st.Rules[name] = rs
	}
	if d.err == nil && len(d.b) > 0 {
		d.fail("%d bytes after the last rule", len(d.b))
	}
	if d.err != nil {
		return d.err
	}
	*s = st
	return nil
}

// appendGroup appends g's encoding (without its key): its labels if it holds
// them, its times and its buckets with events.
func appendGroup(b []byte, g *GroupState) []byte {
	b = append(b, boolByte(g.Labels != nil))
	if g.Labels != nil {
		b = binary.AppendUvarint(b, uint64(len(g.Labels)))
		for name, v := range g.Labels {
			b = appendString(appendString(b, name), v)
		}
	}
	b = binary.AppendVarint(b, g.Latest)
	b = binary.AppendVarint(b, g.LastSeen)
	b = binary.AppendVarint(b, g.FiringSince)
	n := 0
	for _, bk := range g.Buckets {
		if bk.N > 0 {
			n++
		}
	}
	b = binary.AppendUvarint(b, uint64(n))
	for _, bk := range g.Buckets {
		if bk.N <= 0 {
			continue
		}
		d := g.Latest - bk.Start
		if d%int64(time.Millisecond) == 0 {
			b = binary.AppendUvarint(b, zigzag(d/int64(time.Millisecond))<<1)
		} else {
			b = binary.AppendUvarint(b, zigzag(d)<<1|1)
		}
		b = appendNumber(b, bk.N)
		b = appendNumber(b, bk.Sum)
		b = appendNumber(b, bk.Min)
		b = appendNumber(b, bk.Max)
	}
	return b
}

// group reads a group appendGroup encoded.
func (d *decoder) group() *GroupState {
	g := &GroupState{}
	if d.byte() == 1 {
		nl := d.count(2)
		g.Labels = make(map[string]string, nl)
		for range nl {
			k := d.string()
			g.Labels[k] = d.string()
		}
	}
	g.Latest, g.LastSeen, g.FiringSince = d.varint(), d.varint(), d.varint()
	if nb := d.count(5); nb > 0 {
		g.Buckets = make([]Bucket, nb)
		for i := range g.Buckets {
			u := d.uvarint()
			dist := unzigzag(u >> 1)
			if u&1 == 0 {
				dist *= int64(time.Millisecond)
			}
			bk := Bucket{Start: g.Latest - dist, N: d.number(), Sum: d.number(), Min: d.number(), Max: d.number()}
			g.Buckets[i] = bk
			g.count += bk.N
		}
	}
	return g
}

func appendTime(b []byte, t time.Time) ([]byte, error) {
	tb, err := t.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("alert state: %w", err)
	}
	return append(binary.AppendUvarint(b, uint64(len(tb))), tb...), nil
}

func appendString(b []byte, s string) []byte {
	return append(binary.AppendUvarint(b, uint64(len(s))), s...)
}

func appendNumber(b []byte, v float64) []byte {
	if v == math.Trunc(v) && math.Abs(v) < 1<<52 && !(v == 0 && math.Signbit(v)) {
		return binary.AppendUvarint(b, zigzag(int64(v))<<1)
	}
	return binary.LittleEndian.AppendUint64(binary.AppendUvarint(b, 1), math.Float64bits(v))
}

func boolByte(v bool) byte {
	if v {
		return 1
	}
	return 0
}

func zigzag(v int64) uint64   { return uint64(v<<1) ^ uint64(v>>63) }
func unzigzag(u uint64) int64 { return int64(u>>1) ^ -int64(u&1) }

// decoder reads an encoded state; the first problem sticks in err and every read
// after it returns zero values.
type decoder struct {
	b   []byte
	err error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: "+format, append([]any{ErrCorruptState}, args...)...)
	}
	d.b = nil
}

func (d *decoder) uvarint() uint64 {
	v, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("a number is truncated")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) varint() int64 {
	v, n := binary.Varint(d.b)
	if n <= 0 {
		d.fail("a number is truncated")
		return 0
	}
	d.b = d.b[n:]
	return v
}

func (d *decoder) byte() byte {
	if len(d.b) == 0 {
		d.fail("truncated")
		return 0
	}
	c := d.b[0]
	d.b = d.b[1:]
	return c
}

// count reads a count of items each at least min bytes long, refusing one the
// data left cannot hold (so a corrupt count cannot make a huge allocation).
func (d *decoder) count(min int) int {
	n := d.uvarint()
	if n > uint64(len(d.b)/min) {
		d.fail("a count of %d is more than the data holds", n)
		return 0
	}
	return int(n)
}

func (d *decoder) bytes(n uint64) []byte {
	if n > uint64(len(d.b)) {
		d.fail("truncated")
		return nil
	}
	v := d.b[:n]
	d.b = d.b[n:]
	return v
}

func (d *decoder) string() string { return string(d.bytes(d.uvarint())) }

func (d *decoder) time() time.Time {
	var t time.Time
	if b := d.bytes(d.uvarint()); d.err == nil {
		if err := t.UnmarshalBinary(b); err != nil {
			d.fail("a time: %v", err)
		}
	}
	return t
}

func (d *decoder) number() float64 {
	u := d.uvarint()
	if u == 1 {
		b := d.bytes(8)
		if d.err != nil {
			return 0
		}
		return math.Float64frombits(binary.LittleEndian.Uint64(b))
	}
	if u&1 == 1 {
		d.fail("a number's tag %d", u)
		return 0
	}
	return float64(unzigzag(u >> 1))
}

// decodeStateTo is DecodeState with the groups of rules' windowed rules beyond
// sp's bound written to sp as they are read, not held in memory, and the groups of
// rules that are not among rules (or changed) left out.
func decodeStateTo(bin []byte, legacy *State, rules []*Rule, sp *Spill) (*State, error) {
	if bin == nil {
		return legacy, nil
	}
	byName := map[string]*Rule{}
	for _, r := range rules {
		byName[r.Name] = r
	}
	sp.restoring = sp.hot
	var st State
	err := st.decode(bin, func(name, version string) (*Rule, *coldGroups, bool) {
		r := byName[name]
		switch {
		case r == nil || r.version != version || r.Kind == KindMatch:
			return nil, nil, true
		case r.Kind == KindThreshold || r.Kind == KindRate:
			return r, sp.rule(r), false
		}
		return r, nil, false
	})
	if err != nil {
		return nil, err
	}
	return &st, nil
}

// DecodeState is the state a snapshot carries: its binary form (bin), or, when it
// has none, the JSON form of earlier releases (legacy; nil: no state).
func DecodeState(bin []byte, legacy *State) (*State, error) {
	if bin == nil {
		return legacy, nil
	}
	var st State
	if err := st.UnmarshalBinary(bin); err != nil {
		return nil, err
	}
	return &st, nil
}
