package events

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"io/fs"
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
func CompileTypeSchemas(fsys fs.FS) (*TypeSchemas, error) {
	names, err := fs.Glob(fsys, "*.json")
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	c := jsonschema.NewCompiler()
	ts := &TypeSchemas{byType: make(map[string]*jsonschema.Schema, len(names))}
	var errs []error
	for _, name := range names {
		b, err := fs.ReadFile(fsys, name)
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
		ts.byType[strings.TrimSuffix(path.Base(name), ".json")] = sch
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
