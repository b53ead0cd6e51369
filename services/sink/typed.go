package sink

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"maps"
	"math/big"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"
	"github.com/nats-io/nats.go/jetstream"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/streams"
)

// Typed tables: for an event type with a JSON Schema, a table with one typed column
// per property of its data, so that plain SQL reads them (SELECT user,
// sum(amount) FROM order_created GROUP BY user) instead of visitParamExtract* over
// the data string. Nested properties are flattened (customer.country becomes
// customer_country), arrays of scalars are ClickHouse arrays, anything else is its
// JSON text in a String column. A property that is not required, or sits under one
// that is not, is Nullable; an array is empty when absent. The writer that inserts
// an event's events row inserts its typed row too, with the same exactly-once
// check (stream_seq and the event key). See docs/ingest.md.

// TypedConfig is the typed_tables section of SLUICE_CONFIG.
type TypedConfig struct {
	// Types are the event types that get a table; each needs a schema (embedded, or
	// in the directory ingest.schemas).
	Types []string `yaml:"types"`
	// Separator joins the names of nested properties into column names ("_").
	Separator string `yaml:"separator"`
}

// LoadTypedConfig reads the typed_tables section of f.
func LoadTypedConfig(f *configfile.File) (TypedConfig, error) {
	c := TypedConfig{Separator: "_"}
	if err := f.Decode("typed_tables", &c); err != nil {
		return c, err
	}
	if !validColumn.MatchString("a" + c.Separator + "b") {
		return c, fmt.Errorf("typed_tables.separator %q: want letters, digits or underscores", c.Separator)
	}
	return c, nil
}

// LoadTypedTables reads the typed_tables section of f and builds its tables from
// the schemas (the embedded ones and those of ingest.schemas).
func LoadTypedTables(f *configfile.File) ([]*TypedTable, error) {
	c, err := LoadTypedConfig(f)
	if err != nil || len(c.Types) == 0 {
		return nil, err
	}
	var in events.Ingest
	if err := f.Decode("ingest", &in); err != nil {
		return nil, err
	}
	types, err := in.TypeSchemas()
	if err != nil {
		return nil, err
	}
	return NewTypedTables(c, types)
}

// NewTypedTables builds the tables of c from the schemas in types.
func NewTypedTables(c TypedConfig, types *events.TypeSchemas) ([]*TypedTable, error) {
	var (
		out  []*TypedTable
		errs []error
	)
	names := map[string]string{}
	for _, typ := range c.Types {
		raw := types.Raw(typ)
		if raw == nil {
			errs = append(errs, fmt.Errorf("typed_tables.types: %q has no schema (add %s.json to the directory ingest.schemas)", typ, typ))
			continue
		}
		t, err := NewTypedTable(typ, raw, c.Separator)
		if err != nil {
			errs = append(errs, fmt.Errorf("typed_tables.types: %w", err))
			continue
		}
		if other, ok := names[t.Name]; ok {
			errs = append(errs, fmt.Errorf("typed_tables.types: %q and %q both make table %s", other, typ, t.Name))
			continue
		}
		names[t.Name] = typ
		out = append(out, t)
	}
	return out, errors.Join(errs...)
}

// TypedTable is the typed table of one event type.
type TypedTable struct {
	*Table
	// Type is the CloudEvents type whose events fill it.
	Type  string
	props []property
	// root finds the properties in data in one pass over it.
	root *node
}

// node is one object level of the schema: the properties and objects under it, by
// member name.
type node struct {
	children map[string]*node
	prop     int // index in props; -1 for an object with properties under it
}

func (n *node) add(path []string, prop int) {
	for _, step := range path {
		if n.children == nil {
			n.children = map[string]*node{}
		}
		c, ok := n.children[step]
		if !ok {
			c = &node{prop: -1}
			n.children[step] = c
		}
		n = c
	}
	n.prop = prop
}

// find stores in raws the raw value of each property under n found in obj.
func (n *node) find(obj []byte, raws [][]byte) {
	for name, v := range events.Members(obj) {
		c, ok := n.children[string(name)]
		if !ok {
			if c, ok = n.children[events.MemberName(name)]; !ok {
				continue
			}
		}
		if c.prop >= 0 {
			raws[c.prop] = v
		} else {
			c.find(v, raws)
		}
	}
}

// typedFixed are the columns every typed table has before the properties'.
var typedFixed = []Column{
	{"event_key", "String"}, {"event_id", "String"}, {"event_source", "String"},
	{"event_time", "DateTime"}, {"event_time_ms", "UInt16"}, {"stream_seq", "UInt64"},
}

