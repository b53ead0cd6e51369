package enrich

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	json "github.com/goccy/go-json"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
)

type staticTable map[string]map[string]any

func (s staticTable) Get(k string) (map[string]any, bool) { r, ok := s[k]; return r, ok }
func (s staticTable) Version() string                     { return "static:1" }

func testEnricher(t *testing.T, cfg EnrichConfig, tables map[string]Table, geo map[string]*geoHolder) *Enricher {
	t.Helper()
	ua, err := NewUserAgents(100)
	if err != nil {
		t.Fatal(err)
	}
	en, err := NewEnricher(cfg, tables, geo, ua, func(k string) (string, bool) {
		return map[string]string{"MASK_KEY": "s3cret"}[k], k == "MASK_KEY"
	})
	if err != nil {
		t.Fatal(err)
	}
	return en
}

func event(typ, data string) *events.Event {
	return &events.Event{ID: "1", Source: "web", Type: typ, Key: "k", NATSSubject: "events.web." + typ,
		Time: time.Date(2026, 11, 21, 10, 37, 12, 0, time.UTC), Data: json.RawMessage(data)}
}

func TestEnrich(t *testing.T) {
	geoFile := writeFile(t, "geo.csv", "203.0.113.0/24,ZZ,64500\n2001:db8::/32,YY,64501\n")
	gh, err := loadGeoHolder([]string{geoFile}, []string{"country", "asn"})
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultEnrichConfig()
	cfg.Tables = []TableConfig{{Name: "users", KV: "users", Default: map[string]any{"plan": "unknown"}}}
	cfg.Geo = []GeoConfig{{Name: "geo", Files: []string{geoFile}, Columns: []string{"country", "asn"}}}
	cfg.Rules = []RuleConfig{{
		Types:     []string{"page.view"},
		Lookups:   []LookupConfig{{Table: "users", From: "data.user", To: "user"}},
		GeoIP:     []GeoIPConfig{{Table: "geo", From: "data.ip", To: "geo"}},
		UserAgent: &UAConfig{From: "data.ua", To: "ua"},
		Derived: []DerivedConfig{
			{Name: "hour", Bucket: time.Hour},
			{Name: "is_pro", Expr: `enrichment.user_plan == "pro"`},
		},
		Mask: []MaskConfig{
			{Field: "data.ip", How: MaskTruncate},
			{Field: "data.email", How: MaskHMAC, SecretEnv: "MASK_KEY"},
			{Field: "data.password", How: MaskRemove},
		},
	}}
	users := staticTable{"u1": {"plan": "pro", "name": "Ada"}}
	en := testEnricher(t, cfg, map[string]Table{"users": users}, map[string]*geoHolder{"geo": gh})
	misses := 0
	en.Miss = func(string) { misses++ }

	chrome := "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36"
	e := event("page.view", `{"user":"u1","ip":"203.0.113.77","ua":"`+chrome+`","email":"ada@example.com","password":"hunter2"}`)
	en.Enrich(e)
	want := map[string]any{
		"user_plan": "pro", "user_name": "Ada", "geo_country": "ZZ", "geo_asn": "64500",
		"ua_browser": "Chrome 126", "ua_os": "Windows 10", "ua_device": "Other", "ua_device_class": "desktop",
		"hour": "2026-11-21T10:00:00Z", "is_pro": true,
	}
	for k, v := range want {
		if e.Enrichment[k] != v {
			t.Errorf("enrichment[%s] = %v, want %v", k, e.Enrichment[k], v)
		}
	}
	versions, _ := e.Enrichment[VersionsField].(map[string]string)
	if versions["users"] != "static:1" || !strings.HasPrefix(versions["geo"], "sha256:") {
		t.Errorf("versions = %v", e.Enrichment[VersionsField])
	}
	var data map[string]any
	if err := json.Unmarshal(e.Data, &data); err != nil {
		t.Fatal(err)
	}
	mac := hmac.New(sha256.New, []byte("s3cret"))
	mac.Write([]byte("ada@example.com"))
	if data["ip"] != "203.0.113.0" || data["email"] != hex.EncodeToString(mac.Sum(nil)) || data["password"] != nil || data["user"] != "u1" {
		t.Errorf("masked data = %v", data)
	}
	if misses != 0 {
		t.Errorf("misses = %d", misses)
	}

	// A missing key gives the default and is counted; an unknown address adds nothing.
	e = event("page.view", `{"user":"nobody","ip":"2001:db8:aa:bb::1"}`)
	en.Enrich(e)
	if e.Enrichment["user_plan"] != "unknown" || misses != 1 || e.Enrichment["geo_country"] != "YY" {
		t.Errorf("miss: %v (misses %d)", e.Enrichment, misses)
	}
	var d2 map[string]any
	_ = json.Unmarshal(e.Data, &d2)
	if d2["ip"] != "2001:db8:aa::" {
		t.Errorf("IPv6 truncated to %v, want the /48", d2["ip"])
	}
	// Other types are left alone.
	e = event("order.created", `{"user":"u1","ip":"203.0.113.77"}`)
	en.Enrich(e)
	if e.Enrichment != nil || string(e.Data) != `{"user":"u1","ip":"203.0.113.77"}` {
		t.Errorf("a rule for page.view touched order.created: %v %s", e.Enrichment, e.Data)
	}
}

