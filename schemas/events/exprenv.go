package events

import "time"

// ExprEnv is what expressions (alert filters, derived fields) see of an event:
// id, source, type, subject, time, key, data (the decoded JSON) and enrichment.
type ExprEnv struct {
	ID         string         `expr:"id"`
	Source     string         `expr:"source"`
	Type       string         `expr:"type"`
	Subject    string         `expr:"subject"`
	Time       time.Time      `expr:"time"`
	Key        string         `expr:"key"`
	Data       any            `expr:"data"`
	Enrichment map[string]any `expr:"enrichment"`
}

// NewExprEnv returns e's expression environment with data already decoded.
func NewExprEnv(e *Event, data any) *ExprEnv {
	return &ExprEnv{ID: e.ID, Source: e.Source, Type: e.Type, Subject: e.Subject, Time: e.Time, Key: e.Key, Data: data, Enrichment: e.Enrichment}
}
