package events

import (
	"bytes"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/expr-lang/expr/ast"
	gojson "github.com/goccy/go-json"
)

// DataFields is what a reader of events reads of their data: some of its top-level
// members, or all of it. The zero value is none of it.
type DataFields struct {
	all   bool
	names []string // sorted, each once
}

// AllData is all of data.
func AllData() DataFields { return DataFields{all: true} }

// DataMembers is the named top-level members of data (and all below them).
func DataMembers(names ...string) DataFields {
	names = slices.Clone(names)
	slices.Sort(names)
	return DataFields{names: slices.Compact(names)}
}

// DataFieldsOfPath is what reading a field path reads of data: "data.a.b" its
// member a, "data" all of it, an envelope attribute none of it.
func DataFieldsOfPath(path string) DataFields {
	if path == "data" {
		return AllData()
	}
	rest, ok := strings.CutPrefix(path, "data.")
	if !ok {
		return DataFields{}
	}
	name, _, _ := strings.Cut(rest, ".")
	return DataMembers(name)
}

// ExprDataFields is what an expression over ExprEnv reads of data: the members it
// names as data.x (or data["x"]); all of data where it uses data any other way
// (data[k], "x" in data, data passed to a function, $env).
func ExprDataFields(node ast.Node) DataFields {
	var v dataVisitor
	ast.Walk(&node, &v)
	if v.all || v.idents != len(v.names) {
		return AllData()
	}
	return DataMembers(v.names...)
}

type dataVisitor struct {
	all    bool
	idents int // uses of the identifier data
	names  []string
}

func (v *dataVisitor) Visit(node *ast.Node) {
	switch n := (*node).(type) {
	case *ast.IdentifierNode:
		switch n.Value {
		case "data":
			v.idents++
		case "$env":
			v.all = true
		}
	case *ast.MemberNode:
		if id, ok := n.Node.(*ast.IdentifierNode); ok && id.Value == "data" {
			if s, ok := n.Property.(*ast.StringNode); ok {
				v.names = append(v.names, s.Value)
			}
		}
	}
}

// All reports whether f is all of data.
func (f DataFields) All() bool { return f.all }

// Union is what f or g reads.
func (f DataFields) Union(g DataFields) DataFields {
	if f.all || g.all {
		return AllData()
	}
	return DataMembers(append(slices.Clone(f.names), g.names...)...)
}

// covers reports whether f reads everything g does.
func (f DataFields) covers(g DataFields) bool {
	if f.all {
		return true
	}
	if g.all {
		return false
	}
	for _, n := range g.names {
		if _, found := slices.BinarySearch(f.names, n); !found {
			return false
		}
	}
	return true
}

func (f DataFields) String() string {
	if f.all {
		return "all"
	}
	return "{" + strings.Join(f.names, ",") + "}"
}

// DecodeDataFields decodes at least the members of data that f names, as
// DecodeData would: a reader that reads only those gets what it would from
// DecodeData, with less work (except that a member it does not ask for and that
// does not decode, a number beyond float64, fails DecodeData but not it). Data
// that is not an object, or has an escaped or invalid member name, is decoded
// whole. The result is kept: a later call that asks for no more returns it (and
// DecodeData, all of data, decodes again unless it was).
func (e *Event) DecodeDataFields(f DataFields) (any, error) {
	if e.decodedOK && e.decodedFields.covers(f) {
		return e.decoded, nil
	}
	if len(e.Data) == 0 {
		return nil, nil
	}
	if e.decodedOK {
		f = f.Union(e.decodedFields)
	}
	var data any
	if m, ok := decodeMembers(e.Data, f); ok {
		data = m
	} else {
		if err := gojson.Unmarshal(e.Data, &data); err != nil {
			return nil, err
		}
		f = AllData()
	}
	e.decoded, e.decodedOK, e.decodedFields = data, true, f
	return data, nil
}

// decodeMembers decodes the members of the JSON object b (valid JSON) that f
// names, as decoding all of b into generic values would (a repeated member: the
// last). ok is false where it cannot: f is all, b is not an object, a member's name
// is escaped or not valid UTF-8.
func decodeMembers(b []byte, f DataFields) (map[string]any, bool) {
	b = bytes.TrimSpace(b)
	if f.all || len(b) == 0 || b[0] != '{' {
		return nil, false
	}
	out := make(map[string]any, len(f.names))
	for name, raw := range objectMembers(b) {
		if !plainName(name) {
			return nil, false
		}
		for _, n := range f.names {
			if string(name) == n {
				v, err := decodeValue(raw)
				if err != nil {
					return nil, false
				}
				out[n] = v
				break
			}
		}
	}
	return out, true
}

// decodeValue decodes one JSON value into a generic value; plain strings (valid
// UTF-8, no escapes) and small integers without the decoder.
func decodeValue(raw []byte) (any, error) {
	switch {
	case raw[0] == '"' && bytes.IndexByte(raw, '\\') < 0 && utf8.Valid(raw):
		return string(raw[1 : len(raw)-1]), nil
	case smallInteger(raw):
		return strconv.ParseFloat(string(raw), 64)
	}
	var v any
	err := gojson.Unmarshal(raw, &v)
	return v, err
}

// smallInteger reports whether raw is an integer of at most 15 digits: exactly a
// float64, whoever parses it.
func smallInteger(raw []byte) bool {
	digits := raw
	if len(digits) > 0 && digits[0] == '-' {
		digits = digits[1:]
	}
	if len(digits) == 0 || len(digits) > 15 {
		return false
	}
	for _, c := range digits {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}
