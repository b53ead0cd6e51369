// Package cli is the sluice command: `sluice up` and the tools around it.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	chmigrate "github.com/sluicehq/sluice/schemas/clickhouse"
	"github.com/sluicehq/sluice/services/alert"
	"github.com/sluicehq/sluice/services/enrich"
	"github.com/sluicehq/sluice/services/kit/certs"
	"github.com/sluicehq/sluice/services/kit/chconn"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/natsconn"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/notify"
	"github.com/sluicehq/sluice/services/sluice/platform"
	"github.com/sluicehq/sluice/services/sluice/status"
	"github.com/sluicehq/sluice/streams"
)

const usage = `sluice: an event platform on NATS JetStream.

Usage:
  sluice up                 run NATS (embedded), the stages and, if needed, a local ClickHouse
  sluice migrate            apply the ClickHouse migrations to CLICKHOUSE_ADDR
  sluice dlq list|show|replay
                            dead letters by stage, reason, subject and time; replay puts
                            them back where they came from (after fixing what refused them)
  sluice import FILE... --subject SUBJECT [--rate N]
                            backfill JSON lines (gzip or not) into EVENTS; a second run
                            goes on after the last acknowledged line
  sluice replay --from SEQ|TIME [--to SEQ|TIME] [--dry-run]
                            re-run the enrichment of SLUICE_CONFIG on a range of EVENTS and
                            replace the rows it changes, month by month, while ingestion goes on
  sluice status [--watch] [--json]
                            partitions, consumers, ClickHouse, dead letters, alerts and
                            receivers at a glance; exits 1 when something is unhealthy
  sluice streams apply [--replicas N] [--wait D]
                            create or update the streams and consumers on NATS_URL
  sluice certs [--dir DIR] [--hosts H,...]
                            make a CA and a NATS server certificate where missing (compose's TLS)
  sluice rules check FILE   validate the rules of a config file offline
  sluice ingest check FILE --subject SUBJECT [--each-line]
                            show offline what sample payloads become (events, repeats, dead letters)
  sluice kv load BUCKET FILE --key COLUMN
                            load a CSV (header row) or JSON-lines file into a KV lookup table
  sluice webhook listen     a local webhook receiver that checks signatures and prints alerts
  sluice silence add -m MATCHER... --for DURATION [--comment TEXT] [--author NAME]
                            mute alerts whose labels match (team=shop, severity=~"warn.*")
  sluice silence list       show the silences (bucket sluice_silences)
  sluice silence rm ID      end a silence
  sluice receiver enable NAME
                            deliver to a receiver again after it answered 410 Gone

Run "sluice <command> -h" for a command's flags. Every flag can also be set by the
environment variable named in its help.
`

// IO is where a command reads and writes.
type IO struct {
	Env settings.Lookup
	// Stdin is read by commands given "-" for a file (nil: os.Stdin).
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
}