// property is one column made from the schema.
type property struct {
	path     []string
	kind     kind
	array    bool
	nullable bool
}

type kind int

const (
	kindString kind = iota
	kindInt
	kindFloat
	kindBool
	kindJSON // the value's JSON text
)

func (p property) chType() string {
	base := [...]string{kindString: "String", kindInt: "Int64", kindFloat: "Float64", kindBool: "UInt8", kindJSON: "String"}[p.kind]
	switch {
	case p.array:
		return "Array(" + base + ")"
	case p.nullable:
		return "Nullable(" + base + ")"
	}
	return base
}

var (
	validColumn = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	notWord     = regexp.MustCompile(`[^A-Za-z0-9_]`)
)

// TypedTableName is the table of typ: order.created is order_created.
func TypedTableName(typ string) string {
	name := notWord.ReplaceAllString(typ, "_")
	if name == "" || (name[0] >= '0' && name[0] <= '9') {
		name = "_" + name
	}
	return name
}

// NewTypedTable makes the table of typ from its data's JSON Schema.
func NewTypedTable(typ string, schema []byte, sep string) (*TypedTable, error) {
	var root map[string]any
	if err := json.Unmarshal(schema, &root); err != nil {
		return nil, fmt.Errorf("schema of %q: %w", typ, err)
	}
	if _, ok := root["properties"].(map[string]any); !ok {
		return nil, fmt.Errorf("schema of %q has no properties: a typed table needs an object schema with properties", typ)
	}
	t := &TypedTable{Type: typ}
	if err := walkSchema(root, nil, false, &t.props); err != nil {
		return nil, fmt.Errorf("schema of %q: %w", typ, err)
	}
	name := TypedTableName(typ)
	t.Table = &Table{Name: name, Stream: streams.Enriched, Consumer: "typed_" + name, Identity: "event_key",
		Columns: slices.Clone(typedFixed), Columnar: true}
	t.root = &node{prop: -1}
	for i, p := range t.props {
		t.root.add(p.path, i)
	}
	owner := map[string]string{}
	for _, c := range typedFixed {
		owner[c.Name] = "sluice's column"
	}
	for _, p := range t.props {
		col := strings.Join(p.path, sep)
		if !validColumn.MatchString(col) {
			col = notWord.ReplaceAllString(col, "_")
			if !validColumn.MatchString(col) {
				col = "_" + col
			}
		}
		prop := strings.Join(p.path, ".")
		if other, ok := owner[col]; ok {
			return nil, fmt.Errorf("schema of %q: property %s and %s both make column %s", typ, prop, other, col)
		}
		owner[col] = "property " + prop
		t.Columns = append(t.Columns, Column{col, p.chType()})
	}
	t.Row = func(msg jetstream.Msg, seq uint64) (Row, error) {
		e, err := events.Unmarshal(msg.Data())
		if err != nil {
			return Row{}, err
		}
		if e.Type != t.Type {
			return Row{}, ErrNoRow
		}
		vals, err := t.Values(e, seq)
		return Row{Values: vals, Time: e.Time}, err
	}
	return t, nil
}

// ErrNoRow is Table.Row's answer for a message that has no row in the table (an
// event of another type): it is acked without one.
var ErrNoRow = errors.New("no row in this table")

// schemaTypes returns the JSON types a schema allows ("type": a name or a list).
func schemaTypes(s map[string]any) []string {
	switch v := s["type"].(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, t := range v {
			if name, ok := t.(string); ok {
				out = append(out, name)
			}
		}
		return out
	}
	return nil
}

