package settings

import (
	"flag"
	"io"
	"strings"
	"testing"
)

func TestMemoryLimit(t *testing.T) {
	parse := func(env map[string]string, args ...string) (uint64, error) {
		fs := flag.NewFlagSet("x", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		var n uint64
		if err := BindMemoryLimit(fs, func(k string) (string, bool) { v, ok := env[k]; return v, ok }, &n); err != nil {
			return 0, err
		}
		return n, fs.Parse(args)
	}
	for _, c := range []struct {
		env  map[string]string
		args []string
		want uint64
	}{
		{nil, nil, 360 << 20},
		{map[string]string{"SLUICE_MEMORY_LIMIT": "1GiB"}, nil, 1 << 30},
		{map[string]string{"SLUICE_MEMORY_LIMIT": "400MB"}, nil, 400_000_000},
		{map[string]string{"SLUICE_MEMORY_LIMIT": "off"}, nil, 0},
		{map[string]string{"SLUICE_MEMORY_LIMIT": "1GiB"}, []string{"--memory-limit", "512 MiB"}, 512 << 20},
		{nil, []string{"--memory-limit", "0"}, 0},
	} {
		got, err := parse(c.env, c.args...)
		if err != nil || got != c.want {
			t.Errorf("env %v, args %q: %d, %v; want %d", c.env, c.args, got, err, c.want)
		}
	}
	if _, err := parse(map[string]string{"SLUICE_MEMORY_LIMIT": "lots"}); err == nil || !strings.Contains(err.Error(), "SLUICE_MEMORY_LIMIT") {
		t.Errorf("a bad size: %v, want an error naming SLUICE_MEMORY_LIMIT", err)
	}
	if _, err := parse(nil, "--memory-limit", "lots"); err == nil {
		t.Error("a bad size as a flag: no error")
	}
}
