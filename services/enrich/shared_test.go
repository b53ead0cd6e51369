package enrich

import (
	"os"
	"path/filepath"
	"testing"
)

// sharedData finds ../shared/data (the team's reference data, beside the repository)
// from the test's directory upwards; SLUICE_SHARED_DATA overrides.
func sharedData(t testing.TB, sub string) string {
	t.Helper()
	if d := os.Getenv("SLUICE_SHARED_DATA"); d != "" {
		return filepath.Join(d, sub)
	}
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		cand := filepath.Join(dir, "shared", "data", sub)
		if _, err := os.Stat(cand); err == nil {
			return cand
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("shared/data/%s not found above the test's directory: check out the repository beside shared/, or set SLUICE_SHARED_DATA", sub)
		}
		dir = parent
	}
}
