package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"time"

	"github.com/ClickHouse/clickhouse-go/v2/lib/driver"

	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/sluice/status"
)

// errUnhealthy is a status that found problems: exit code 1, the report said why.
var errUnhealthy = errors.New("unhealthy")

// statusCmd prints one look at the platform (or one every --interval with
// --watch); unhealthy exits 1.
func statusCmd(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	var chs settings.ClickHouse
	settings.BindClickHouse(fs, io.Env, &chs)
	watch := fs.Bool("watch", false, "refresh in place until interrupted")
	interval := fs.Duration("interval", 2*time.Second, "how often --watch refreshes")
	asJSON := fs.Bool("json", false, "print the report as JSON (one object per refresh)")
	var opts status.Options
	fs.DurationVar(&opts.MaxLag, "max-lag", 5*time.Minute, "unhealthy when unprocessed input is older than this, or a receiver fails longer")
	fs.DurationVar(&opts.MaxStateAge, "max-state-age", 5*time.Minute, "unhealthy when a partition's state was saved longer ago")
	fs.DurationVar(&opts.StallAfter, "stall-after", 2*time.Minute, "unhealthy when a consumer holds unacknowledged messages and acknowledged or delivered none this long (the stages' STAGE_STALL_AFTER)")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	if *interval <= 0 || opts.MaxLag <= 0 || opts.MaxStateAge <= 0 || opts.StallAfter <= 0 {
		return fmt.Errorf("status: --interval, --max-lag, --max-state-age and --stall-after must be positive")
	}
	js, closeNATS, err := connectJS(n, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	var ch driver.Conn
	defer func() {
		if ch != nil {
			ch.Close()
		}
	}()
	for {
		var chErr error
		if ch == nil {
			octx, cancel := context.WithTimeout(ctx, 5*time.Second)
			ch, chErr = chconn.Open(octx, chs)
			cancel()
		}
		cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		report, err := status.Collect(cctx, js, ch, chs.Addr, chErr, opts)
		cancel()
		if err != nil {
			return err
		}
		if !report.ClickHouse.Reachable && ch != nil {
			ch.Close() // open it again next time
			ch = nil
		}
		if *asJSON {
			err = json.NewEncoder(io.Stdout).Encode(report)
		} else {
			if *watch {
				fmt.Fprint(io.Stdout, "\033[H\033[2J") // to the top, clear the screen
			}
			err = report.Text(io.Stdout)
		}
		if err != nil {
			return err
		}
		opts.Previous = report
		if !*watch {
			if !report.Healthy {
				return errUnhealthy
			}
			return nil
		}
		select {
		case <-ctx.Done():
			if !report.Healthy {
				return errUnhealthy
			}
			return nil
		case <-time.After(*interval):
		}
	}
}