// A mask changes the member it names and no other: numbers beyond float64's
// precision, long fractions and nested members keep the bytes they were sent as
// (the whole data was decoded to float64 and written back: a 19-digit id was
// stored as another number). Two 19-digit ids float64 cannot tell apart keep
// distinct pseudonyms and find their own rows.
func TestMasksKeepOtherMembers(t *testing.T) {
	cfg := DefaultEnrichConfig()
	cfg.Tables = []TableConfig{{Name: "accounts", KV: "accounts"}}
	cfg.Rules = []RuleConfig{
		{Types: []string{"order.created"}, Lookups: []LookupConfig{{Table: "accounts", From: "data.account", To: "acct"}},
			Mask: []MaskConfig{{Field: "data.card", How: MaskRemove}, {Field: "data.buyer.ip", How: MaskTruncate}}},
		// A second rule reads what the first one masked, and masks again.
		{Types: []string{"order.created"}, Derived: []DerivedConfig{{Name: "card_gone", Expr: `data.card == nil`}},
			Mask: []MaskConfig{{Field: "data.account", How: MaskHMAC, SecretEnv: "MASK_KEY"}}},
	}
	accounts := staticTable{"1234567890123456789": {"tier": "gold"}, "1234567890123456788": {"tier": "tin"}}
	en := testEnricher(t, cfg, map[string]Table{"accounts": accounts}, nil)
	pseudonyms := map[string]string{}
	for _, acct := range []string{"1234567890123456789", "1234567890123456788"} {
		e := event("order.created", `{"account":`+acct+`,"ext":{"id":98765432109876543210, "note":"a\u00e9"},"f":0.10000000000000000555,"e":1e400,"card":"4111","buyer":{"ip":"203.0.113.9","n":9007199254740993}}`)
		en.Enrich(e)
		var data map[string]json.RawMessage
		if err := json.Unmarshal(e.Data, &data); err != nil {
			t.Fatal(err)
		}
		for k, want := range map[string]string{
			"ext": `{"id":98765432109876543210, "note":"a\u00e9"}`, "f": "0.10000000000000000555", "e": "1e400",
			"buyer": `{"ip":"203.0.113.0","n":9007199254740993}`,
		} {
			if got := string(data[k]); got != want {
				t.Errorf("account %s: data.%s = %s, want %s", acct, k, got, want)
			}
		}
		// Removed though data does not decode whole (1e400 is beyond float64: the
		// mask did not apply before).
		if _, ok := data["card"]; ok || e.Enrichment["card_gone"] != true {
			t.Errorf("account %s: card kept (%s), card_gone %v", acct, data["card"], e.Enrichment["card_gone"])
		}
		var p string
		if err := json.Unmarshal(data["account"], &p); err != nil || len(p) != 64 {
			t.Fatalf("account %s: pseudonym %s (%v)", acct, data["account"], err)
		}
		pseudonyms[acct] = p
		if want := accounts[acct]["tier"]; e.Enrichment["acct_tier"] != want {
			t.Errorf("account %s: the lookup found tier %v, want %v", acct, e.Enrichment["acct_tier"], want)
		}
	}
	if pseudonyms["1234567890123456789"] == pseudonyms["1234567890123456788"] {
		t.Error("two accounts share one pseudonym")
	}
	// An id float64 holds keeps the pseudonym it had (its text as keyString gave).
	mac := hmac.New(sha256.New, []byte("s3cret"))
	mac.Write([]byte("42"))
	e := event("order.created", `{"account":42.0}`)
	en.Enrich(e)
	if want := `{"account":"` + hex.EncodeToString(mac.Sum(nil)) + `"}`; string(e.Data) != want {
		t.Errorf("data %s, want %s", e.Data, want)
	}
	// A repeated name: each repeat masked on its own (an address truncated, anything
	// else removed), the decoded data holding the last's.
	e = event("order.created", `{"buyer":{"ip":"203.0.113.9","ip":"not an address"}}`)
	en.Enrich(e)
	if want := `{"buyer":{"ip":"203.0.113.0"}}`; string(e.Data) != want {
		t.Errorf("repeated name: data %s, want %s", e.Data, want)
	}
}

