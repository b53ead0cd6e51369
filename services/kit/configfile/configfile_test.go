package configfile

import (
	"strings"
	"testing"
)

type rule struct {
	Name   string `yaml:"name"`
	Filter string `yaml:"filter"`
}

func TestDecode(t *testing.T) {
	src := "rules:\n  - name: a\n    filter: x > 1\nreceivers:\n  - name: r\n    anything: goes\n"
	f, err := Parse("c.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	var rules []rule
	if err := f.Decode("rules", &rules); err != nil {
		t.Fatal(err)
	}
	if len(rules) != 1 || rules[0].Name != "a" || rules[0].Filter != "x > 1" {
		t.Fatalf("rules = %+v", rules)
	}
	var none []rule
	if err := f.Decode("enrich", &none); err != nil || none != nil {
		t.Fatalf("missing section: %v %v", none, err)
	}
}

func TestErrors(t *testing.T) {
	tests := []struct{ name, src, want string }{
		{"unknown section", "rulez: []\n", `line 1: unknown section "rulez"`},
		{"not a mapping", "- a\n", "top level must be a mapping"},
		{"bad yaml", "rules: [\n", "c.yaml"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse("c.yaml", []byte(tt.src))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	f, err := Parse("c.yaml", []byte("receivers: []\nrules:\n  - name: a\n    filtr: x\n"))
	if err != nil {
		t.Fatal(err)
	}
	var rules []rule
	err = f.Decode("rules", &rules)
	if err == nil || !strings.Contains(err.Error(), "line 4: field filtr not found") {
		t.Fatalf("err = %v, want the unknown field with its line in the file", err)
	}
}

func TestDecodeKeepsDefaults(t *testing.T) {
	type section struct {
		A string `yaml:"a"`
		B int    `yaml:"b"`
	}
	f, err := Parse("c.yaml", []byte("dedup:\n  b: 7\n"))
	if err != nil {
		t.Fatal(err)
	}
	v := section{A: "default", B: 1}
	if err := f.Decode("dedup", &v); err != nil {
		t.Fatal(err)
	}
	if v.A != "default" || v.B != 7 {
		t.Fatalf("decoded %+v, want A kept and B from the file", v)
	}
}
