package enrich

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/csv"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"maps"
	"math"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unicode/utf8"

	json "github.com/goccy/go-json"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/filechange"
	"github.com/sluicehq/sluice/services/kit/kvfollow"
	"github.com/sluicehq/sluice/streams"
)

// Table is a lookup table. Get never blocks on the network: KV tables are kept in
// memory by a watch.
type Table interface {
	Get(key string) (map[string]any, bool)
	// Version identifies the contents Get answers from.
	Version() string
}

// Rows is an immutable snapshot of a table.
type Rows struct {
	m       map[string]map[string]any
	version string
	// repeated counts rows whose key a row before them had (the later is kept);
	// firstRepeated is the first such key.
	repeated      int
	firstRepeated string
}

// All yields each key and its row.
func (r *Rows) All() iter.Seq2[string, map[string]any] { return maps.All(r.m) }

// Repeated says how many rows had the key of a row before them (lookups get the
// last row of a key), and the first such key.
func (r *Rows) Repeated() (int, string) { return r.repeated, r.firstRepeated }

// add keeps row under k, counting a key seen before.
func (r *Rows) add(k string, row map[string]any) {
	if _, ok := r.m[k]; ok {
		if r.repeated == 0 {
			r.firstRepeated = k
		}
		r.repeated++
	}
	r.m[k] = row
}

// logRepeated warns of rows a later row of the same key hides.
func logRepeated(log *slog.Logger, file string, r *Rows) {
	if n, k := r.Repeated(); n > 0 {
		log.Warn("table file has rows whose key a row before them had; lookups get the last row of each key", "file", file, "rows", n, "first_key", k)
	}
}

// fileTable is a CSV or JSON-lines file, reloaded when it changed and is whole
// again (filechange). A reload swaps the whole table at once; a broken file keeps
// the previous table.
type fileTable struct {
	path, key string
	rows      atomic.Pointer[Rows]
	files     *filechange.Files
}

func loadFileTable(path, key string) (*fileTable, error) {
	t := &fileTable{path: path, key: key, files: filechange.New(path)}
	rows, err := readRows(path, key)
	if err != nil {
		return nil, err
	}
	t.rows.Store(rows)
	return t, nil
}

func (t *fileTable) Get(key string) (map[string]any, bool) {
	row, ok := t.rows.Load().m[key]
	return row, ok
}

func (t *fileTable) Version() string { return t.rows.Load().version }

// reload reads the file if it changed and settled; it reports whether it swapped
// the table. Its error is reported once for the same contents.
func (t *fileTable) reload() (bool, error) {
	return t.files.Reload(func() (func(), error) {
		rows, err := readRows(t.path, t.key)
		if err != nil {
			return nil, err
		}
		return func() { t.rows.Store(rows) }, nil
	})
}

// readRows reads a .csv file (header row, one column named key) or a .jsonl file
// (one JSON object a line, with a key field).
func readRows(path, key string) (*Rows, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("table %s: %w", path, err)
	}
	sum := sha256.Sum256(b)
	rows := &Rows{m: map[string]map[string]any{}, version: "sha256:" + hex.EncodeToString(sum[:8])}
	// A spreadsheet's "CSV UTF-8" starts with a byte order mark, which would be
	// part of the first column's name.
	b = events.TrimBOM(b)
	if strings.HasSuffix(path, ".jsonl") {
		sc := bufio.NewScanner(strings.NewReader(string(b)))
		sc.Buffer(make([]byte, 1<<16), 1<<24)
		line := 0
		for sc.Scan() {
			line++
			if strings.TrimSpace(sc.Text()) == "" {
				continue
			}
			var row map[string]any
			if err := json.Unmarshal(sc.Bytes(), &row); err != nil {
				return nil, fmt.Errorf("table %s: line %d: not a JSON object: %w", path, line, err)
			}
			k, ok := row[key]
			if !ok {
				return nil, fmt.Errorf("table %s: line %d: no key field %q", path, line, key)
			}
			// No event value looks such a key up ("null" would be a key of its own).
			kind := ""
			switch k.(type) {
			case nil:
				kind = "null"
			case map[string]any:
				kind = "an object"
			case []any:
				kind = "an array"
			}
			if kind != "" {
				return nil, fmt.Errorf("table %s: line %d: key field %q is %s; want a string, a number or a boolean", path, line, key, kind)
			}
			ks := keyString(k)
			if f, ok := k.(float64); ok && !exactFloat(f) {
				if raw, ok := events.ValueAt(sc.Bytes(), []string{key}); ok {
					ks = keyText(raw) // a 19-digit id as written
				}
			}
			rows.add(ks, row)
		}
		if err := sc.Err(); err != nil {
			return nil, fmt.Errorf("table %s: %w", path, err)
		}
		return rows, nil
	}
	cr := csv.NewReader(strings.NewReader(string(b)))
	header, err := cr.Read()
	if errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("table %s: the file is empty: a CSV table starts with a header row naming its columns", path)
	}
	if err != nil {
		return nil, fmt.Errorf("table %s: header: %w", path, err)
	}
	col := -1
	for i, h := range header {
		if slices.Contains(header[:i], h) {
			return nil, fmt.Errorf("table %s: column %q appears twice in the header %v", path, h, header)
		}
		if h == key {
			col = i
		}
	}
	if col < 0 {
		return nil, fmt.Errorf("table %s: no column %q in the header %v", path, key, header)
	}
	for line := 2; ; line++ {
		rec, err := cr.Read()
		if errors.Is(err, io.EOF) {
			return rows, nil
		}
		if err != nil {
			return nil, fmt.Errorf("table %s: %w", path, err)
		}
		row := make(map[string]any, len(header))
		for i, h := range header {
			row[h] = rec[i]
		}
		rows.add(rec[col], row)
	}
}

