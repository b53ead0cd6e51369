package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/sluice/reprocess"
)

// replayCmd re-runs the pipeline's enrichment on a range of EVENTS with the
// current config and replaces the rows that change (package reprocess).
func replayCmd(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("replay", flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	var chs settings.ClickHouse
	settings.BindClickHouse(fs, io.Env, &chs)
	var configPath string
	settings.BindConfig(fs, io.Env, &configPath)
	from := fs.String("from", "", "first EVENTS message of the range: a stream sequence, an RFC 3339 time, or a duration ago (1h); required")
	to := fs.String("to", "", "last EVENTS message of the range: a sequence, a time or a duration ago (default: the stream's last)")
	dryRun := fs.Bool("dry-run", false, "rebuild and compare, and say per month how many rows would change; replace and publish nothing")
	holdTTL := fs.Duration("hold-ttl", time.Minute, "how long a month's hold outlives this command if it dies (the pipeline's inserts of the month wait meanwhile)")
	chunk := fs.Int("chunk", 100_000, "events rebuilt and replaced at a time (held in memory; each chunk rewrites the months it touches)")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	if *from == "" {
		fmt.Fprintln(io.Stderr, "sluice replay: --from is required")
		fs.Usage()
		return errUsage
	}
	if configPath == "" {
		// Without a file the enrichment is none, and every changed row would lose
		// what the pipeline added to it.
		return errors.New("replay: no config file (set SLUICE_CONFIG or --config to the one the pipeline runs with): replay rebuilds rows with its enrichment and ingest mappings")
	}
	now := time.Now()
	var r reprocess.Range
	var err error
	if r.FromSeq, r.FromTime, err = position(*from, now); err != nil {
		return fmt.Errorf("replay: --from: %w", err)
	}
	if r.ToSeq, r.ToTime, err = position(*to, now); err != nil {
		return fmt.Errorf("replay: --to: %w", err)
	}
	if r.ToSeq > 0 && r.ToSeq < r.FromSeq || !r.ToTime.IsZero() && r.ToTime.Before(r.FromTime) {
		return fmt.Errorf("replay: --to %s is before --from %s", *to, *from)
	}
	f, err := configfile.Load(configPath)
	if err != nil {
		return err
	}
	h, err := configHandler(f, nil)
	if err != nil {
		return err
	}
	ecfg := enrich.DefaultConfig()
	if ecfg.Enrich, err = enrich.LoadEnrichConfig(f); err != nil {
		return err
	}
	ecfg.Secrets = io.Env
	rules, err := alert.LoadRules(f)
	if err != nil {
		return err
	}
	log, _ := telemetry.NewLogger(io.Stderr, "info", "text")
	js, closeNATS, err := connectJS(n, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	live, err := enrich.Start(ctx, ecfg, js, log, prometheus.NewRegistry())
	if err != nil {
		return err
	}
	defer live.Close()
	ch, err := chconn.Open(ctx, chs)
	if err != nil {
		return err
	}
	defer ch.Close()
	shards, err := chconn.OpenShards(ctx, ch, chs)
	if err != nil {
		return err
	}
	defer shards.Close()
	rep, err := reprocess.Run(ctx, js, shards, reprocess.Config{Range: r, Handler: h, Enrich: live, HoldTTL: *holdTTL, Chunk: *chunk, Rules: rules, DryRun: *dryRun, Log: log})
	verb := "replaced"
	if *dryRun {
		verb = "would replace"
	}
	fmt.Fprintf(io.Stdout, "read %d message(s) of EVENTS: %d event(s), %d that are no events rows (dead letters)\n", rep.Messages, rep.Events, rep.Invalid)
	for _, m := range rep.Months {
		changed := m.Changed
		if !*dryRun {
			changed = m.Replaced
		}
		fmt.Fprintf(io.Stdout, "month %d: %d row(s) found, %s %d that the current config changes\n", m.Month, m.Rows, verb, changed)
	}
	if len(rules) > 0 {
		what := "published to ALERTS marked replay (notify sends them only to receivers with send_replayed)"
		if *dryRun {
			what = "not published (dry run)"
		}
		fmt.Fprintf(io.Stdout, "the rules raised %d alert change(s) on the range's stored events, %s\n", rep.Alerts, what)
	}
	if rep.Missing > 0 {
		fmt.Fprintf(io.Stdout, "%d event(s) without a row (repeats, dead letters, or not stored yet): left alone\n", rep.Missing)
	}
	if rep.Ambiguous+rep.Moved > 0 {
		fmt.Fprintf(io.Stdout, "%d event(s) with more than one row and %d whose time the config now reads differently: left alone\n", rep.Ambiguous, rep.Moved)
	}
	return err
}

// position reads a range end: a stream sequence, or a time (RFC 3339 or a duration
// ago); empty is none.
func position(s string, now time.Time) (uint64, time.Time, error) {
	if s == "" {
		return 0, time.Time{}, nil
	}
	if seq, err := strconv.ParseUint(s, 10, 64); err == nil {
		return seq, time.Time{}, nil
	}
	t, err := when(s, now)
	if _, derr := time.ParseDuration(s); err != nil && derr == nil {
		return 0, time.Time{}, err // a duration below zero
	}
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("%q is neither a stream sequence, an RFC 3339 time nor a duration", s)
	}
	return 0, t, nil
}
