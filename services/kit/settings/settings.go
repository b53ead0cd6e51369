// Package settings binds the configuration every sluice command shares to flags
// whose defaults come from the environment, so each setting has one flag name and
// one variable name everywhere (--nats-url and NATS_URL, and so on).
package settings

import (
	"flag"
	"fmt"
	"strconv"
	"time"

	"github.com/dustin/go-humanize"
)

// Lookup reads an environment variable; os.LookupEnv in mains, a map in tests.
type Lookup func(string) (string, bool)

// NATS is how to reach the NATS server.
type NATS struct {
	URL      string
	Creds    string
	User     string
	Password string
	Token    string
	TLSCA    string
	TLSCert  string
	TLSKey   string
}

// ClickHouse is how to reach ClickHouse over its native protocol.
type ClickHouse struct {
	Addr     string
	Database string
	User     string
	Password string
	// Cluster names a cluster of the servers' remote_servers: tables are
	// replicated and sharded on it (docs/production.md); empty: one server.
	Cluster string
}

// Service holds what every service takes besides its connections.
type Service struct {
	// ConfigPath is SLUICE_CONFIG, for the services that read it (see BindConfig).
	ConfigPath string
	// DataDir is SLUICE_DATA_DIR, for the services that keep local state (see BindDataDir).
	DataDir     string
	MetricsAddr string
	LogLevel    string
	LogFormat   string
	// ShutdownTimeout bounds the drain on SIGINT/SIGTERM.
	ShutdownTimeout time.Duration
	// ApplyTopology creates or updates the streams and consumers at start.
	ApplyTopology bool
	// MemoryLimit is the floor of Go's soft memory limit (see BindMemoryLimit and
	// kit/memlimit); 0: Go's default, no limit.
	MemoryLimit uint64
	// Replicas is how many copies a NATS cluster keeps of every stream and bucket
	// the service applies or creates; 0 leaves existing ones as they are and creates
	// new ones with one (see BindReplicas, which the services bind and `sluice up`,
	// with its one embedded server, does not).
	Replicas int
}

// MaxReplicas is the most replicas JetStream keeps of a stream.
const MaxReplicas = 5

// Defaults.
const (
	DefaultNATSURL        = "nats://127.0.0.1:4222"
	DefaultClickHouseAddr = "127.0.0.1:9000"
	DefaultDatabase       = "sluice"
	DefaultDataDir        = "./data"
)

type binder struct {
	fs  *flag.FlagSet
	env Lookup
}

func (b binder) str(p *string, name, envName, def, usage string) {
	if v, ok := b.env(envName); ok {
		def = v
	}
	b.fs.StringVar(p, name, def, fmt.Sprintf("%s (env %s)", usage, envName))
}

func (b binder) dur(p *time.Duration, name, envName string, def time.Duration, usage string) error {
	if v, ok := b.env(envName); ok {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("%s=%q: %w", envName, v, err)
		}
		def = d
	}
	b.fs.DurationVar(p, name, def, fmt.Sprintf("%s (env %s)", usage, envName))
	return nil
}

func (b binder) boolean(p *bool, name, envName string, def bool, usage string) error {
	if v, ok := b.env(envName); ok {
		parsed, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("%s=%q: want true or false", envName, v)
		}
		def = parsed
	}
	b.fs.BoolVar(p, name, def, fmt.Sprintf("%s (env %s)", usage, envName))
	return nil
}

// BindNATS registers the NATS connection flags on fs.
func BindNATS(fs *flag.FlagSet, env Lookup, n *NATS) {
	b := binder{fs, env}
	b.str(&n.URL, "nats-url", "NATS_URL", DefaultNATSURL, "NATS server URL(s), comma-separated")
	b.str(&n.Creds, "nats-creds", "NATS_CREDS", "", "NATS credentials file")
	b.str(&n.User, "nats-user", "NATS_USER", "", "NATS user")
	b.str(&n.Password, "nats-password", "NATS_PASSWORD", "", "NATS password")
	b.str(&n.Token, "nats-token", "NATS_TOKEN", "", "NATS token")
	b.str(&n.TLSCA, "nats-tls-ca", "NATS_TLS_CA", "", "CA certificate file to verify the NATS server")
	b.str(&n.TLSCert, "nats-tls-cert", "NATS_TLS_CERT", "", "client certificate file for NATS TLS")
	b.str(&n.TLSKey, "nats-tls-key", "NATS_TLS_KEY", "", "client key file for NATS TLS")
}

// BindClickHouse registers the ClickHouse connection flags on fs.
func BindClickHouse(fs *flag.FlagSet, env Lookup, c *ClickHouse) {
	b := binder{fs, env}
	b.str(&c.Addr, "clickhouse-addr", "CLICKHOUSE_ADDR", DefaultClickHouseAddr, "ClickHouse native protocol address host:port")
	b.str(&c.Database, "clickhouse-database", "CLICKHOUSE_DATABASE", DefaultDatabase, "ClickHouse database")
	b.str(&c.User, "clickhouse-user", "CLICKHOUSE_USER", "default", "ClickHouse user")
	b.str(&c.Password, "clickhouse-password", "CLICKHOUSE_PASSWORD", "", "ClickHouse password")
	b.str(&c.Cluster, "clickhouse-cluster", "CLICKHOUSE_CLUSTER", "", "a cluster of the ClickHouse servers' remote_servers: replicated local tables on every node, Distributed tables to query, each partition's rows written to one shard (empty: one server)")
}

