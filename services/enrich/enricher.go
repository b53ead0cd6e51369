package enrich

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/expr-lang/expr"
	"github.com/expr-lang/expr/vm"
	json "github.com/goccy/go-json"
	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/ua-parser/uap-go/uaparser"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/filechange"
)

// VersionsField is the enrichment field that records which table versions an event
// was enriched from, by table name.
const VersionsField = "table_versions"

// Enricher applies compiled rules to events. It is the stage's pure core: tables
// answer from memory, and nothing here does I/O.
type Enricher struct {
	rules  []*rule
	tables map[string]Table
	geo    map[string]*geoHolder
	ua     *UserAgents
	// data is what the rules read of data (and mask).
	data events.DataFields
	// Miss, if set, is called for each lookup whose key a table lacks.
	Miss func(table string)
	// versions is the last table-versions map recorded: events enriched from the
	// same table versions share it (it is never changed once made).
	versions atomic.Pointer[map[string]string]
}

type rule struct {
	types    []string
	subjects string
	lookups  []LookupConfig
	// lookupNames names the fields of each lookup.
	lookupNames []*prefixed
	defaults    map[string]map[string]any // by table
	geoip       []GeoIPConfig
	ua          *UAConfig
	derived     []derived
	masks       []mask
}

type derived struct {
	name   string
	prog   *vm.Program
	bucket time.Duration
	// last is the latest bucket's start and text, for a bucketed field: most
	// events fall in the same bucket as the one before.
	last *atomic.Pointer[bucketText]
}

type bucketText struct {
	start time.Time
	text  string
}

// text is the bucket of t, as RFC 3339 text.
func (d *derived) text(t time.Time) string {
	start := t.Truncate(d.bucket)
	if last := d.last.Load(); last != nil && last.start.Equal(start) {
		return last.text
	}
	text := start.UTC().Format(time.RFC3339)
	d.last.Store(&bucketText{start, text})
	return text
}

// prefixed names a lookup's fields (to_column), made once per column.
type prefixed struct {
	to    string
	names atomic.Pointer[map[string]string]
}

func (p *prefixed) name(column string) string {
	names := p.names.Load()
	if names != nil {
		if n, ok := (*names)[column]; ok {
			return n
		}
	}
	next := map[string]string{}
	if names != nil {
		maps.Copy(next, *names)
	}
	n := p.to + "_" + column
	if len(next) < 1000 { // a table with ever new columns is not cached without end
		next[column] = n
		p.names.Store(&next)
	}
	return n
}

type mask struct {
	path   []string // below data
	how    string
	secret []byte
}

// geoHolder lets a reload swap a geo table under running enrichers.
type geoHolder struct {
	t       atomic.Pointer[GeoTable]
	files   []string
	columns []string
	changes *filechange.Files
}

// loadGeoHolder loads the geo table of files.
func loadGeoHolder(files, columns []string) (*geoHolder, error) {
	g := &geoHolder{files: files, columns: columns, changes: filechange.New(files...)}
	t, err := LoadGeo(files, columns)
	if err != nil {
		return nil, err
	}
	g.t.Store(t)
	return g, nil
}

// reload reads the files again if any changed and all settled; a failure keeps the
// current table, and is reported once for the same contents.
func (g *geoHolder) reload() (bool, error) {
	return g.changes.Reload(func() (func(), error) {
		t, err := LoadGeo(g.files, g.columns)
		if err != nil {
			return nil, err
		}
		return func() { g.t.Store(t) }, nil
	})
}

