package dashboard

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestTake(t *testing.T) {
	reg := prometheus.NewRegistry()
	events := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "sluice_pipeline_events_total"}, []string{"type", "outcome"})
	lag := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "sluice_pipeline_lag"}, []string{"partition"})
	stageLag := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "sluice_stage_consumer_lag"}, []string{"stage"})
	insert := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "sluice_pipeline_insert_seconds"})
	reg.MustRegister(events, lag, stageLag, insert)
	events.WithLabelValues("order", "stored").Add(5)
	events.WithLabelValues("click", "stored").Add(3)
	events.WithLabelValues("order", "repeat").Add(2)
	lag.WithLabelValues("0").Set(4)
	lag.WithLabelValues("1").Set(6)
	stageLag.WithLabelValues("notify").Set(1)
	insert.Observe(0.5)
	insert.Observe(1.5)

	now := time.Unix(1_700_000_000, 0)
	s, err := Take(reg, Panels(), now)
	if err != nil {
		t.Fatal(err)
	}
	if s.Time != now.UnixMilli() {
		t.Fatalf("time %d", s.Time)
	}
	got := map[string]map[string]Point{}
	for _, p := range s.Panels {
		got[p.ID] = p.Series
	}
	for _, c := range []struct {
		panel, series string
		want          Point
	}{
		{"outcomes", "stored", Point{V: 8}},
		{"outcomes", "repeat", Point{V: 2}},
		{"types", "order", Point{V: 5}}, // repeats are not stored
		{"types", "click", Point{V: 3}},
		{"lag", "lag", Point{V: 11}}, // every partition and stage summed
		{"insert", "insert", Point{Sum: 2, Count: 2}},
	} {
		if p := got[c.panel][c.series]; p != c.want {
			t.Errorf("%s/%s = %+v, want %+v", c.panel, c.series, p, c.want)
		}
	}
	if n := len(got["types"]); n != 2 {
		t.Errorf("types has %d series, want 2: %v", n, got["types"])
	}
	if n := len(got["alerts"]); n != 0 {
		t.Errorf("alerts has series without its metric: %v", got["alerts"])
	}
}

func TestServed(t *testing.T) {
	mux := http.NewServeMux()
	Register(mux, prometheus.NewRegistry())
	srv := httptest.NewServer(mux)
	defer srv.Close()
	for path, want := range map[string]string{
		"/":                                   `<main id="panels">`,
		"/dashboard/assets/uPlot.iife.min.js": "uPlot",
		"/dashboard/assets/dashboard.js":      "dashboard/data",
		"/dashboard/data":                     `"panels"`,
	} {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), want) {
			t.Errorf("GET %s: %s, want %q in the body", path, resp.Status, want)
		}
		if path == "/dashboard/data" {
			var s Snapshot
			if err := json.Unmarshal(body, &s); err != nil || len(s.Panels) != len(Panels()) {
				t.Errorf("/dashboard/data: %v, %d panels", err, len(s.Panels))
			}
		}
	}
	resp, err := http.Get(srv.URL + "/nothing")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("GET /nothing: %s, want 404", resp.Status)
	}
}