// BindService registers the common service flags on fs. metricsAddr is the
// service's default for METRICS_ADDR.
func BindService(fs *flag.FlagSet, env Lookup, s *Service, metricsAddr string) error {
	b := binder{fs, env}
	b.str(&s.MetricsAddr, "metrics-addr", "METRICS_ADDR", metricsAddr, "address serving the status page (/), /metrics, /healthz and /readyz (empty: off)")
	b.str(&s.LogLevel, "log-level", "LOG_LEVEL", "info", "debug, info, warn or error")
	b.str(&s.LogFormat, "log-format", "LOG_FORMAT", "text", "text or json")
	if err := b.boolean(&s.ApplyTopology, "apply-topology", "SLUICE_APPLY_TOPOLOGY", true, "create or update the streams and consumers of streams/ at start (false: they are managed elsewhere, e.g. with the nats CLI)"); err != nil {
		return err
	}
	return b.dur(&s.ShutdownTimeout, "shutdown-timeout", "SHUTDOWN_TIMEOUT", 10*time.Second, "how long a drain may take on SIGINT/SIGTERM")
}

// BindReplicas registers --stream-replicas (SLUICE_STREAM_REPLICAS) on fs.
// Check it with CheckReplicas once the flags are parsed.
func BindReplicas(fs *flag.FlagSet, env Lookup, n *int) error {
	return Int(fs, env, n, "stream-replicas", "SLUICE_STREAM_REPLICAS", 0, "copies a NATS cluster keeps of every stream and bucket the service applies or creates (1 to 5; 3 on a 3-node cluster); 0 leaves existing ones as they are and creates new ones with 1")
}

// CheckReplicas returns an error naming the setting when n is not 0 to MaxReplicas.
func CheckReplicas(n int) error {
	if n < 0 || n > MaxReplicas {
		return fmt.Errorf("replicas (SLUICE_STREAM_REPLICAS) %d: want 0 (as they are) or 1 to %d", n, MaxReplicas)
	}
	return nil
}

// DefaultMemoryLimit is the floor of a service's soft memory limit: it holds a
// pipeline worker under a 1,000,000-event backlog to about 400 MiB of RSS
// (docs/benchmarks.md, seventeenth and eighteenth sessions).
const DefaultMemoryLimit = 360 << 20

// BindMemoryLimit registers --memory-limit (SLUICE_MEMORY_LIMIT) on fs.
func BindMemoryLimit(fs *flag.FlagSet, env Lookup, n *uint64) error {
	*n = DefaultMemoryLimit
	if v, ok := env("SLUICE_MEMORY_LIMIT"); ok {
		if err := (*byteSize)(n).Set(v); err != nil {
			return fmt.Errorf("SLUICE_MEMORY_LIMIT=%q: %w", v, err)
		}
	}
	fs.Var((*byteSize)(n), "memory-limit", "Go's soft memory limit for the process: the collector runs when the memory Go holds reaches it (about 35 MiB less than the RSS), and below it at four times the live heap (GOGC=300 unless GOGC is set); the limit rises to 1.5 times the live heap when that needs more, so a large state does not make the collector run constantly; 0 or off: no limit, as Go's default; GOMEMLIMIT in the environment replaces it (env SLUICE_MEMORY_LIMIT)")
	return nil
}

// byteSize is a flag.Value of a size in bytes: 360MiB, 1.5GiB, 400MB, 0 or off.
type byteSize uint64

func (b *byteSize) String() string {
	if b == nil || *b == 0 {
		return "off"
	}
	return humanize.IBytes(uint64(*b))
}

func (b *byteSize) Set(v string) error {
	if v == "off" {
		*b = 0
		return nil
	}
	n, err := humanize.ParseBytes(v)
	if err != nil {
		return fmt.Errorf("want a size such as 360MiB or 1GiB, or off: %w", err)
	}
	*b = byteSize(n)
	return nil
}

// BindConfig registers --config (SLUICE_CONFIG) on fs.
func BindConfig(fs *flag.FlagSet, env Lookup, path *string) {
	binder{fs, env}.str(path, "config", "SLUICE_CONFIG", "", "YAML file with ingest mappings, enrichment, rules and receivers")
}

// BindDataDir registers --data-dir (SLUICE_DATA_DIR) on fs.
func BindDataDir(fs *flag.FlagSet, env Lookup, dir *string) {
	binder{fs, env}.str(dir, "data-dir", "SLUICE_DATA_DIR", DefaultDataDir, "directory for local state")
}

// Int registers an int flag whose default comes from envName.
func Int(fs *flag.FlagSet, env Lookup, p *int, name, envName string, def int, usage string) error {
	if v, ok := env(envName); ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			return fmt.Errorf("%s=%q: want a whole number", envName, v)
		}
		def = n
	}
	fs.IntVar(p, name, def, fmt.Sprintf("%s (env %s)", usage, envName))
	return nil
}

// Duration registers a duration flag whose default comes from envName.
func Duration(fs *flag.FlagSet, env Lookup, p *time.Duration, name, envName string, def time.Duration, usage string) error {
	return binder{fs, env}.dur(p, name, envName, def, usage)
}

// String registers a string flag whose default comes from envName.
func String(fs *flag.FlagSet, env Lookup, p *string, name, envName, def, usage string) {
	binder{fs, env}.str(p, name, envName, def, usage)
}

// Bool registers a bool flag whose default comes from envName.
func Bool(fs *flag.FlagSet, env Lookup, p *bool, name, envName string, def bool, usage string) error {
	return binder{fs, env}.boolean(p, name, envName, def, usage)
}