// A JSON-lines table keyed by a number float64 cannot hold keeps its digits as
// the key, as the events' lookups read them.
func TestJSONLinesTableBigKeys(t *testing.T) {
	jt, err := loadFileTable(writeFile(t, "big.jsonl", `{"id":1234567890123456789,"tier":"gold"}`+"\n"+`{"id":1234567890123456788,"tier":"tin"}`+"\n"+`{"id":7,"tier":"small"}`+"\n"), "id")
	if err != nil {
		t.Fatal(err)
	}
	for key, tier := range map[string]string{"1234567890123456789": "gold", "1234567890123456788": "tin", "7": "small"} {
		if row, ok := jt.Get(key); !ok || row["tier"] != tier {
			t.Errorf("%s = %v, want tier %s", key, row, tier)
		}
	}
	if n, _ := jt.rows.Load().Repeated(); n != 0 {
		t.Errorf("%d rows repeat a key", n)
	}
}

func TestMaskTruncate(t *testing.T) {
	tests := []struct{ in, want string }{
		{"192.0.2.200", "192.0.2.0"},
		{"::ffff:192.0.2.200", "192.0.2.0"},
		{"2001:db8:1:2:3::4", "2001:db8:1::"},
	}
	for _, tt := range tests {
		if got, ok := truncateIP(tt.in); !ok || got != tt.want {
			t.Errorf("truncateIP(%s) = %s", tt.in, got)
		}
	}
	if _, ok := truncateIP("localhost"); ok {
		t.Error("truncated a name")
	}
}

