package dedup

import (
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/configfile"
)

// Time bases of the window.
const (
	// ReceiveTime holds a key until the time JetStream stored the event's first
	// occurrence plus the window. Replays decide as live did: it is the stream's time.
	ReceiveTime = "receive"
	// EventTime holds a key until the first occurrence's CloudEvents time plus the
	// window. An event older than its window is passed and not held.
	EventTime = "event"
)

// WindowConfig is the dedup section of SLUICE_CONFIG.
type WindowConfig struct {
	// Window is how long a key is held, unless a rule of Windows matches the subject.
	Window time.Duration `yaml:"window"`
	// Time is receive (default) or event.
	Time string `yaml:"time"`
	// MaxKeys caps the keys held (0: no cap). When it is reached, the keys with the
	// earliest expiries are dropped early and counted.
	MaxKeys int `yaml:"max_keys"`
	// SnapshotInterval is how often the state is written to the data dir.
	SnapshotInterval time.Duration `yaml:"snapshot_interval"`
	// Windows set other windows by subject pattern; the first match wins.
	Windows []SubjectWindow `yaml:"windows"`
	// Keys key the events of matching subjects by fields; the first match wins.
	Keys []KeyRule `yaml:"keys"`
	// Store is where the pipeline keeps the keys: memory (StoreMemory, the default)
	// or disk (StoreDisk); Disk sizes the disk store.
	Store string     `yaml:"store"`
	Disk  DiskConfig `yaml:"disk"`
	// MinHold is UNIQUE's duplicate window, read from the stream at start: a key is
	// held at least this long after it was received, and no window may be shorter.
	MinHold time.Duration `yaml:"-"`
}

// Key stores (dedup.store).
const (
	StoreMemory = "memory"
	StoreDisk   = "disk"
)

// DiskConfig is dedup.disk: where and with how much memory the pipeline keeps its
// keys on disk (docs/dedup.md#keys-on-disk).
type DiskConfig struct {
	// Dir holds each partition's keys (<dir>/<partition>); empty: the data dir's
	// pipeline/keys.
	Dir string `yaml:"dir"`
	// CacheMB is the block cache (bloom filters and hot blocks) per partition.
	CacheMB int `yaml:"cache_mb"`
}

// SubjectWindow is a window for the events published to subjects matching Subjects
// (NATS wildcards).
type SubjectWindow struct {
	Subjects string        `yaml:"subjects"`
	Window   time.Duration `yaml:"window"`
}

// DefaultWindowConfig holds keys 24 h by receive time, without a cap, and snapshots
// every 30 s.
func DefaultWindowConfig() WindowConfig {
	return WindowConfig{Window: 24 * time.Hour, Time: ReceiveTime, SnapshotInterval: 30 * time.Second,
		Store: StoreMemory, Disk: DiskConfig{CacheMB: 256}}
}

// LoadWindowConfig reads the dedup section of f over the defaults.
func LoadWindowConfig(f *configfile.File) (WindowConfig, error) {
	c := DefaultWindowConfig()
	if err := f.Decode("dedup", &c); err != nil {
		return c, err
	}
	return c, c.Validate()
}

// LoadIngest reads the ingest section of f: how payloads become events.
func LoadIngest(f *configfile.File) (events.Ingest, error) {
	var in events.Ingest
	if err := f.Decode("ingest", &in); err != nil {
		return in, err
	}
	return in, in.Validate()
}

// Validate reports every problem of c.
func (c WindowConfig) Validate() error {
	var errs []error
	if c.Window <= 0 {
		errs = append(errs, fmt.Errorf("dedup.window must be positive, got %s", c.Window))
	} else if c.Window < c.MinHold {
		errs = append(errs, fmt.Errorf("dedup.window %s is shorter than the duplicate_window of stream UNIQUE (%s), which drops repeats that long anyway", c.Window, c.MinHold))
	}
	if c.Time != ReceiveTime && c.Time != EventTime {
		errs = append(errs, fmt.Errorf("dedup.time must be %q or %q, got %q", ReceiveTime, EventTime, c.Time))
	}
	if c.Store != StoreMemory && c.Store != StoreDisk {
		errs = append(errs, fmt.Errorf("dedup.store must be %q or %q, got %q", StoreMemory, StoreDisk, c.Store))
	}
	if c.Disk.CacheMB <= 0 {
		errs = append(errs, fmt.Errorf("dedup.disk.cache_mb must be positive, got %d", c.Disk.CacheMB))
	}
	if c.MaxKeys < 0 {
		errs = append(errs, fmt.Errorf("dedup.max_keys must not be negative"))
	}
	if c.SnapshotInterval <= 0 {
		errs = append(errs, fmt.Errorf("dedup.snapshot_interval must be positive, got %s", c.SnapshotInterval))
	}
	for i, w := range c.Windows {
		if !server.IsValidSubject(w.Subjects) {
			errs = append(errs, fmt.Errorf("dedup.windows[%d].subjects %q is not a subject pattern", i, w.Subjects))
		}
		if w.Window <= 0 {
			errs = append(errs, fmt.Errorf("dedup.windows[%d].window must be positive, got %s", i, w.Window))
		} else if w.Window < c.MinHold {
			errs = append(errs, fmt.Errorf("dedup.windows[%d].window %s is shorter than the duplicate_window of stream UNIQUE (%s)", i, w.Window, c.MinHold))
		}
	}
	for i, k := range c.Keys {
		if !server.IsValidSubject(k.Subjects) {
			errs = append(errs, fmt.Errorf("dedup.keys[%d].subjects %q is not a subject pattern", i, k.Subjects))
		}
		if len(k.Fields) == 0 {
			errs = append(errs, fmt.Errorf("dedup.keys[%d].fields is empty", i))
		}
		for _, f := range k.Fields {
			if err := checkField(f); err != nil {
				errs = append(errs, fmt.Errorf("dedup.keys[%d]: %w", i, err))
			}
		}
	}
	return errors.Join(errs...)
}

// KeyFieldsFor returns the key fields of events published to subject, or nil.
func (c WindowConfig) KeyFieldsFor(subject string) []string {
	for _, k := range c.Keys {
		if server.SubjectMatchesFilter(subject, k.Subjects) {
			return k.Fields
		}
	}
	return nil
}

// WindowFor returns the window of events published to subject.
func (c WindowConfig) WindowFor(subject string) time.Duration {
	for _, w := range c.Windows {
		if server.SubjectMatchesFilter(subject, w.Subjects) {
			return w.Window
		}
	}
	return c.Window
}

// Longest is the longest window configured.
func (c WindowConfig) Longest() time.Duration {
	l := c.Window
	for _, w := range c.Windows {
		l = max(l, w.Window)
	}
	return l
}