// exactFloat reports whether f is a number float64 holds exactly whatever its
// spelling: not an integer beyond 2^53, where neighbouring integers share one value.
func exactFloat(f float64) bool { return math.Abs(f) < 1<<53 }

// keyText is keyString of the JSON value raw, but an integer that float64 cannot
// hold exactly (a 19-digit id) is its digits as sent: two such ids do not become
// one key (nor one pseudonym).
func keyText(raw []byte) string {
	if len(raw) >= 2 && raw[0] == '"' && raw[len(raw)-1] == '"' && bytes.IndexByte(raw, '\\') < 0 && utf8.Valid(raw) {
		return string(raw[1 : len(raw)-1]) // a string without escapes: as it reads
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return string(raw)
	}
	if f, ok := v.(float64); ok && !exactFloat(f) {
		if lit := strings.TrimSpace(string(raw)); integerLiteral(lit) {
			return lit
		}
	}
	return keyString(v)
}

// integerLiteral reports whether s is a JSON integer: an optional minus and digits.
func integerLiteral(s string) bool {
	s = strings.TrimPrefix(s, "-")
	return s != "" && strings.Trim(s, "0123456789") == ""
}

// keyString renders a lookup key as the tables hold it: strings as they are, other
// JSON values as JSON.
func keyString(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	default:
		b, _ := json.Marshal(x)
		return string(b)
	}
}

// kvTable mirrors a NATS KV bucket: keys are lookup keys, values JSON objects.
type kvTable struct {
	bucket string
	// rows maps keys to rows (map[string]any): read by every event, without a lock
	// between the goroutines that read it; written by the watch.
	rows sync.Map
	mu   sync.Mutex // held by the watch's writes
	rev  uint64
	// version is Version's answer, made when rev changes (read without the lock).
	version atomic.Pointer[string]
}

func (t *kvTable) Get(key string) (map[string]any, bool) {
	row, ok := t.rows.Load(key)
	if !ok {
		return nil, false
	}
	return row.(map[string]any), true
}

func (t *kvTable) Version() string { return *t.version.Load() }

// setRev records the table's revision; t.mu is held.
func (t *kvTable) setRev(rev uint64) {
	t.rev = rev
	v := "kv:" + t.bucket + "@" + strconv.FormatUint(rev, 10)
	t.version.Store(&v)
}

// kvKeyPrefix, then base64url of a lookup key, is the KV key of a lookup key that
// cannot be a KV key itself.
const kvKeyPrefix = "b64."

// kvKeyChars are what a KV key may hold (nats.go's check, with no empty token).
var kvKeyChars = regexp.MustCompile(`^[-/_=.a-zA-Z0-9]+$`)

// KVKey is the KV key a lookup table keeps key's row under: key itself when it can
// be one, else "b64." and its base64url (no padding): an e-mail address, a key with
// a space or ':', for instance, which a KV key cannot hold. `sluice kv load` writes
// rows so; a KV table reads both.
func KVKey(key string) string {
	if kvKeyChars.MatchString(key) && key[0] != '.' && key[len(key)-1] != '.' && !strings.Contains(key, "..") && !strings.HasPrefix(key, kvKeyPrefix) {
		return key
	}
	return kvKeyPrefix + base64.RawURLEncoding.EncodeToString([]byte(key))
}

// lookupKey is the lookup key a KV key holds the row of (KVKey's inverse).
func lookupKey(kvKey string) string {
	if enc, ok := strings.CutPrefix(kvKey, kvKeyPrefix); ok {
		if b, err := base64.RawURLEncoding.DecodeString(enc); err == nil {
			return string(b)
		}
	}
	return kvKey
}

func (t *kvTable) apply(e jetstream.KeyValueEntry, log *slog.Logger) {
	t.mu.Lock()
	defer t.mu.Unlock()
	// Entries come in revision order, but a bucket made again starts its revisions
	// anew: the table's version is the last entry's.
	if e.Revision() != t.rev {
		t.setRev(e.Revision())
	}
	switch e.Operation() {
	case jetstream.KeyValueDelete, jetstream.KeyValuePurge:
		t.rows.Delete(lookupKey(e.Key()))
		return
	}
	var row map[string]any
	if err := json.Unmarshal(e.Value(), &row); err != nil {
		log.Error("KV value is not a JSON object; keeping the previous value", "bucket", t.bucket, "key", e.Key(), "revision", e.Revision(), "err", err)
		return
	}
	t.rows.Store(lookupKey(e.Key()), row)
}

// watchKV opens (creating if needed, in replicas copies) bucket and keeps t in step with it until ctx
// is done or stop is called (kvfollow: also when the bucket is deleted and made
// again). It returns once the bucket's current values are loaded.
func watchKV(ctx context.Context, js jetstream.JetStream, bucket string, replicas int, log *slog.Logger) (t *kvTable, stop func(), err error) {
	kv, err := streams.OpenKeyValue(ctx, js, jetstream.KeyValueConfig{Bucket: bucket, Description: "sluice lookup table", Replicas: replicas})
	if err != nil {
		return nil, nil, fmt.Errorf("KV bucket %s: %w", bucket, err)
	}
	t = &kvTable{bucket: bucket}
	t.setRev(0)
	stop, err = kvfollow.Follow(ctx, kvfollow.Config{KV: kv, Log: log}, func(e jetstream.KeyValueEntry) { t.apply(e, log) })
	if err != nil {
		return nil, nil, err
	}
	return t, stop, nil
}

// LoadFile reads a .csv (header row) or .jsonl table file keyed by the key column,
// for bulk loads into a KV bucket.
func LoadFile(path, key string) (*Rows, error) {
	return readRows(path, key)
}