func TestEnrichConfigErrors(t *testing.T) {
	cfg := DefaultEnrichConfig()
	cfg.Tables = []TableConfig{{Name: "t", File: "x.txt"}, {Name: "t", KV: "b", File: "y.csv", Key: "id"}}
	cfg.Rules = []RuleConfig{{
		Subjects: "events..x",
		Lookups:  []LookupConfig{{Table: "nope", From: "dat.user", To: "u"}},
		Derived:  []DerivedConfig{{Name: "d", Expr: "1 +"}, {Name: "e"}},
		Mask:     []MaskConfig{{Field: "source", How: "blur"}, {Field: "data.e", How: MaskHMAC}},
	}}
	err := cfg.Validate()
	for _, want := range []string{
		`enrich.tables[0].key: is required with file`,
		`enrich.tables[1].name: "t" is used twice`,
		`enrich.tables[1]: set exactly one of kv and file`,
		`enrich.rules[0].subjects: "events..x" is not a subject pattern`,
		`enrich.rules[0].lookups[0].table: no table named "nope"`,
		`enrich.rules[0].lookups[0].from: "dat.user"`,
		`enrich.rules[0].derived[1]: set exactly one of expr and bucket`,
		`enrich.rules[0].mask[0].field: "source": masks apply to data fields`,
		`enrich.rules[0].mask[0].how: "blur"`,
		`enrich.rules[0].mask[1].secret_env: is required for hmac`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
	// An expression that does not compile is reported with its path.
	cfg = DefaultEnrichConfig()
	cfg.Rules = []RuleConfig{{Derived: []DerivedConfig{{Name: "d", Expr: "nosuch + 1"}}}}
	_, err = NewEnricher(cfg, nil, nil, nil, nil)
	if err == nil || !strings.Contains(err.Error(), "enrich.rules[0].derived[0] (d): unknown name nosuch") {
		t.Fatalf("err = %v", err)
	}
}

func TestFileTable(t *testing.T) {
	ft, err := loadFileTable("testdata/plans.csv", "id")
	if err != nil {
		t.Fatal(err)
	}
	if row, ok := ft.Get("u1"); !ok || row["plan"] != "pro" || row["seats"] != "10" {
		t.Fatalf("u1 = %v", row)
	}
	if _, ok := ft.Get("u9"); ok {
		t.Fatal("u9 found")
	}
	p := writeFile(t, "users.jsonl", `{"id":"a","plan":"pro"}`+"\n"+`{"id":7,"plan":"free"}`+"\n")
	jt, err := loadFileTable(p, "id")
	if err != nil {
		t.Fatal(err)
	}
	if row, ok := jt.Get("7"); !ok || row["plan"] != "free" {
		t.Fatalf("7 = %v", row)
	}
	for name, tc := range map[string]struct{ body, want string }{
		"bad.jsonl":     {"{oops\n", "line 1: not a JSON object"},
		"nokey.csv":     {"a,b\n1,2\n", `no column "id" in the header [a b]`},
		"empty.csv":     {"", "the file is empty: a CSV table starts with a header row"},
		"twice.csv":     {"id,plan,plan\nu1,pro,free\n", `column "plan" appears twice in the header [id plan plan]`},
		"ragged.csv":    {"id,plan\nu1,pro\nu2\n", "wrong number of fields"},
		"nofield.jsonl": {`{"plan":"pro"}` + "\n", `line 1: no key field "id"`},
		"nullkey.jsonl": {`{"id":"u1","plan":"pro"}` + "\n" + `{"id":null,"plan":"free"}` + "\n", `line 2: key field "id" is null; want a string, a number or a boolean`},
		"objkey.jsonl":  {`{"id":{"a":1},"plan":"pro"}` + "\n", `line 1: key field "id" is an object`},
	} {
		_, err := loadFileTable(writeFile(t, name, tc.body), "id")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", name, err, tc.want)
		}
	}
	// Rows of a key seen before: the last is kept, and they are counted.
	rt, err := loadFileTable(writeFile(t, "repeated.csv", "id,plan\nu1,pro\nu2,free\nu1,team\nu2,pro\nu1,free\n"), "id")
	if err != nil {
		t.Fatal(err)
	}
	if row, _ := rt.Get("u1"); row["plan"] != "free" {
		t.Fatalf("u1 = %v, want the last row", row)
	}
	if n, first := rt.rows.Load().Repeated(); n != 3 || first != "u1" {
		t.Fatalf("repeated %d (first %q), want 3 (u1)", n, first)
	}
	if n, _ := jt.rows.Load().Repeated(); n != 0 {
		t.Fatalf("repeated %d in a table without repeats", n)
	}
}

// Table and geo files saved as a spreadsheet's "CSV UTF-8" start with a byte order
// mark: the first column is still found by its name ("no column \"id\" in the
// header [id plan]" before), and the first network still parses.
func TestFilesWithByteOrderMark(t *testing.T) {
	const bom = "\xEF\xBB\xBF"
	for name, body := range map[string]string{"plans.csv": bom + "id,plan\nu1,pro\n", "plans.jsonl": bom + `{"id":"u1","plan":"pro"}` + "\n"} {
		ft, err := loadFileTable(writeFile(t, name, body), "id")
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if row, ok := ft.Get("u1"); !ok || row["plan"] != "pro" {
			t.Fatalf("%s: u1 = %v", name, row)
		}
	}
	g, err := LoadGeo([]string{writeFile(t, "geo.csv", bom+"203.0.113.0/24,ZZ\n")}, []string{"country"})
	if err != nil {
		t.Fatal(err)
	}
	if row, ok := g.Lookup("203.0.113.9"); !ok || len(row) != 1 || row[0] != "ZZ" {
		t.Fatalf("203.0.113.9 = %v", row)
	}
}

