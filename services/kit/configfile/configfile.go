// Package configfile reads the one YAML file (SLUICE_CONFIG) that holds the
// enrichment, rule and receiver sections; each service decodes its own sections,
// strictly, so a misspelt key is an error that names its line.
package configfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Sections lists the top-level keys the file may hold.
var Sections = []string{"ingest", "typed_tables", "dedup", "enrich", "alert", "rules", "notify", "receivers", "routes"}

// File is a parsed config file, kept as YAML nodes until a service decodes its part.
type File struct {
	Path     string
	raw      []byte
	sections map[string]*yaml.Node
}

// Load reads and parses path. An empty path is an empty config.
func Load(path string) (*File, error) {
	if path == "" {
		return &File{sections: map[string]*yaml.Node{}}, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(path, b)
}

// Parse parses b, named path in errors.
func Parse(path string, b []byte) (*File, error) {
	f := &File{Path: path, raw: b, sections: map[string]*yaml.Node{}}
	var doc yaml.Node
	if err := yaml.NewDecoder(bytes.NewReader(b)).Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return f, nil
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	if len(doc.Content) == 0 {
		return f, nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config %s: line %d: the top level must be a mapping with keys %s", path, root.Line, strings.Join(Sections, ", "))
	}
	var errs []error
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		if !known(k.Value) {
			errs = append(errs, fmt.Errorf("config %s: line %d: unknown section %q (want one of %s)", path, k.Line, k.Value, strings.Join(Sections, ", ")))
			continue
		}
		f.sections[k.Value] = v
	}
	return f, errors.Join(errs...)
}

func known(name string) bool { return slices.Contains(Sections, name) }

// Decode decodes section name into v (a pointer), rejecting unknown fields, with
// line numbers of the whole file in errors. Fields the section leaves out keep the
// value v had (its defaults); a missing section leaves v as it is.
func (f *File) Decode(name string, v any) error {
	if _, ok := f.sections[name]; !ok {
		return nil
	}
	target := reflect.ValueOf(v)
	if target.Kind() != reflect.Pointer || target.IsNil() {
		return fmt.Errorf("config: Decode(%q) needs a non-nil pointer, got %T", name, v)
	}
	// Decode the whole document into a struct whose field for this section has v's
	// type and whose other sections are left as nodes, so KnownFields applies to this
	// section only and line numbers stay true to the file.
	fields := make([]reflect.StructField, 0, len(Sections))
	for i, s := range Sections {
		typ := reflect.TypeFor[yaml.Node]()
		if s == name {
			typ = target.Elem().Type()
		}
		fields = append(fields, reflect.StructField{
			Name: fmt.Sprintf("F%d", i),
			Type: typ,
			Tag:  reflect.StructTag(fmt.Sprintf(`yaml:%q`, s)),
		})
	}
	doc := reflect.New(reflect.StructOf(fields))
	// Start from v's current value, so fields the file leaves out keep their defaults.
	doc.Elem().Field(slices.Index(Sections, name)).Set(target.Elem())
	dec := yaml.NewDecoder(bytes.NewReader(f.raw))
	dec.KnownFields(true)
	if err := dec.Decode(doc.Interface()); err != nil {
		return fmt.Errorf("config %s: %w", f.Path, err)
	}
	target.Elem().Set(doc.Elem().Field(slices.Index(Sections, name)))
	return nil
}
