package enrich

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/csv"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"

	"github.com/gaissmai/bart"
	"go4.org/netipx"

	"github.com/sluicehq/sluice/schemas/events"
)

// GeoTable answers longest-prefix-match lookups of IPv4 and IPv6 addresses.
// It is immutable once built, so lookups need no lock.
type GeoTable struct {
	t       bart.Table[[]string]
	columns []string
	version string
	entries int
}

// LoadGeo reads CSV files (gzip when named .gz) without a header row, each line
// either "network,<values...>" (a CIDR prefix) or "first,last,<values...>" (an
// inclusive address range, as in ip-location-db). columns names the values.
// Where prefixes overlap, the longest wins.
func LoadGeo(files []string, columns []string) (*GeoTable, error) {
	g := &GeoTable{columns: columns}
	h := sha256.New()
	for _, name := range files {
		if err := g.loadFile(name, columns, h); err != nil {
			return nil, err
		}
	}
	g.version = "sha256:" + hex.EncodeToString(h.Sum(nil)[:8])
	return g, nil
}

func (g *GeoTable) loadFile(name string, columns []string, h io.Writer) error {
	f, err := os.Open(name)
	if err != nil {
		return fmt.Errorf("geo table: %w", err)
	}
	defer f.Close()
	var r io.Reader = io.TeeReader(f, h)
	if strings.HasSuffix(name, ".gz") {
		zr, err := gzip.NewReader(r)
		if err != nil {
			return fmt.Errorf("geo table %s: %w", name, err)
		}
		defer zr.Close()
		r = zr
	}
	// Without a byte order mark at the start, as a spreadsheet's "CSV UTF-8" has.
	br := bufio.NewReader(r)
	if start, _ := br.Peek(len(events.BOM)); bytes.Equal(start, events.BOM) {
		_, _ = br.Discard(len(events.BOM))
	}
	cr := csv.NewReader(br)
	cr.FieldsPerRecord = -1
	cr.ReuseRecord = true
	line := 0
	for {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			return nil
		}
		line++
		if err != nil {
			return fmt.Errorf("geo table %s: %w", name, err)
		}
		if err := g.addRecord(rec, len(columns)); err != nil {
			return fmt.Errorf("geo table %s: line %d: %w", name, line, err)
		}
	}
}

func (g *GeoTable) addRecord(rec []string, nvalues int) error {
	if len(rec) == 0 {
		return errors.New("empty line")
	}
	if strings.Contains(rec[0], "/") {
		p, err := netip.ParsePrefix(rec[0])
		if err != nil {
			return err
		}
		vals, err := values(rec[1:], nvalues)
		if err != nil {
			return err
		}
		g.t.Insert(p.Masked(), vals)
		g.entries++
		return nil
	}
	if len(rec) < 2 {
		return errors.New("want network,values or first,last,values")
	}
	first, err := netip.ParseAddr(rec[0])
	if err != nil {
		return err
	}
	last, err := netip.ParseAddr(rec[1])
	if err != nil {
		return err
	}
	rng := netipx.IPRangeFrom(first.Unmap(), last.Unmap())
	if !rng.IsValid() {
		return fmt.Errorf("range %s-%s is not valid", rec[0], rec[1])
	}
	vals, err := values(rec[2:], nvalues)
	if err != nil {
		return err
	}
	for _, p := range rng.Prefixes() {
		g.t.Insert(p, vals)
	}
	g.entries++
	return nil
}

func values(rec []string, n int) ([]string, error) {
	if len(rec) < n {
		return nil, fmt.Errorf("%d values, want %d", len(rec), n)
	}
	return append([]string(nil), rec[:n]...), nil
}

// Lookup returns the values of the longest prefix holding the address text s.
// IPv4-mapped IPv6 addresses are looked up as IPv4.
func (g *GeoTable) Lookup(s string) ([]string, bool) {
	addr, err := netip.ParseAddr(s)
	if err != nil {
		return nil, false
	}
	return g.t.Lookup(addr.Unmap())
}

// Columns names the values Lookup returns.
func (g *GeoTable) Columns() []string { return g.columns }

// Version identifies the files' contents.
func (g *GeoTable) Version() string { return g.version }

// Len is the number of lines loaded.
func (g *GeoTable) Len() int { return g.entries }
