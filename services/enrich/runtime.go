package enrich

import (
	"context"

	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// runtime is an Enricher with the tables it reads: KV watches, and files checked
// for changes every ReloadInterval. A config reload builds a new runtime and stops
// the old one.
type runtime struct {
	en     *Enricher
	files  []*fileTable
	geo    []*geoHolder
	stop   context.CancelFunc
	wg     sync.WaitGroup
	stopKV []func()
}

// startRuntime loads every table of cfg (waiting for KV buckets' current values),
// compiles the rules, and keeps the tables fresh until close.
func startRuntime(ctx context.Context, cfg EnrichConfig, js jetstream.JetStream, replicas int, ua *UserAgents, secrets func(string) (string, bool), log *slog.Logger, miss func(string), reloaded func(file, result string)) (*runtime, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	rt := &runtime{stop: cancel}
	tables := map[string]Table{}
	for _, tc := range cfg.Tables {
		if tc.File != "" {
			ft, err := loadFileTable(tc.File, tc.Key)
			if err != nil {
				rt.close()
				return nil, fmt.Errorf("enrich: table %s: %w", tc.Name, err)
			}
			logRepeated(log, tc.File, ft.rows.Load())
			rt.files = append(rt.files, ft)
			tables[tc.Name] = ft
			continue
		}
		if js == nil {
			rt.close()
			return nil, fmt.Errorf("enrich: table %s: a KV table needs a NATS connection", tc.Name)
		}
		kt, stop, err := watchKV(ctx, js, tc.KV, replicas, log)
		if err != nil {
			rt.close()
			return nil, fmt.Errorf("enrich: table %s: %w", tc.Name, err)
		}
		rt.stopKV = append(rt.stopKV, stop)
		tables[tc.Name] = kt
	}
	geo := map[string]*geoHolder{}
	for _, gc := range cfg.Geo {
		h, err := loadGeoHolder(gc.Files, gc.Columns)
		if err != nil {
			rt.close()
			return nil, fmt.Errorf("enrich: geo table %s: %w", gc.Name, err)
		}
		rt.geo = append(rt.geo, h)
		geo[gc.Name] = h
	}
	en, err := NewEnricher(cfg, tables, geo, ua, secrets)
	if err != nil {
		rt.close()
		return nil, err
	}
	en.Miss = miss
	rt.en = en
	rt.wg.Go(func() { rt.reloadFiles(ctx, cfg.ReloadInterval, log, reloaded) })
	return rt, nil
}

// reloadFiles swaps in file tables that changed; a broken file keeps the previous
// table and logs why.
func (rt *runtime) reloadFiles(ctx context.Context, every time.Duration, log *slog.Logger, reloaded func(file, result string)) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, f := range rt.files {
			if swapped, err := f.reload(); err != nil {
				log.Error("table file did not reload; keeping the previous table", "file", f.path, "err", err)
				reloaded(f.path, "failed")
			} else if swapped {
				log.Info("table file reloaded", "file", f.path, "version", f.Version())
				logRepeated(log, f.path, f.rows.Load())
				reloaded(f.path, "ok")
			}
		}
		for _, g := range rt.geo {
			if swapped, err := g.reload(); err != nil {
				log.Error("geo table did not reload; keeping the previous table", "files", g.files, "err", err)
				reloaded(g.files[0], "failed")
			} else if swapped {
				log.Info("geo table reloaded", "files", g.files, "version", g.t.Load().Version())
				reloaded(g.files[0], "ok")
			}
		}
	}
}

func (rt *runtime) close() {
	rt.stop()
	for _, stop := range rt.stopKV {
		stop()
	}
	rt.wg.Wait()
}
