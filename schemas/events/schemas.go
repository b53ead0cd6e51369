package events

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"golang.org/x/text/language"
	"golang.org/x/text/message"
)

//go:embed envelope.schema.json types/*.json
var files embed.FS

// EnvelopeSchema returns the JSON Schema of the normalised envelope (Event's JSON form).
func EnvelopeSchema() []byte {
	b, err := files.ReadFile("envelope.schema.json")
	if err != nil {
		panic(err) // embedded at build time
	}
	return b
}

// TypeSchemas validates the data of events by their type. A type without a schema
// is not checked.
type TypeSchemas struct {
	byType map[string]*jsonschema.Schema
	raw    map[string][]byte
}

// Raw returns the schema document of typ; nil when typ has no schema.
func (ts *TypeSchemas) Raw(typ string) []byte {
	if ts == nil {
		return nil
	}
	return ts.raw[typ]
}

// LoadTypeSchemasWith compiles the embedded schemas and those of dir (a
// <type>.json per type, as in schemas/events/types); one of dir replaces the
// embedded schema of its type. An empty dir gives the embedded ones.
func LoadTypeSchemasWith(dir string) (*TypeSchemas, error) {
	if dir == "" {
		return LoadTypeSchemas()
	}
	sub, err := fs.Sub(files, "types")
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(dir); err != nil {
		return nil, fmt.Errorf("schema directory: %w", err)
	}
	return compileTypeSchemas(sub, os.DirFS(dir))
}

// LoadTypeSchemas compiles the per-type schemas embedded from types/<type>.json.
func LoadTypeSchemas() (*TypeSchemas, error) {
	sub, err := fs.Sub(files, "types")
	if err != nil {
		return nil, err
	}
	return CompileTypeSchemas(sub)
}

// CompileTypeSchemas compiles every <type>.json file at the top of fsys; the file
// name without .json is the CloudEvents type it validates.
func CompileTypeSchemas(fsys fs.FS) (*TypeSchemas, error) { return compileTypeSchemas(fsys) }

// compileTypeSchemas compiles the <type>.json files of each fsys in turn; a later
// one's schema of a type replaces an earlier one's.
func compileTypeSchemas(fsyss ...fs.FS) (*TypeSchemas, error) {
	type file struct {
		fsys fs.FS
		name string
	}
	byName := map[string]file{}
	for _, fsys := range fsyss {
		names, err := fs.Glob(fsys, "*.json")
		if err != nil {
			return nil, err
		}
		for _, name := range names {
			byName[name] = file{fsys, name}
		}
	}
	names := make([]string, 0, len(byName))
	for name := range byName {
		names = append(names, name)
	}
	sort.Strings(names)
	c := jsonschema.NewCompiler()
	ts := &TypeSchemas{byType: make(map[string]*jsonschema.Schema, len(names)), raw: make(map[string][]byte, len(names))}
	var errs []error
	for _, name := range names {
		b, err := fs.ReadFile(byName[name].fsys, name)
		if err != nil {
			return nil, err
		}
		doc, err := jsonschema.UnmarshalJSON(bytes.NewReader(b))
		if err != nil {
			errs = append(errs, fmt.Errorf("schema %s: %w", name, err))
			continue
		}
		url := "sluice:///types/" + name
		if err := c.AddResource(url, doc); err != nil {
			errs = append(errs, fmt.Errorf("schema %s: %w", name, err))
			continue
		}
		sch, err := c.Compile(url)
		if err != nil {
			errs = append(errs, fmt.Errorf("schema %s: %w", name, err))
			continue
		}
		typ := strings.TrimSuffix(path.Base(name), ".json")
		ts.byType[typ], ts.raw[typ] = sch, b
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return ts, nil
}

// Validate checks data against the schema of typ, if there is one.
func (ts *TypeSchemas) Validate(typ string, data []byte) error {
	sch, ok := ts.byType[typ]
	if !ok {
		return nil
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(data))
	if err != nil {
		return invalid("data is not valid JSON: %v", err)
	}
	if err := sch.Validate(inst); err != nil {
		var ve *jsonschema.ValidationError
		if errors.As(err, &ve) {
			return invalid("data does not match the schema of type %q: %s", typ, describe(ve))
		}
		return invalid("data does not match the schema of type %q: %v", typ, err)
	}
	return nil
}

// describe renders the leaf causes of a validation error on one line.
func describe(ve *jsonschema.ValidationError) string {
	p := message.NewPrinter(language.English)
	var parts []string
	var walk func(*jsonschema.ValidationError)
	walk = func(e *jsonschema.ValidationError) {
		if len(e.Causes) == 0 {
			parts = append(parts, "at /"+strings.Join(e.InstanceLocation, "/")+": "+e.ErrorKind.LocalizedString(p))
			return
		}
		for _, c := range e.Causes {
			walk(c)
		}
	}
	walk(ve)
	return strings.Join(parts, "; ")
}
