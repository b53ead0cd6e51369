package cli

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/sluice/backfill"
	"github.com/sluicehq/sluice/streams"
)

// importCmd backfills JSON-lines files into EVENTS.
func importCmd(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("import", flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	var opts backfill.Options
	fs.StringVar(&opts.Subject, "subject", "", "the subject every line is published to, as a producer would (events.<source>.<type>; an ingest mapping may match it)")
	fs.Float64Var(&opts.Rate, "rate", 0, "events a second at most (0: as fast as JetStream acknowledges)")
	fs.BoolVar(&opts.Restart, "restart", false, "ignore the files' checkpoints and publish every line again (dedup drops those its window holds)")
	var replicas int
	if err := bindReplicas(fs, io.Env, &replicas, "the checkpoint bucket "+backfill.Bucket); err != nil {
		return err
	}
	files, err := parsePositional(fs, args, io)
	if err != nil {
		return err
	}
	if len(files) == 0 || opts.Subject == "" || opts.Rate < 0 {
		fmt.Fprintln(io.Stderr, "usage: sluice import FILE... --subject SUBJECT [--rate N] [--restart]  (JSON lines, gzip or not)")
		return errUsage
	}
	js, closeNATS, err := connectJS(n, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	kv, err := streams.KeyValue(ctx, js, jetstream.KeyValueConfig{Bucket: backfill.Bucket,
		Description: "sluice import: how many lines of each file JetStream acknowledged.", Storage: jetstream.FileStorage, Replicas: replicas})
	if err != nil {
		return fmt.Errorf("import: bucket %s: %w", backfill.Bucket, err)
	}
	err = backfill.Import(ctx, js, kv, files, opts, progressTo(io))
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("import interrupted; run it again to go on after the last acknowledged line: %w", err)
	}
	return err
}

// progressTo shows an import's progress: a bar (events, rate, ETA by bytes read) on
// a terminal, else a line every 5 seconds and one at the end of each file.
func progressTo(io IO) func(backfill.Progress) {
	f, ok := io.Stdout.(*os.File)
	if ok && term.IsTerminal(int(f.Fd())) {
		var bar *progressbar.ProgressBar
		file := ""
		return func(p backfill.Progress) {
			if p.File != file {
				file = p.File
				bar = progressbar.NewOptions64(p.Size, progressbar.OptionSetWriter(f), progressbar.OptionShowBytes(true),
					progressbar.OptionSetPredictTime(true), progressbar.OptionThrottle(200*time.Millisecond), progressbar.OptionFullWidth())
			}
			bar.Describe(fmt.Sprintf("%s: %d events", file, p.Lines))
			_ = bar.Set64(p.Read)
			if p.Done {
				_ = bar.Finish()
				fmt.Fprintln(f)
			}
		}
	}
	var last time.Time
	start := time.Now()
	return func(p backfill.Progress) {
		if !p.Done && time.Since(last) < 5*time.Second {
			return
		}
		last = time.Now()
		pct, eta := 100.0, "0s"
		if p.Size > 0 && !p.Done {
			pct = 100 * float64(p.Read) / float64(p.Size)
			if p.Read > 0 {
				eta = time.Duration(float64(time.Since(start)) * float64(p.Size-p.Read) / float64(p.Read)).Round(time.Second).String()
			}
		}
		rate := float64(p.Lines-p.Skipped) / max(time.Since(start).Seconds(), 1e-3)
		fmt.Fprintf(io.Stdout, "import %s: %d lines done (%d by an earlier run), %.0f/s, %.0f%% read, ETA %s\n", p.File, p.Lines, p.Skipped, rate, pct, eta)
	}
}
