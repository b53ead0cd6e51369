package enrich

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/sluicehq/sluice/services/kit/configfile"
)

// EnrichConfig is the enrich section of SLUICE_CONFIG.
type EnrichConfig struct {
	// Tables are key-value lookup tables: a NATS KV bucket or a CSV/JSON-lines file.
	Tables []TableConfig `yaml:"tables"`
	// Geo tables map IP addresses to values by longest prefix.
	Geo []GeoConfig `yaml:"geo"`
	// Rules say what to do to which events; every matching rule applies, in order.
	Rules []RuleConfig `yaml:"rules"`
	// ReloadInterval is how often files (tables, geo, this config) are checked for
	// changes.
	ReloadInterval time.Duration `yaml:"reload_interval"`
}

// TableConfig is one lookup table.
type TableConfig struct {
	Name string `yaml:"name"`
	// KV is a NATS KV bucket: keys are lookup keys, values JSON objects.
	KV string `yaml:"kv"`
	// File is a .csv (with a header row) or .jsonl file; Key names its key column.
	File string `yaml:"file"`
	Key  string `yaml:"key"`
	// Default is the row a missing key gives (nothing when empty).
	Default map[string]any `yaml:"default"`
}

// GeoConfig is one geo table.
type GeoConfig struct {
	Name string `yaml:"name"`
	// Files are CSV (optionally .gz) of network,values or first,last,values.
	Files []string `yaml:"files"`
	// Columns name the values.
	Columns []string `yaml:"columns"`
}

// RuleConfig applies enrichments to the events it matches.
type RuleConfig struct {
	// Types and Subjects select events: a listed CloudEvents type, a NATS subject
	// matching the pattern, or both when both are set. Neither: every event.
	Types    []string `yaml:"types"`
	Subjects string   `yaml:"subjects"`

	Lookups   []LookupConfig  `yaml:"lookups"`
	GeoIP     []GeoIPConfig   `yaml:"geoip"`
	UserAgent *UAConfig       `yaml:"user_agent"`
	Derived   []DerivedConfig `yaml:"derived"`
	Mask      []MaskConfig    `yaml:"mask"`
}

// LookupConfig looks From up in Table and stores the row's fields as <To>_<field>.
type LookupConfig struct {
	Table string `yaml:"table"`
	From  string `yaml:"from"`
	To    string `yaml:"to"`
}

// GeoIPConfig looks the address at From up in a geo table and stores its columns as
// <To>_<column> (to: geo with column country gives geo_country).
type GeoIPConfig struct {
	Table string `yaml:"table"`
	From  string `yaml:"from"`
	To    string `yaml:"to"`
}

// UAConfig parses the user agent at From into <To>_browser, <To>_os, <To>_device
// and <To>_device_class.
type UAConfig struct {
	From string `yaml:"from"`
	To   string `yaml:"to"`
}

// DerivedConfig computes Name from an expr expression over the event (id, source,
// type, subject, time, data, enrichment) or, with Bucket, truncates the event time.
type DerivedConfig struct {
	Name   string        `yaml:"name"`
	Expr   string        `yaml:"expr"`
	Bucket time.Duration `yaml:"bucket"`
}

// MaskConfig masks a field of data before the event is published or stored.
type MaskConfig struct {
	// Field is a path into data: data.user.email.
	Field string `yaml:"field"`
	// How is hmac (keyed hash, hex), truncate (IPv4 to /24, IPv6 to /48) or remove.
	How string `yaml:"how"`
	// SecretEnv names the variable holding the HMAC key (hmac only).
	SecretEnv string `yaml:"secret_env"`
}

// Mask kinds.
const (
	MaskHMAC     = "hmac"
	MaskTruncate = "truncate"
	MaskRemove   = "remove"
)

// DefaultEnrichConfig checks files every 2 s.
func DefaultEnrichConfig() EnrichConfig { return EnrichConfig{ReloadInterval: 2 * time.Second} }

// LoadEnrichConfig reads the enrich section of f over the defaults and validates it.
func LoadEnrichConfig(f *configfile.File) (EnrichConfig, error) {
	c := DefaultEnrichConfig()
	if err := f.Decode("enrich", &c); err != nil {
		return c, err
	}
	return c, c.Validate()
}