// Main runs the command line args (without the program name) and returns the exit code.
func Main(args []string, io IO) int {
	if len(args) == 0 {
		fmt.Fprint(io.Stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch cmd, rest := args[0], args[1:]; {
	case cmd == "up":
		err = up(ctx, rest, io)
	case cmd == "migrate":
		err = migrate(ctx, rest, io)
	case cmd == "streams" && len(rest) > 0 && rest[0] == "apply":
		err = streamsApply(ctx, rest[1:], io)
	case cmd == "dlq" && len(rest) > 0 && rest[0] == "list":
		err = dlqList(ctx, rest[1:], io)
	case cmd == "dlq" && len(rest) > 0 && rest[0] == "show":
		err = dlqShow(ctx, rest[1:], io)
	case cmd == "dlq" && len(rest) > 0 && rest[0] == "replay":
		err = dlqReplay(ctx, rest[1:], io)
	case cmd == "import":
		err = importCmd(ctx, rest, io)
	case cmd == "replay":
		err = replayCmd(ctx, rest, io)
	case cmd == "status":
		err = statusCmd(ctx, rest, io)
	case cmd == "certs":
		err = makeCerts(rest, io)
	case cmd == "ingest" && len(rest) > 0 && rest[0] == "check":
		err = ingestCheck(rest[1:], io)
	case cmd == "rules" && len(rest) > 0 && rest[0] == "check":
		err = rulesCheck(rest[1:], io)
	case cmd == "kv" && len(rest) > 0 && rest[0] == "load":
		err = kvLoad(ctx, rest[1:], io)
	case cmd == "silence" && len(rest) > 0 && rest[0] == "add":
		err = silenceAdd(ctx, rest[1:], io)
	case cmd == "silence" && len(rest) > 0 && rest[0] == "list":
		err = silenceList(ctx, rest[1:], io)
	case cmd == "silence" && len(rest) > 0 && rest[0] == "rm":
		err = silenceRemove(ctx, rest[1:], io)
	case cmd == "receiver" && len(rest) > 0 && rest[0] == "enable":
		err = receiverEnable(ctx, rest[1:], io)
	case cmd == "webhook" && len(rest) > 0 && rest[0] == "listen":
		err = webhookListen(ctx, rest[1:], io)
	case cmd == "help" || cmd == "-h" || cmd == "--help":
		fmt.Fprint(io.Stdout, usage)
		return 0
	default:
		fmt.Fprintf(io.Stderr, "sluice: unknown command %q\n\n%s", strings.Join(args, " "), usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		return 2
	case errors.Is(err, errUnhealthy):
		return 1
	default:
		fmt.Fprintln(io.Stderr, "sluice:", err)
		return 1
	}
}

var errUsage = errors.New("usage")

// parsePositional parses args whose flags may follow the positional arguments
// and returns those.
func parsePositional(fs *flag.FlagSet, args []string, io IO) ([]string, error) {
	var positional []string
	for len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		positional, args = append(positional, args[0]), args[1:]
	}
	if err := parse(fs, args, io, 0); err != nil {
		return nil, err
	}
	return append(positional, fs.Args()...), nil
}

func parse(fs *flag.FlagSet, args []string, io IO, positional int) error {
	fs.SetOutput(io.Stderr)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() != positional {
		fmt.Fprintf(io.Stderr, "sluice %s: want %d argument(s), got %q\n", fs.Name(), positional, fs.Args())
		fs.Usage()
		return errUsage
	}
	return nil
}

func up(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	cfg := platform.UpConfig{Env: io.Env}
	listen := settings.DefaultNATSURL
	if v, ok := io.Env("NATS_LISTEN"); ok {
		listen = v
	}
	fs.StringVar(&cfg.NATSListen, "nats-listen", strings.TrimPrefix(listen, "nats://"), "where the embedded NATS server listens (env NATS_LISTEN)")
	settings.BindClickHouse(fs, io.Env, &cfg.ClickHouse)
	settings.BindConfig(fs, io.Env, &cfg.Service.ConfigPath)
	settings.BindDataDir(fs, io.Env, &cfg.DataDir)
	if err := settings.BindService(fs, io.Env, &cfg.Service, "127.0.0.1:9300"); err != nil {
		return err
	}
	if err := settings.Bool(fs, io.Env, &cfg.Split, "split-stages", "SLUICE_SPLIT_STAGES", false,
		"run dedup, enrich and alert as stages of their own, each hop a stream, instead of the pipeline stage"); err != nil {
		return err
	}
	if err := settings.Int(fs, io.Env, &cfg.Partitions, "partitions", "SLUICE_PARTITIONS", 1,
		"partitions of the input, all owned by this one worker: 1, or more to spread the rows over a ClickHouse cluster's shards (partition mod shards) or to let pipeline workers join later (docs/scaling.md)"); err != nil {
		return err
	}
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	if cfg.Split && cfg.Partitions != 1 {
		return fmt.Errorf("up: --partitions %d: the split stages read EVENTS whole (partitions are the pipeline stage's); leave --split-stages or --partitions out", cfg.Partitions)
	}
	log, err := telemetry.NewLogger(io.Stderr, cfg.Service.LogLevel, cfg.Service.LogFormat)
	if err != nil {
		return err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return platform.Up(ctx, cfg, log, reg)
}

func migrate(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	var ch settings.ClickHouse
	settings.BindClickHouse(fs, io.Env, &ch)
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	log, _ := telemetry.NewLogger(io.Stderr, "info", "text")
	conn, err := chconn.Open(ctx, ch)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := chmigrate.MigrateTo(ctx, conn, chmigrate.Target{Cluster: ch.Cluster, Database: ch.Database}, log); err != nil {
		return err
	}
	if ch.Cluster != "" {
		fmt.Fprintf(io.Stdout, "database %s on every node of cluster %s is up to date\n", ch.Database, ch.Cluster)
		return nil
	}
	fmt.Fprintf(io.Stdout, "database %s on %s is up to date\n", ch.Database, ch.Addr)
	return nil
}

func streamsApply(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("streams apply", flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	var replicas int
	if err := bindReplicas(fs, io.Env, &replicas, "every stream"); err != nil {
		return err
	}
	wait := fs.Duration("wait", 0, "how long to wait for NATS to answer (a setup step started with the server)")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	if err := settings.CheckReplicas(replicas); err != nil {
		return err
	}
	log, _ := telemetry.NewLogger(io.Stderr, "warn", "text")
	nc, err := natsconn.ConnectWait(ctx, n, "sluice-cli", log, *wait)
	if err != nil {
		return err
	}
	defer nc.Close()
	if err := service.ApplyTopology(ctx, nc, replicas); err != nil {
		return err
	}
	copies := "replicas as they were, 1 for new streams"
	if replicas > 0 {
		copies = fmt.Sprintf("%d replicas", replicas)
	}
	fmt.Fprintf(io.Stdout, "streams and consumers applied on %s (%s)\n", natsconn.Redacted(n.URL), copies)
	return nil
}

// makeCerts makes the TLS files of compose's NATS where they are missing or stale.
func makeCerts(args []string, io IO) error {
	fs := flag.NewFlagSet("certs", flag.ContinueOnError)
	dir := fs.String("dir", "certs", "directory of ca.pem, ca-key.pem, server.pem and server-key.pem")
	hosts := fs.String("hosts", "nats,nats-2,nats-3,localhost,127.0.0.1,::1", "comma-separated names and addresses the server certificate is for (clients connect to one of these)")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	var names []string
	for h := range strings.SplitSeq(*hosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			names = append(names, h)
		}
	}
	wrote, err := certs.Ensure(*dir, names, time.Now())
	if err != nil {
		return err
	}
	if len(wrote) == 0 {
		fmt.Fprintf(io.Stdout, "%s: the CA and the server certificate are in place\n", *dir)
		return nil
	}
	fmt.Fprintf(io.Stdout, "%s: wrote %s\n", *dir, strings.Join(wrote, ", "))
	return nil
}

// bindReplicas registers --replicas, whose default is SLUICE_STREAM_REPLICAS, the
// services' setting.
func bindReplicas(fs *flag.FlagSet, env settings.Lookup, n *int, what string) error {
	return settings.Int(fs, env, n, "replicas", "SLUICE_STREAM_REPLICAS", 0, fmt.Sprintf("copies a NATS cluster keeps of %s (1 to %d; 3 on a 3-node cluster); 0 leaves existing ones as they are and creates new ones with 1", what, settings.MaxReplicas))
}

func rulesCheck(args []string, io IO) error {
	fs := flag.NewFlagSet("rules check", flag.ContinueOnError)
	if err := parse(fs, args, io, 1); err != nil {
		return err
	}
	f, err := configfile.Load(fs.Arg(0))
	if err != nil {
		return err
	}
	// The alert section sets how the rules run; the stage refuses what it refuses.
	if _, err := alert.LoadSettings(f); err != nil {
		return err
	}
	rules, err := alert.LoadRules(f)
	for _, r := range rules {
		fmt.Fprintf(io.Stdout, "ok  %s (%s, severity %s)\n", r.Name, r.Kind, r.Severity)
	}
	if err != nil {
		return fmt.Errorf("%s:\n%w", fs.Arg(0), err)
	}
	if len(rules) == 0 {
		fmt.Fprintf(io.Stdout, "no rules in %s (rules go in the top-level rules: section)\n", fs.Arg(0))
	}
	return nil
}

func kvLoad(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("kv load", flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	key := fs.String("key", "", "the column (CSV) or field (JSON lines) holding each row's key")
	var replicas int
	if err := bindReplicas(fs, io.Env, &replicas, "the bucket when it creates it (an existing bucket keeps its settings)"); err != nil {
		return err
	}
	positional, err := parsePositional(fs, args, io)
	if err != nil {
		return err
	}
	if err := settings.CheckReplicas(replicas); err != nil {
		return err
	}
	if len(positional) != 2 || *key == "" {
		fmt.Fprintln(io.Stderr, "usage: sluice kv load BUCKET FILE --key COLUMN")
		return errUsage
	}
	bucket, file := positional[0], positional[1]
	rows, err := enrich.LoadFile(file, *key)
	if err != nil {
		return err
	}
	js, closeNATS, err := connectJS(n, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	kv, err := streams.OpenKeyValue(ctx, js, jetstream.KeyValueConfig{Bucket: bucket, Description: "sluice lookup table", Replicas: replicas})
	if err != nil {
		return fmt.Errorf("KV bucket %s: %w", bucket, err)
	}
	loaded, empty := 0, 0
	for k, row := range rows.All() {
		if k == "" {
			empty++ // no event's lookup has an empty key
			continue
		}
		b, err := json.Marshal(row)
		if err != nil {
			return err
		}
		// A key a KV key cannot hold (an e-mail address) goes in encoded.
		if _, err := kv.Put(ctx, enrich.KVKey(k), b); err != nil {
			return fmt.Errorf("put %q: %w", k, err)
		}
		loaded++
	}
	fmt.Fprintf(io.Stdout, "loaded %d rows from %s into KV bucket %s\n", loaded, file, bucket)
	if empty > 0 {
		fmt.Fprintf(io.Stdout, "left out the row whose %s is empty\n", *key)
	}
	if n, first := rows.Repeated(); n > 0 {
		fmt.Fprintf(io.Stdout, "%d row(s) had the %s of a row before them (the first: %q): the last row of each %s is loaded\n", n, *key, first, *key)
	}
	return nil
}

func webhookListen(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("webhook listen", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:8080", "address to listen on")
	secretEnv := fs.String("secret-env", "WEBHOOK_SECRET", "environment variable holding the signing secret to verify with")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	raw, ok := io.Env(*secretEnv)
	if !ok {
		return fmt.Errorf("environment variable %s is not set; export the same secret the receiver in your config uses", *secretEnv)
	}
	secret, err := notify.ParseSecret(raw)
	if err != nil {
		return fmt.Errorf("%s: %w", *secretEnv, err)
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := readAll(r)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		verdict := "signature ok"
		if err := notify.Verify(secret, r.Header, body, time.Now(), 5*time.Minute); err != nil {
			verdict = "REJECTED: " + err.Error()
			http.Error(w, verdict, http.StatusUnauthorized)
		}
		// Anything that reaches the port is printed: escaped, so that it cannot
		// drive the terminal.
		fmt.Fprintf(io.Stdout, "%s %s webhook-id=%s %s\n%s\n", time.Now().Format(time.TimeOnly), status.Printable(r.URL.Path),
			status.Printable(r.Header.Get(notify.HeaderID)), status.Printable(verdict), status.PrintableLines(string(body)))
	})
	srv := &http.Server{Addr: *addr, Handler: h, ReadHeaderTimeout: 5 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.ListenAndServe() }()
	fmt.Fprintf(io.Stderr, "listening on http://%s/ (Ctrl-C to stop)\n", *addr)
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
		<-errc
		return nil
	}
}

func readAll(r *http.Request) ([]byte, error) {
	defer r.Body.Close()
	return io.ReadAll(http.MaxBytesReader(nil, r.Body, 1<<20))
}

// connectJS connects to NATS for a command.
func connectJS(n settings.NATS, io IO) (jetstream.JetStream, func(), error) {
	log, _ := telemetry.NewLogger(io.Stderr, "warn", "text")
	nc, err := natsconn.Connect(n, "sluice-cli", log)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return js, nc.Close, nil
}

// oneArgOnNATS parses a command of one argument and the NATS flags, and connects.
func oneArgOnNATS(name, usage string, args []string, io IO) (string, jetstream.JetStream, func(), error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	positional, err := parsePositional(fs, args, io)
	if err != nil {
		return "", nil, nil, err
	}
	if len(positional) != 1 {
		fmt.Fprintln(io.Stderr, "usage: "+usage)
		return "", nil, nil, errUsage
	}
	js, closeNATS, err := connectJS(n, io)
	return positional[0], js, closeNATS, err
}

// stringsFlag collects a repeated flag.
type stringsFlag []string

func (s *stringsFlag) String() string     { return strings.Join(*s, ",") }
func (s *stringsFlag) Set(v string) error { *s = append(*s, v); return nil }

func silenceAdd(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("silence add", flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	var matchers stringsFlag
	fs.Var(&matchers, "m", `a label matcher: name=value, name!=value, name=~regex, name!~regex (repeat for more; all must match)`)
	dur := fs.Duration("for", 0, "how long the silence lasts (required)")
	comment := fs.String("comment", "", "why")
	user, _ := io.Env("USER")
	author := fs.String("author", user, "who (default $USER)")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	switch {
	case len(matchers) == 0:
		fmt.Fprintln(io.Stderr, "sluice silence add: at least one -m MATCHER is required (a silence of everything is a mistake)")
	case *dur <= 0:
		fmt.Fprintf(io.Stderr, "sluice silence add: --for must be a duration above zero (2h, 30m), not %s\n", *dur)
	}
	if len(matchers) == 0 || *dur <= 0 {
		fmt.Fprintln(io.Stderr, "usage: sluice silence add -m MATCHER [-m MATCHER...] --for DURATION [--comment TEXT]")
		return errUsage
	}
	js, closeNATS, err := connectJS(n, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	kv, err := notify.SilenceStore(ctx, js, 0)
	if err != nil {
		return err
	}
	now := time.Now().UTC()
	id, err := notify.AddSilence(ctx, kv, notify.Silence{Matchers: matchers, EndsAt: now.Add(*dur), CreatedBy: *author, Comment: *comment}, now)
	if err != nil {
		return err
	}
	fmt.Fprintf(io.Stdout, "%s until %s\n", id, now.Add(*dur).Format(time.RFC3339))
	return nil
}

func silenceList(ctx context.Context, args []string, io IO) error {
	fs := flag.NewFlagSet("silence list", flag.ContinueOnError)
	var n settings.NATS
	settings.BindNATS(fs, io.Env, &n)
	all := fs.Bool("all", false, "also show silences that ended or have not started")
	if err := parse(fs, args, io, 0); err != nil {
		return err
	}
	js, closeNATS, err := connectJS(n, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	kv, err := notify.SilenceStore(ctx, js, 0)
	if err != nil {
		return err
	}
	list, err := notify.ListSilences(ctx, kv)
	now := time.Now()
	for _, s := range list {
		if !*all && !s.Active(now) {
			continue
		}
		fmt.Fprintf(io.Stdout, "%s  %s → %s  %s  %s %s\n", s.ID, s.StartsAt.Format(time.RFC3339), s.EndsAt.Format(time.RFC3339),
			strings.Join(s.Matchers, " "), s.CreatedBy, s.Comment)
	}
	return err
}

func silenceRemove(ctx context.Context, args []string, io IO) error {
	arg, js, closeNATS, err := oneArgOnNATS("silence rm", "sluice silence rm ID", args, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	kv, err := notify.SilenceStore(ctx, js, 0)
	if err != nil {
		return err
	}
	if _, err := kv.Get(ctx, arg); err != nil {
		if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrInvalidKey) {
			return fmt.Errorf("no silence %q (`sluice silence list --all` shows them)", arg)
		}
		return fmt.Errorf("silence %s: %w", arg, err)
	}
	if err := kv.Delete(ctx, arg); err != nil {
		return fmt.Errorf("silence %s: %w", arg, err)
	}
	fmt.Fprintf(io.Stdout, "silence %s ended\n", arg)
	return nil
}

func receiverEnable(ctx context.Context, args []string, io IO) error {
	arg, js, closeNATS, err := oneArgOnNATS("receiver enable", "sluice receiver enable NAME", args, io)
	if err != nil {
		return err
	}
	defer closeNATS()
	kv, err := js.KeyValue(ctx, notify.StateBucket)
	if err != nil {
		return fmt.Errorf("bucket %s: %w (has the notify stage run?)", notify.StateBucket, err)
	}
	health, err := notify.ReadReceivers(ctx, kv)
	if err != nil {
		return err
	}
	if health[arg].Disabled == "" {
		var names []string
		for name, h := range health {
			if h.Disabled != "" {
				names = append(names, name)
			}
		}
		slices.Sort(names)
		if len(names) == 0 {
			names = []string{"none"}
		}
		return fmt.Errorf("receiver %q is not disabled (disabled: %s)", arg, strings.Join(names, ", "))
	}
	if err := notify.EnableReceiver(ctx, kv, arg); err != nil {
		return err
	}
	fmt.Fprintf(io.Stdout, "receiver %s enabled: notify delivers to it again\n", arg)
	return nil
}