// A table file written in place, a part at a time (a copy, a script writing lines),
// is not loaded half-way: a CSV cut at a line's end parses, and loaded then it would
// be a smaller table for a reload interval, every event meanwhile enriched from it
// missing its rows. A reload reads a change only once the file is as it was at the
// check before. The first reload after the first half was written loaded it before.
func TestFileTableWrittenInPlace(t *testing.T) {
	p := writeFile(t, "plans.csv", "id,plan\nu1,free\n")
	at := time.Now().Add(-time.Hour)
	set := func(body string) {
		t.Helper()
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		at = at.Add(time.Second) // a modification time of its own
		if err := os.Chtimes(p, at, at); err != nil {
			t.Fatal(err)
		}
	}
	ft, err := loadFileTable(p, "id")
	if err != nil {
		t.Fatal(err)
	}
	whole := "id,plan\nu1,pro\nu2,pro\nu3,pro\n"
	set(whole[:len("id,plan\nu1,pro\n")]) // the first part, up to a line's end
	if swapped, err := ft.reload(); swapped || err != nil {
		t.Fatalf("a file being written was loaded (%v): u2 and u3 missing from the table", err)
	}
	set(whole) // the rest, before the next check
	if swapped, err := ft.reload(); swapped || err != nil {
		t.Fatalf("a file changed since the last check was loaded (%v)", err)
	}
	if swapped, err := ft.reload(); !swapped || err != nil {
		t.Fatalf("the whole file, unchanged since the last check, not loaded: %v", err)
	}
	for _, k := range []string{"u1", "u2", "u3"} {
		if row, ok := ft.Get(k); !ok || row["plan"] != "pro" {
			t.Fatalf("%s = %v", k, row)
		}
	}
}

// versionedTable is a table whose version the test moves on.
type versionedTable struct {
	rows    staticTable
	version *string
}

func (v versionedTable) Get(k string) (map[string]any, bool) { return v.rows.Get(k) }
func (v versionedTable) Version() string                     { return *v.version }

// What events share (a bucket's text, the table-versions map, a lookup's field
// names) follows what changes: another bucket, another table version.
func TestEnrichFollowsChanges(t *testing.T) {
	cfg := DefaultEnrichConfig()
	cfg.Tables = []TableConfig{{Name: "users", KV: "users"}, {Name: "plans", KV: "plans"}}
	cfg.Rules = []RuleConfig{{
		Lookups: []LookupConfig{{Table: "users", From: "data.user", To: "user"}, {Table: "plans", From: "data.plan", To: "plan"}},
		Derived: []DerivedConfig{{Name: "hour", Bucket: time.Hour}},
	}}
	version := "kv:users@1"
	users := versionedTable{rows: staticTable{"u1": {"plan": "pro"}, "u2": {"plan": "free", "since": "2020"}}, version: &version}
	en := testEnricher(t, cfg, map[string]Table{"users": users, "plans": staticTable{"pro": {"seats": 5.0}}}, nil)
	at := func(h int) time.Time { return time.Date(2026, 11, 21, h, 30, 0, 0, time.UTC) }
	for i, step := range []struct {
		hour    int
		user    string
		version string
		want    map[string]any
	}{
		{10, "u1", "kv:users@1", map[string]any{"hour": "2026-11-21T10:00:00Z", "user_plan": "pro", "plan_seats": 5.0}},
		{11, "u2", "kv:users@1", map[string]any{"hour": "2026-11-21T11:00:00Z", "user_plan": "free", "user_since": "2020"}},
		{10, "u1", "kv:users@2", map[string]any{"hour": "2026-11-21T10:00:00Z", "user_plan": "pro"}},
		{10, "u2", "kv:users@2", map[string]any{"hour": "2026-11-21T10:00:00Z", "user_since": "2020"}},
	} {
		version = step.version
		e := event("page.view", `{"user":"`+step.user+`","plan":"pro"}`)
		e.Time = at(step.hour)
		en.Enrich(e)
		for k, v := range step.want {
			if e.Enrichment[k] != v {
				t.Errorf("event %d: enrichment[%s] = %v, want %v", i, k, e.Enrichment[k], v)
			}
		}
		versions, _ := e.Enrichment[VersionsField].(map[string]string)
		if len(versions) != 2 || versions["users"] != step.version || versions["plans"] != "static:1" {
			t.Errorf("event %d: versions %v, want users at %s", i, versions, step.version)
		}
	}
}