// Validate reports every problem, each with its path in the file.
func (c EnrichConfig) Validate() error {
	var errs []error
	bad := func(path, format string, args ...any) {
		errs = append(errs, fmt.Errorf("enrich.%s: %s", path, fmt.Sprintf(format, args...)))
	}
	if c.ReloadInterval <= 0 {
		bad("reload_interval", "must be positive")
	}
	tables := map[string]bool{}
	for i, t := range c.Tables {
		p := fmt.Sprintf("tables[%d]", i)
		switch {
		case t.Name == "":
			bad(p+".name", "is required")
		case tables[t.Name]:
			bad(p+".name", "%q is used twice", t.Name)
		}
		tables[t.Name] = true
		switch {
		case (t.KV == "") == (t.File == ""):
			bad(p, "set exactly one of kv and file")
		case t.File != "" && t.Key == "":
			bad(p+".key", "is required with file (the key column)")
		case t.File != "" && !strings.HasSuffix(t.File, ".csv") && !strings.HasSuffix(t.File, ".jsonl"):
			bad(p+".file", "%q: want a .csv or .jsonl file", t.File)
		case t.KV != "" && t.Key != "":
			bad(p+".key", "is for files; a KV table's keys are the bucket's keys")
		}
	}
	geos := map[string]bool{}
	for i, g := range c.Geo {
		p := fmt.Sprintf("geo[%d]", i)
		if g.Name == "" || geos[g.Name] {
			bad(p+".name", "must be set and unique, got %q", g.Name)
		}
		geos[g.Name] = true
		if len(g.Files) == 0 {
			bad(p+".files", "is required")
		}
		if len(g.Columns) == 0 {
			bad(p+".columns", "is required (names of the values after the network)")
		}
	}
	for i, r := range c.Rules {
		p := fmt.Sprintf("rules[%d]", i)
		if r.Subjects != "" && !server.IsValidSubject(r.Subjects) {
			bad(p+".subjects", "%q is not a subject pattern", r.Subjects)
		}
		for j, l := range r.Lookups {
			lp := fmt.Sprintf("%s.lookups[%d]", p, j)
			if !tables[l.Table] {
				bad(lp+".table", "no table named %q", l.Table)
			}
			errs = appendErr(errs, lp+".from", checkPath(l.From))
			if l.To == "" {
				bad(lp+".to", "is required")
			}
		}
		for j, g := range r.GeoIP {
			gp := fmt.Sprintf("%s.geoip[%d]", p, j)
			if !geos[g.Table] {
				bad(gp+".table", "no geo table named %q", g.Table)
			}
			errs = appendErr(errs, gp+".from", checkPath(g.From))
			if g.To == "" {
				bad(gp+".to", "is required")
			}
		}
		if u := r.UserAgent; u != nil {
			errs = appendErr(errs, p+".user_agent.from", checkPath(u.From))
			if u.To == "" {
				bad(p+".user_agent.to", "is required")
			}
		}
		for j, d := range r.Derived {
			dp := fmt.Sprintf("%s.derived[%d]", p, j)
			if d.Name == "" {
				bad(dp+".name", "is required")
			}
			if (d.Expr == "") == (d.Bucket == 0) {
				bad(dp, "set exactly one of expr and bucket")
			}
			if d.Bucket < 0 {
				bad(dp+".bucket", "must be positive")
			}
		}
		for j, m := range r.Mask {
			mp := fmt.Sprintf("%s.mask[%d]", p, j)
			if !strings.HasPrefix(m.Field, "data.") {
				bad(mp+".field", "%q: masks apply to data fields (data.<path>)", m.Field)
			} else {
				errs = appendErr(errs, mp+".field", checkPath(m.Field))
			}
			switch m.How {
			case MaskHMAC:
				if m.SecretEnv == "" {
					bad(mp+".secret_env", "is required for hmac")
				}
			case MaskTruncate, MaskRemove:
				if m.SecretEnv != "" {
					bad(mp+".secret_env", "is only for hmac")
				}
			default:
				bad(mp+".how", "%q: want hmac, truncate or remove", m.How)
			}
		}
	}
	return errors.Join(errs...)
}

func appendErr(errs []error, path string, err error) []error {
	if err == nil {
		return errs
	}
	return append(errs, fmt.Errorf("enrich.%s: %w", path, err))
}

var envelopeFields = []string{"id", "source", "type", "subject", "key"}

// checkPath accepts an envelope attribute or data.<path>.
func checkPath(p string) error {
	if slices.Contains(envelopeFields, p) {
		return nil
	}
	if rest, ok := strings.CutPrefix(p, "data."); ok && !slices.Contains(strings.Split(rest, "."), "") {
		return nil
	}
	return fmt.Errorf("%q: want one of %s, or data.<path>", p, strings.Join(envelopeFields, ", "))
}