// NewEnricher compiles cfg's rules over the given tables. secrets reads the HMAC
// keys named by masks. Every problem is reported, with its path.
func NewEnricher(cfg EnrichConfig, tables map[string]Table, geo map[string]*geoHolder, ua *UserAgents, secrets func(string) (string, bool)) (*Enricher, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	en := &Enricher{tables: tables, geo: geo, ua: ua}
	defaults := map[string]map[string]any{}
	for _, t := range cfg.Tables {
		defaults[t.Name] = t.Default
	}
	var errs []error
	for i, rc := range cfg.Rules {
		r := &rule{types: rc.Types, subjects: rc.Subjects, lookups: rc.Lookups, defaults: defaults, geoip: rc.GeoIP, ua: rc.UserAgent}
		for _, l := range rc.Lookups {
			r.lookupNames = append(r.lookupNames, &prefixed{to: l.To})
			en.data = en.data.Union(events.DataFieldsOfPath(l.From))
		}
		for _, g := range rc.GeoIP {
			en.data = en.data.Union(events.DataFieldsOfPath(g.From))
		}
		if rc.UserAgent != nil {
			en.data = en.data.Union(events.DataFieldsOfPath(rc.UserAgent.From))
		}
		for j, d := range rc.Derived {
			dv := derived{name: d.Name, bucket: d.Bucket, last: new(atomic.Pointer[bucketText])}
			if d.Expr != "" {
				prog, err := expr.Compile(d.Expr, expr.Env(events.ExprEnv{}))
				if err != nil {
					errs = append(errs, fmt.Errorf("enrich.rules[%d].derived[%d] (%s): %w", i, j, d.Name, err))
					continue
				}
				dv.prog = prog
				en.data = en.data.Union(events.ExprDataFields(prog.Node()))
			}
			r.derived = append(r.derived, dv)
		}
		for j, m := range rc.Mask {
			mk := mask{path: strings.Split(strings.TrimPrefix(m.Field, "data."), "."), how: m.How}
			if m.How == MaskHMAC {
				v, ok := secrets(m.SecretEnv)
				if !ok || v == "" {
					errs = append(errs, fmt.Errorf("enrich.rules[%d].mask[%d].secret_env: environment variable %s is not set", i, j, m.SecretEnv))
					continue
				}
				mk.secret = []byte(v)
			}
			r.masks = append(r.masks, mk)
			// Masked in the bytes; decoded too, so that later rules read it masked.
			en.data = en.data.Union(events.DataFieldsOfPath(m.Field))
		}
		en.rules = append(en.rules, r)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if ua == nil && slices.ContainsFunc(cfg.Rules, func(r RuleConfig) bool { return r.UserAgent != nil }) {
		return nil, errors.New("enrich: user_agent rules need a parser")
	}
	return en, nil
}

func (r *rule) matches(e *events.Event) bool {
	if len(r.types) > 0 && !slices.Contains(r.types, e.Type) {
		return false
	}
	if r.subjects != "" && !server.SubjectMatchesFilter(e.NATSSubject, r.subjects) {
		return false
	}
	return true
}

// eventData decodes what the rules read of an event's data once, on first use.
type eventData struct {
	e       *events.Event
	fields  events.DataFields
	v       any
	decoded bool
	// changed: masks changed data; masked is the data's bytes with their changes
	// made in place (every other member as it was sent).
	changed bool
	masked  []byte
}

// raw is the data's bytes, with the masks applied so far.
func (d *eventData) raw() []byte {
	if d.changed {
		return d.masked
	}
	return d.e.Data
}

func (d *eventData) get() any {
	if !d.decoded {
		d.decoded = true
		d.v, _ = d.e.DecodeDataFields(d.fields)
	}
	return d.v
}

// field returns the text of an envelope attribute or a data path.
func (d *eventData) field(path string) (string, bool) {
	switch path {
	case "id":
		return d.e.ID, d.e.ID != ""
	case "source":
		return d.e.Source, true
	case "type":
		return d.e.Type, true
	case "subject":
		return d.e.Subject, d.e.Subject != ""
	case "key":
		return d.e.Key, true
	}
	v := d.get()
	for step := range strings.SplitSeq(strings.TrimPrefix(path, "data."), ".") {
		obj, ok := v.(map[string]any)
		if !ok {
			return "", false
		}
		if v, ok = obj[step]; !ok {
			return "", false
		}
	}
	if v == nil {
		return "", false
	}
	if f, ok := v.(float64); ok && !exactFloat(f) {
		// A number float64 may not hold exactly (a 19-digit id): its digits as sent.
		if raw, ok := events.ValueAt(d.raw(), strings.Split(strings.TrimPrefix(path, "data."), ".")); ok {
			return keyText(raw), true
		}
	}
	return keyString(v), true
}

// Enrich applies every matching rule to e: lookups, geo, user agent, derived
// fields, then masks. The enrichment lands in e.Enrichment; masks change e.Data.
func (en *Enricher) Enrich(e *events.Event) {
	d := &eventData{e: e, fields: en.data}
	var (
		buf      [8][2]string
		versions = buf[:0]
	)
	setVersion := func(name, v string) {
		for i := range versions {
			if versions[i][0] == name {
				versions[i][1] = v
				return
			}
		}
		versions = append(versions, [2]string{name, v})
	}
	out := e.Enrichment
	set := func(k string, v any) {
		if out == nil {
			out = map[string]any{}
		}
		out[k] = v
	}
	for _, r := range en.rules {
		if !r.matches(e) {
			continue
		}
		for i, l := range r.lookups {
			t := en.tables[l.Table]
			setVersion(l.Table, t.Version())
			key, ok := d.field(l.From)
			row, found := map[string]any(nil), false
			if ok {
				row, found = t.Get(key)
			}
			if !found {
				if en.Miss != nil {
					en.Miss(l.Table)
				}
				row = r.defaults[l.Table]
			}
			for k, v := range row {
				set(r.lookupNames[i].name(k), v)
			}
		}
		for _, g := range r.geoip {
			t := en.geo[g.Table].t.Load()
			setVersion(g.Table, t.Version())
			addr, ok := d.field(g.From)
			if !ok {
				continue
			}
			if vals, ok := t.Lookup(addr); ok {
				for i, c := range t.Columns() {
					set(g.To+"_"+c, vals[i])
				}
			} else if en.Miss != nil {
				en.Miss(g.Table)
			}
		}
		if r.ua != nil {
			if s, ok := d.field(r.ua.From); ok {
				p := en.ua.Parse(s)
				set(r.ua.To+"_browser", p.Browser)
				set(r.ua.To+"_os", p.OS)
				set(r.ua.To+"_device", p.Device)
				set(r.ua.To+"_device_class", p.Class)
			}
		}
		for _, dv := range r.derived {
			if dv.prog == nil {
				set(dv.name, dv.text(e.Time))
				continue
			}
			env := events.NewExprEnv(e, d.get())
			env.Enrichment = out
			v, err := expr.Run(dv.prog, env)
			if err == nil {
				set(dv.name, v)
			}
		}
		for _, m := range r.masks {
			applyMask(d, m)
		}
	}
	if len(versions) > 0 {
		set(VersionsField, en.versionsOf(versions))
	}
	e.Enrichment = out
	if d.changed {
		e.Data = d.masked
	}
}

// versionsOf returns the table-versions map of pairs (name, version): the last one
// made when it holds the same, else a new one.
func (en *Enricher) versionsOf(pairs [][2]string) map[string]string {
	if last := en.versions.Load(); last != nil && len(*last) == len(pairs) {
		same := true
		for _, p := range pairs {
			if v, ok := (*last)[p[0]]; !ok || v != p[1] {
				same = false
				break
			}
		}
		if same {
			return *last
		}
	}
	m := make(map[string]string, len(pairs))
	for _, p := range pairs {
		m[p[0]] = p[1]
	}
	en.versions.Store(&m)
	return m
}

// UserAgent is what enrichment keeps of a parsed user agent.
type UserAgent struct {
	Browser, OS, Device, Class string
}

// UserAgents parses user agents with uap-go (ua-parser's regexes) and remembers the
// most recent results, since the same few agents make most traffic.
type UserAgents struct {
	parser *uaparser.Parser
	cache  *lru.Cache[string, UserAgent]
}

// NewUserAgents returns a parser remembering up to size results.
func NewUserAgents(size int) (*UserAgents, error) {
	p, err := uaparser.New()
	if err != nil {
		return nil, fmt.Errorf("user-agent parser: %w", err)
	}
	c, err := lru.New[string, UserAgent](size)
	if err != nil {
		return nil, err
	}
	return &UserAgents{parser: p, cache: c}, nil
}

// Parse returns browser (family and major version), OS, device family and class.
func (u *UserAgents) Parse(s string) UserAgent {
	if r, ok := u.cache.Get(s); ok {
		return r
	}
	c := &uaparser.Client{UserAgent: u.parser.ParseUserAgent(s), Os: u.parser.ParseOs(s), Device: u.parser.ParseDevice(s)}
	r := UserAgent{
		Browser: joinVersion(c.UserAgent.Family, c.UserAgent.Major),
		OS:      joinVersion(c.Os.Family, c.Os.Major),
		Device:  c.Device.Family,
		Class:   deviceClass(c),
	}
	u.cache.Add(s, r)
	return r
}

func joinVersion(family, major string) string {
	if major == "" {
		return family
	}
	return family + " " + major
}

// deviceClass sorts a parse into bot, tablet, mobile, desktop or other.
func deviceClass(c *uaparser.Client) string {
	switch {
	case c.Device.Family == "Spider":
		return "bot"
	case strings.Contains(c.Device.Family, "iPad") || strings.Contains(strings.ToLower(c.Device.Family), "tablet"):
		return "tablet"
	case c.Os.Family == "iOS" || c.Os.Family == "Android" || c.Device.Family == "iPhone" || (c.Device.Brand != "" && c.Device.Family != "Other"):
		return "mobile"
	case slices.Contains([]string{"Windows", "Mac OS X", "Linux", "Ubuntu", "Chrome OS", "Fedora", "FreeBSD"}, c.Os.Family):
		return "desktop"
	default:
		return "other"
	}
}

// applyMask masks one data field: in the data's bytes (what is written back: every
// other member keeps its bytes, numbers beyond float64's range or precision too,
// and data that does not decode whole is masked all the same), then in the decoded
// data later rules read. It reports whether data changed.
func applyMask(d *eventData, m mask) bool {
	var value any // the leaf's new value; nil: removed
	raw, ok := events.EditPath(d.raw(), m.path, func(v []byte) ([]byte, bool) {
		value = nil // each repeat of the name on its own (the last is the decoded one)
		switch m.how {
		case MaskHMAC:
			mac := hmac.New(sha256.New, m.secret)
			mac.Write([]byte(keyText(v)))
			value = hex.EncodeToString(mac.Sum(nil))
		case MaskTruncate:
			var s string
			if json.Unmarshal(v, &s) == nil {
				if t, ok := truncateIP(s); ok {
					value = t
				}
			} // not an address: removed, nothing of it may leak
		}
		if value == nil {
			return nil, false
		}
		b, err := json.Marshal(value)
		return b, err == nil
	})
	if !ok {
		return false
	}
	d.masked, d.changed = raw, true
	obj, ok := d.get().(map[string]any)
	for _, step := range m.path[:len(m.path)-1] {
		if !ok {
			return true
		}
		obj, ok = obj[step].(map[string]any)
	}
	if !ok {
		return true
	}
	leaf := m.path[len(m.path)-1]
	if value == nil {
		delete(obj, leaf)
	} else {
		obj[leaf] = value
	}
	return true
}

// truncateIP keeps the /24 of an IPv4 address and the /48 of an IPv6 one.
func truncateIP(s string) (string, bool) {
	addr, err := netip.ParseAddr(s)
	if err != nil {
		return "", false
	}
	addr = addr.Unmap()
	bits := 48
	if addr.Is4() {
		bits = 24
	}
	p, err := addr.Prefix(bits)
	if err != nil {
		return "", false
	}
	return p.Addr().String(), true
}