func walkSchema(s map[string]any, path []string, optional bool, out *[]property) error {
	props, _ := s["properties"].(map[string]any)
	required := map[string]bool{}
	if req, ok := s["required"].([]any); ok {
		for _, r := range req {
			if name, ok := r.(string); ok {
				required[name] = true
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(props)) {
		sub, _ := props[name].(map[string]any)
		p := property{path: append(slices.Clip(path), name), kind: kindJSON}
		types := schemaTypes(sub)
		p.nullable = optional || !required[name] || slices.Contains(types, "null")
		types = slices.DeleteFunc(slices.Clone(types), func(t string) bool { return t == "null" })
		if len(types) == 1 {
			switch types[0] {
			case "object":
				if _, ok := sub["properties"].(map[string]any); ok {
					if err := walkSchema(sub, p.path, p.nullable, out); err != nil {
						return err
					}
					continue
				}
			case "array":
				p.array, p.nullable = true, false
				items, _ := sub["items"].(map[string]any)
				if it := schemaTypes(items); len(it) == 1 {
					p.kind = scalarKind(it[0])
				}
			default:
				p.kind = scalarKind(types[0])
			}
		}
		*out = append(*out, p)
	}
	return nil
}

func scalarKind(t string) kind {
	switch t {
	case "string":
		return kindString
	case "integer":
		return kindInt
	case "number":
		return kindFloat
	case "boolean":
		return kindBool
	}
	return kindJSON
}

// Values is the typed row of e, stored from stream sequence seq, in Columns' order.
// It reads the properties' values from the data's JSON text in one pass, without
// decoding the rest.
func (t *TypedTable) Values(e *events.Event, seq uint64) ([]any, error) {
	if len(e.Data) == 0 {
		return nil, fmt.Errorf("an event of type %s without data has no row in %s", t.Type, t.Name)
	}
	at, ms := splitMillis(e.Time)
	vals := make([]any, 0, len(t.Columns))
	vals = append(vals, e.Key, e.ID, e.Source, at, ms, seq)
	raws := make([][]byte, len(t.props))
	t.root.find(e.Data, raws)
	for i, p := range t.props {
		raw := raws[i]
		if raw != nil && isNull(raw) {
			raw = nil
		}
		v, err := p.value(raw)
		if err != nil {
			return nil, fmt.Errorf("property %s: %w", strings.Join(p.path, "."), err)
		}
		vals = append(vals, v)
	}
	return vals, nil
}

func isNull(raw []byte) bool { return string(raw) == "null" }

// value converts raw, a JSON value (nil: absent or null), to p's column.
func (p property) value(raw []byte) (any, error) {
	if p.array {
		if raw != nil && raw[0] != '[' {
			return nil, fmt.Errorf("is %s, not an array", events.JSONKind(raw))
		}
		return arrayOf(p.kind, raw)
	}
	if raw == nil {
		if p.nullable {
			return nullOf(p.kind), nil
		}
		return nil, fmt.Errorf("is missing")
	}
	x, err := scalar(p.kind, raw)
	if err != nil || !p.nullable {
		return x, err
	}
	switch x := x.(type) {
	case string:
		return &x, nil
	case int64:
		return &x, nil
	case float64:
		return &x, nil
	case uint8:
		return &x, nil
	}
	return x, nil
}

func nullOf(k kind) any {
	switch k {
	case kindInt:
		return (*int64)(nil)
	case kindFloat:
		return (*float64)(nil)
	case kindBool:
		return (*uint8)(nil)
	}
	return (*string)(nil)
}

func isNumber(raw []byte) bool { return raw[0] == '-' || (raw[0] >= '0' && raw[0] <= '9') }

func scalar(k kind, raw []byte) (any, error) {
	switch k {
	case kindString:
		if s, ok := events.Unquote(raw); ok {
			return s, nil
		}
		return nil, fmt.Errorf("is %s, not a string", events.JSONKind(raw))
	case kindInt:
		if !isNumber(raw) {
			return nil, fmt.Errorf("is %s, not an integer", events.JSONKind(raw))
		}
		if i, err := strconv.ParseInt(string(raw), 10, 64); err == nil {
			return i, nil
		}
		// JSON Schema's integers include 1.0 and 1e3. The exponent is bounded before
		// big.Rat sees it: 1e999999999 would take gigabytes.
		notInt := fmt.Errorf("%s is not an integer that fits Int64", raw)
		if e := strings.IndexAny(string(raw), "eE"); len(raw) > 400 || (e >= 0 && len(strings.TrimLeft(string(raw[e+1:]), "+-")) > 2) {
			return nil, notInt
		}
		r, ok := new(big.Rat).SetString(string(raw))
		if !ok || !r.IsInt() || !r.Num().IsInt64() {
			return nil, notInt
		}
		return r.Num().Int64(), nil
	case kindFloat:
		if !isNumber(raw) {
			return nil, fmt.Errorf("is %s, not a number", events.JSONKind(raw))
		}
		f, err := strconv.ParseFloat(string(raw), 64)
		if err != nil {
			return nil, fmt.Errorf("%s does not fit Float64", raw)
		}
		return f, nil
	case kindBool:
		switch string(raw) {
		case "true":
			return uint8(1), nil
		case "false":
			return uint8(0), nil
		}
		return nil, fmt.Errorf("is %s, not a boolean", events.JSONKind(raw))
	}
	return string(raw), nil // its JSON text
}

func arrayOf(k kind, raw []byte) (any, error) {
	switch k {
	case kindInt:
		return items[int64](k, raw)
	case kindFloat:
		return items[float64](k, raw)
	case kindBool:
		return items[uint8](k, raw)
	}
	return items[string](k, raw)
}

// items converts the elements of raw, a JSON array, to k's Go type T.
func items[T any](k kind, raw []byte) ([]T, error) {
	out := []T{}
	for i, el := range events.Elements(raw) {
		if isNull(el) {
			return nil, fmt.Errorf("item %d is null", i)
		}
		x, err := scalar(k, el)
		if err != nil {
			return nil, fmt.Errorf("item %d: %w", i, err)
		}
		out = append(out, x.(T))
	}
	return out, nil
}

// CreateSQL creates the table (if it does not exist): MergeTree, by month of the
// event time, ordered by event time and key.
func (t *TypedTable) CreateSQL() string {
	var b strings.Builder
	fmt.Fprintf(&b, "CREATE TABLE IF NOT EXISTS %s\n(\n", t.Name)
	for _, c := range t.Columns {
		fmt.Fprintf(&b, "    `%s` %s,\n", c.Name, c.Type)
	}
	b.WriteString("    inserted_at DateTime DEFAULT now()\n)\nENGINE = MergeTree()\nPARTITION BY toYYYYMM(event_time)\nORDER BY (event_time, event_key)")
	return b.String()
}

// fencedNames are the Null table the pipeline inserts t's rows into and its
// materialized view into t (see Fence), named by a hash of t's columns: a schema
// that gains properties gets a new pair, and workers that still run the old schema
// go on with theirs (on 18.16 its view refuses their inserts once t has columns it
// does not name, and they retry until restarted with the new schema).
func (t *TypedTable) fencedNames() (table, view string) {
	h := fnv.New32a()
	for _, c := range t.Columns {
		h.Write([]byte(c.Name + " " + c.Type + "\n"))
	}
	sum := fmt.Sprintf("%08x", h.Sum32())
	return t.Name + "_fenced_" + sum, t.Name + "_fence_" + sum
}

// FencedSQL creates the fence of t: a Null table with t's columns and the fence's
// partition and generation, and a materialized view that passes into t the rows of
// each partition's newest generation.
func (t *TypedTable) FencedSQL() []string {
	table, view := t.fencedNames()
	var cols, names strings.Builder
	for _, c := range t.Columns {
		fmt.Fprintf(&cols, "    `%s` %s,\n", c.Name, c.Type)
		fmt.Fprintf(&names, "`%s`, ", c.Name)
	}
	return []string{
		fmt.Sprintf("CREATE TABLE IF NOT EXISTS %s\n(\n%s    partition UInt32,\n    gen UInt64\n)\nENGINE = Null", table, cols.String()),
		fmt.Sprintf("CREATE MATERIALIZED VIEW IF NOT EXISTS %s TO %s AS\nSELECT %snow() AS inserted_at\nFROM %s\nWHERE %s", view, t.Name, names.String(), table, fenceFilter),
	}
}

// MigrateTyped creates t, or adds the columns of properties new to its schema, and
// the Null table and view the pipeline inserts t's rows through (FencedSQL), on
// target: one server, or every node of its cluster (each statement as
// target.ForCluster makes it: t a Distributed table over <name>_local, a
// ReplicatedMergeTree). A column whose type the schema changed is an error naming
// the property: its rows would need rewriting.
func MigrateTyped(ctx context.Context, conn driver.Conn, target chmigrate.Target, t *TypedTable) error {
	exec := func(what, stmt string) error {
		stmts, err := target.ForCluster(stmt)
		if err != nil {
			return fmt.Errorf("typed table %s: %s: %w", t.Name, what, err)
		}
		for _, s := range stmts {
			if err := conn.Exec(ctx, s); err != nil {
				return fmt.Errorf("typed table %s: %s: %w", t.Name, what, err)
			}
		}
		return nil
	}
	for attempt := 0; ; attempt++ {
		have, err := tableColumns(ctx, conn, target.LocalName(t.Name))
		if err != nil {
			return err
		}
		if len(have) == 0 {
			if err := exec("create", t.CreateSQL()); err != nil {
				return err
			}
			continue
		}
		var errs []error
		var add []Column
		for i, c := range t.Columns {
			got, ok := have[c.Name]
			switch {
			case !ok:
				add = append(add, c)
			case got != c.Type:
				what := "column " + c.Name
				if i >= len(typedFixed) {
					what = "property " + strings.Join(t.props[i-len(typedFixed)].path, ".")
				}
				errs = append(errs, fmt.Errorf("typed table %s: %s is %s in the table and %s in the schema of %q; a changed type needs a new table (rename or drop the old one, docs/ingest.md)",
					t.Name, what, got, c.Type, t.Type))
			}
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		if len(add) == 0 {
			for _, stmt := range t.FencedSQL() {
				if err := exec("fence", stmt); err != nil {
					return err
				}
			}
			return nil
		}
		for _, c := range add {
			if err := exec("add column "+c.Name, fmt.Sprintf("ALTER TABLE %s ADD COLUMN `%s` %s", t.Name, c.Name, c.Type)); err != nil {
				if attempt < 3 { // another worker may have added it meanwhile
					break
				}
				return err
			}
		}
	}
}

func tableColumns(ctx context.Context, conn driver.Conn, table string) (map[string]string, error) {
	rows, err := conn.Query(ctx, "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = ?", table)
	if err != nil {
		return nil, fmt.Errorf("read columns of %s: %w", table, err)
	}
	defer rows.Close()
	have := map[string]string{}
	for rows.Next() {
		var name, typ string
		if err := rows.Scan(&name, &typ); err != nil {
			return nil, fmt.Errorf("read columns of %s: %w", table, err)
		}
		have[name] = typ
	}
	return have, rows.Err()
}

// insertColumns inserts rows into t a column at a time, each column's values
// gathered into a slice of its Go type: several times cheaper than appending row by
// row (clickhouse-go converts each value of a row through reflection).
//
// extra, if set, gives the values of t's last columns, not in rows, for a block of
// n rows (the same for every row: a fence's partition and generation).
func insertColumns(ctx context.Context, conn driver.Conn, t *Table, rows [][]any, extra func(n int) []any) error {
	b, err := conn.PrepareBatch(keepInsertWhole(ctx), t.InsertSQL())
	if err != nil {
		return fmt.Errorf("prepare insert into %s: %w", t.Name, err)
	}
	defer func() { _ = b.Abort() }()
	// insertBlockRows at a time, as InsertEvents does: the driver reuses one
	// block's buffers.
	for lo := 0; lo < len(rows); lo += insertBlockRows {
		if lo > 0 {
			if err := b.Flush(); err != nil {
				return fmt.Errorf("insert into %s: %w", t.Name, err)
			}
		}
		block := rows[lo:min(lo+insertBlockRows, len(rows))]
		var more []any
		if extra != nil {
			more = extra(len(block))
		}
		for i, c := range t.Columns {
			var col any
			if j := i - (len(t.Columns) - len(more)); j >= 0 {
				col = more[j]
			} else if col, err = gather(c.Type, block, i); err != nil {
				return fmt.Errorf("insert into %s: column %s: %w", t.Name, c.Name, err)
			}
			if err := b.Column(i).Append(col); err != nil {
				return fmt.Errorf("append to %s.%s: %w", t.Name, c.Name, err)
			}
		}
	}
	if err := b.Send(); err != nil {
		return fmt.Errorf("insert into %s: %w", t.Name, err)
	}
	return nil
}

// gather is column i of rows as a slice of the Go type of chType.
func gather(chType string, rows [][]any, i int) (any, error) {
	switch chType {
	case "String":
		return gatherAs[string](rows, i)
	case "Nullable(String)":
		return gatherAs[*string](rows, i)
	case "Int64":
		return gatherAs[int64](rows, i)
	case "Nullable(Int64)":
		return gatherAs[*int64](rows, i)
	case "Float64":
		return gatherAs[float64](rows, i)
	case "Nullable(Float64)":
		return gatherAs[*float64](rows, i)
	case "UInt8":
		return gatherAs[uint8](rows, i)
	case "Nullable(UInt8)":
		return gatherAs[*uint8](rows, i)
	case "UInt16":
		return gatherAs[uint16](rows, i)
	case "UInt64":
		return gatherAs[uint64](rows, i)
	case "DateTime":
		return gatherAs[time.Time](rows, i)
	case "Array(String)":
		return gatherAs[[]string](rows, i)
	case "Array(Int64)":
		return gatherAs[[]int64](rows, i)
	case "Array(Float64)":
		return gatherAs[[]float64](rows, i)
	case "Array(UInt8)":
		return gatherAs[[]uint8](rows, i)
	}
	return nil, fmt.Errorf("no columnar insert for type %s", chType)
}

func gatherAs[T any](rows [][]any, i int) ([]T, error) {
	out := make([]T, len(rows))
	for j, r := range rows {
		v, ok := r[i].(T)
		if !ok {
			var want T
			return nil, fmt.Errorf("row %d holds %T, want %T", j, r[i], want)
		}
		out[j] = v
	}
	return out, nil
}
