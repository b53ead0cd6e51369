// Package dashboard is the live status page every sluice process serves on its
// metrics address (/): charts of events per second by outcome and type, lag,
// insert latency, alerts firing and dead letters by reason, drawn in the browser
// from the process's own metrics (/dashboard/data, polled) with uPlot, which the
// binary embeds (no CDN, no external service). A process shows the panels whose
// metrics it has: the pipeline most of them, notify the alerts firing.
package dashboard

import (
	"embed"
	"encoding/json"
	"fmt"
	"io/fs"
	"net/http"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

//go:embed assets
var assets embed.FS

// Kind is how a panel's metrics become the values it charts.
type Kind string

// Kinds of panel.
const (
	// Rate charts a counter's increase per second between two polls.
	Rate Kind = "rate"
	// Gauge charts the value as it is.
	Gauge Kind = "gauge"
	// Mean charts a histogram's mean observation between two polls, in
	// milliseconds (its sum and count are sent).
	Mean Kind = "mean"
)

// Panel is one chart: the sum of its metrics' samples (those whose labels match
// Where), one series per value of the label By (one series, Total, when By is "").
type Panel struct {
	ID      string            `json:"id"`
	Title   string            `json:"title"`
	Unit    string            `json:"unit"`
	Kind    Kind              `json:"kind"`
	Metrics []string          `json:"-"`
	By      string            `json:"-"`
	Where   map[string]string `json:"-"`
	// Total names the series of a panel without By.
	Total string `json:"-"`
}

// Panels are the page's charts, in order.
func Panels() []Panel {
	return []Panel{
		{ID: "outcomes", Title: "Events/s by outcome", Unit: "events/s", Kind: Rate, Metrics: []string{"sluice_pipeline_events_total"}, By: "outcome"},
		{ID: "types", Title: "Stored events/s by type", Unit: "events/s", Kind: Rate, Metrics: []string{"sluice_pipeline_events_total"}, By: "type",
			Where: map[string]string{"outcome": "stored"}},
		{ID: "lag", Title: "Lag", Unit: "messages not yet read", Kind: Gauge,
			Metrics: []string{"sluice_pipeline_lag", "sluice_stage_consumer_lag", "sluice_sink_consumer_lag"}, Total: "lag"},
		{ID: "insert", Title: "Insert latency", Unit: "ms (mean)", Kind: Mean,
			Metrics: []string{"sluice_pipeline_insert_seconds", "sluice_sink_insert_seconds"}, Total: "insert"},
		{ID: "alerts", Title: "Alerts firing", Unit: "alerts", Kind: Gauge, Metrics: []string{"sluice_notify_alerts_firing"}, Total: "firing"},
		{ID: "dead", Title: "Dead letters/s by reason", Unit: "dead letters/s", Kind: Rate, Metrics: []string{"sluice_pipeline_dead_letters_total"}, By: "reason"},
	}
}

// Point is one series' value at a poll: V for counters and gauges, Sum and
// Count for histograms.
type Point struct {
	V     float64 `json:"v"`
	Sum   float64 `json:"sum,omitempty"`
	Count float64 `json:"count,omitempty"`
}

// PanelData is a panel and its series' values at a poll.
type PanelData struct {
	Panel
	Series map[string]Point `json:"series"`
}

// Snapshot is what /dashboard/data answers: every panel's values now.
type Snapshot struct {
	// Time is when it was taken (Unix milliseconds).
	Time   int64       `json:"t"`
	Panels []PanelData `json:"panels"`
}

// Take gathers g's metrics into a snapshot of panels.
func Take(g prometheus.Gatherer, panels []Panel, now time.Time) (*Snapshot, error) {
	families, err := g.Gather()
	if err != nil {
		return nil, fmt.Errorf("dashboard: gather metrics: %w", err)
	}
	byName := make(map[string]*dto.MetricFamily, len(families))
	for _, f := range families {
		byName[f.GetName()] = f
	}
	s := &Snapshot{Time: now.UnixMilli()}
	for _, p := range panels {
		d := PanelData{Panel: p, Series: map[string]Point{}}
		for _, name := range p.Metrics {
			f := byName[name]
			if f == nil {
				continue
			}
			for _, m := range f.GetMetric() {
				if !matches(m, p.Where) {
					continue
				}
				series := p.Total
				if p.By != "" {
					series = labelValue(m, p.By)
				}
				pt := d.Series[series]
				switch {
				case m.GetCounter() != nil:
					pt.V += m.GetCounter().GetValue()
				case m.GetGauge() != nil:
					pt.V += m.GetGauge().GetValue()
				case m.GetHistogram() != nil:
					pt.Sum += m.GetHistogram().GetSampleSum()
					pt.Count += float64(m.GetHistogram().GetSampleCount())
				}
				d.Series[series] = pt
			}
		}
		s.Panels = append(s.Panels, d)
	}
	return s, nil
}

func matches(m *dto.Metric, where map[string]string) bool {
	for k, v := range where {
		if labelValue(m, k) != v {
			return false
		}
	}
	return true
}

func labelValue(m *dto.Metric, name string) string {
	i := slices.IndexFunc(m.GetLabel(), func(l *dto.LabelPair) bool { return l.GetName() == name })
	if i < 0 {
		return ""
	}
	return m.GetLabel()[i].GetValue()
}

// Register adds the page (/), its data (/dashboard/data) and its assets
// (/dashboard/assets/) to mux, drawn from g.
func Register(mux *http.ServeMux, g prometheus.Gatherer) {
	static, _ := fs.Sub(assets, "assets") // a directory embedded above: cannot fail
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		http.ServeFileFS(w, r, static, "index.html")
	})
	mux.Handle("GET /dashboard/assets/", http.StripPrefix("/dashboard/assets/", http.FileServerFS(static)))
	panels := Panels()
	mux.HandleFunc("GET /dashboard/data", func(w http.ResponseWriter, _ *http.Request) {
		s, err := Take(g, panels, time.Now())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(s)
	})
}