// The enricher decodes only the members of data its rules read: lookups, geo and
// user-agent sources, derived expressions and masks.
func TestEnricherReadsWhatItNeeds(t *testing.T) {
	cfg := DefaultEnrichConfig()
	cfg.Tables = []TableConfig{{Name: "users", KV: "users"}}
	cfg.Rules = []RuleConfig{
		{Lookups: []LookupConfig{{Table: "users", From: "data.user.id", To: "user"}}, UserAgent: &UAConfig{From: "data.ua", To: "ua"}},
		{Types: []string{"order"}, Derived: []DerivedConfig{{Name: "big", Expr: `data.amount > 100`}}, Lookups: []LookupConfig{{Table: "users", From: "source", To: "src"}}},
	}
	en := testEnricher(t, cfg, map[string]Table{"users": staticTable{"u1": {"plan": "pro"}}}, nil)
	if got := en.data.String(); got != "{amount,ua,user}" {
		t.Fatalf("reads %s of data, want {amount,ua,user}", got)
	}
	e := event("order", `{"user":{"id":"u1"},"amount":150,"other":{"deep":[1,2,3]},"ua":"curl/8.0"}`)
	en.Enrich(e)
	if e.Enrichment["user_plan"] != "pro" || e.Enrichment["big"] != true || e.Enrichment["ua_browser"] != "curl 8" {
		t.Fatalf("enrichment %v", e.Enrichment)
	}
	cfg.Rules = append(cfg.Rules, RuleConfig{Mask: []MaskConfig{{Field: "data.password", How: "remove"}}})
	if got := testEnricher(t, cfg, map[string]Table{"users": staticTable{}}, nil).data.String(); got != "{amount,password,ua,user}" {
		t.Fatalf("with a mask reads %s of data, want {amount,password,ua,user}", got)
	}
}

// A lookup key a KV key cannot hold (an e-mail address, a space, ':') is kept
// under "b64." and its base64url; a KV table finds the row by the key itself, and
// a key that can be a KV key is kept as it is.
func TestKVKeys(t *testing.T) {
	for _, k := range []string{"u7", "a.b", "x-y_z=/1"} {
		if got := KVKey(k); got != k {
			t.Errorf("KVKey(%q) = %q, want it unchanged", k, got)
		}
	}
	for _, k := range []string{"alice@example.com", "user 1", "user:1", ".x", "x.", "a..b", "ü", "b64.abc", "*", ">"} {
		got := KVKey(k)
		if !strings.HasPrefix(got, "b64.") || lookupKey(got) != k || !kvKeyChars.MatchString(got) {
			t.Errorf("KVKey(%q) = %q, read back as %q", k, got, lookupKey(got))
		}
	}
	_, js := natstest.Run(t).Connect(t)
	ctx := context.Background()
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "users"})
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{KVKey("alice@example.com"): `{"plan":"pro"}`, "u7": `{"plan":"free"}`} {
		if _, err := kv.Put(ctx, k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	table, stop, err := watchKV(ctx, js, "users", 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if row, ok := table.Get("alice@example.com"); !ok || row["plan"] != "pro" {
		t.Fatalf("alice@example.com = %v", row)
	}
	if row, ok := table.Get("u7"); !ok || row["plan"] != "free" {
		t.Fatalf("u7 = %v", row)
	}
	if err := kv.Delete(ctx, KVKey("alice@example.com")); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, func() error {
		if _, ok := table.Get("alice@example.com"); ok {
			return errors.New("alice@example.com still in the table after its deletion")
		}
		return nil
	})
}
