// Package backfill publishes historical events from JSON-lines files into EVENTS
// (`sluice import`), at a set rate, resuming after an interruption.
package backfill

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/time/rate"

	"github.com/sluicehq/sluice/schemas/deadletters"
	"github.com/sluicehq/sluice/services/kit/stage"
)

// Bucket holds each file's checkpoint: the lines of it JetStream acknowledged.
const Bucket = "sluice_imports"

// DLQStage is the stage named by the dead letter of a line too large to publish.
const DLQStage = "import"

// Options is how files are imported.
type Options struct {
	// Subject every line is published to (an ingest mapping may match it).
	Subject string
	// Rate is events a second at most; 0 is as fast as JetStream acknowledges.
	Rate float64
	// InFlight is how many publishes wait for their acknowledgement at once.
	InFlight int
	// Restart ignores checkpoints: every line is published again (dedup still
	// drops those its window holds).
	Restart bool
}

// Progress is where an import is, for display.
type Progress struct {
	File string
	// Lines published and acknowledged (skipped ones included), of which Skipped
	// were acknowledged by an earlier run.
	Lines, Skipped int64
	// Read and Size are bytes of the file (compressed, as stored).
	Read, Size int64
	Done       bool
}

// checkpoint is a file's record in Bucket, for one subject.
type checkpoint struct {
	File string `json:"file"`
	// Subject is what the lines were published to (empty in checkpoints written
	// before it was recorded, which were kept under the file's id alone).
	Subject string    `json:"subject,omitempty"`
	Lines   int64     `json:"lines"`
	At      time.Time `json:"at"`
}

// checkpointKey keys the checkpoint of file id published to subject: an import of
// the same file to another subject is another import.
func checkpointKey(id, subject string) string {
	h := sha256.Sum256([]byte(subject))
	return id + "." + hex.EncodeToString(h[:8])
}

// readCheckpoint returns how many lines of file id were published to subject: its
// checkpoint, or one of the file alone written before subjects were recorded.
func readCheckpoint(ctx context.Context, kv jetstream.KeyValue, id, subject string) (int64, error) {
	for _, key := range []string{checkpointKey(id, subject), id} {
		e, err := kv.Get(ctx, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return 0, err
		}
		var c checkpoint
		if err := json.Unmarshal(e.Value(), &c); err != nil {
			return 0, err
		}
		return c.Lines, nil
	}
	return 0, nil
}

// Import publishes every non-blank line of each file (gzip is recognised by its
// magic bytes) to opts.Subject, reporting to progress, and records in kv after each
// acknowledged batch how many lines of the file are done; a second run skips those.
// A line larger than the server's max_payload is published as a dead letter
// (dlq.import, truncated) instead.
// Lines after the last checkpoint (in flight at an interruption) are published
// again: each event's key (its id, or its content) makes dedup drop them.
func Import(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, files []string, opts Options, progress func(Progress)) error {
	if opts.Subject == "" {
		return errors.New("import: a subject is needed (--subject; an ingest mapping may match it)")
	}
	if !server.IsValidPublishSubject(opts.Subject) {
		// NATS would store a message under "events.a.*" as it is, a subject no
		// consumer's filter or partition mapping expects.
		return fmt.Errorf("import: subject %q is not one a message can be published to: no wildcard tokens (* or >), no empty tokens or spaces", opts.Subject)
	}
	if opts.InFlight <= 0 {
		opts.InFlight = 256
	}
	limit := rate.NewLimiter(rate.Inf, 1)
	if opts.Rate > 0 {
		limit = rate.NewLimiter(rate.Limit(opts.Rate), max(1, int(opts.Rate/10)))
	}
	for _, file := range files {
		if err := importFile(ctx, js, kv, file, opts, limit, progress); err != nil {
			return err
		}
	}
	return nil
}

func importFile(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, file string, opts Options, limit *rate.Limiter, progress func(Progress)) error {
	id, size, err := fileID(file)
	if err != nil {
		return err
	}
	var done int64
	if !opts.Restart {
		if done, err = readCheckpoint(ctx, kv, id, opts.Subject); err != nil {
			return fmt.Errorf("import: checkpoint of %s: %w", file, err)
		}
	}
	f, err := os.Open(file)
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	defer f.Close()
	counted := &countingReader{r: f}
	br := bufio.NewReaderSize(counted, 1<<16)
	var r io.Reader = br
	if magic, _ := br.Peek(2); len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		gz, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("import: %s: %w", file, err)
		}
		defer gz.Close()
		r = gz
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 1<<20), 64<<20)
	p := Progress{File: file, Size: size, Skipped: done}
	// acked is the last line acknowledged (or done before); recorded is what the
	// checkpoint says.
	line, acked, recorded := int64(0), done, done
	var pending []jetstream.PubAckFuture
	var pendingLines []int64
	// settle waits for the publishes in flight, then records the checkpoint.
	settle := func() error {
		for i, f := range pending {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				if errors.Is(err, jetstream.ErrNoStreamResponse) {
					return fmt.Errorf("import: %s line %d: no stream stores subject %s (EVENTS takes events.>): %w", file, pendingLines[i], opts.Subject, err)
				}
				return fmt.Errorf("import: %s line %d: %w", file, pendingLines[i], err)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		if len(pendingLines) > 0 {
			acked = pendingLines[len(pendingLines)-1]
		}
		pending, pendingLines = pending[:0], pendingLines[:0]
		if acked > recorded {
			b, _ := json.Marshal(checkpoint{File: file, Subject: opts.Subject, Lines: acked, At: time.Now().UTC()})
			if _, err := kv.Put(ctx, checkpointKey(id, opts.Subject), b); err != nil {
				return fmt.Errorf("import: checkpoint of %s: %w", file, err)
			}
			recorded = acked
		}
		p.Lines, p.Read = acked, counted.n
		progress(p)
		return nil
	}
	for sc.Scan() {
		line++
		if line <= done || len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		if err := limit.Wait(ctx); err != nil {
			return err
		}
		msg := nats.NewMsg(opts.Subject)
		msg.Data = bytes.Clone(sc.Bytes())
		f, err := js.PublishMsgAsync(msg)
		if errors.Is(err, nats.ErrMaxPayload) {
			// Never publishable: a dead letter, so that the import goes on and the
			// line is not lost.
			maxPayload := js.Conn().MaxPayload()
			reason := fmt.Sprintf("line %d of %s is %d bytes, over the NATS server's max_payload (%d bytes): not published to %s",
				line, file, len(msg.Data), maxPayload, opts.Subject)
			f, err = js.PublishMsgAsync(stage.UnstoredDeadLetter(DLQStage, opts.Subject, deadletters.ImportID(id, line), msg.Data, reason, maxPayload))
		}
		if err != nil {
			return fmt.Errorf("import: %s line %d: %w", file, line, err)
		}
		pending, pendingLines = append(pending, f), append(pendingLines, line)
		if len(pending) >= opts.InFlight {
			if err := settle(); err != nil {
				return err
			}
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("import: %s line %d: %w", file, line+1, err)
	}
	if err := settle(); err != nil {
		return err
	}
	p.Lines, p.Read, p.Done = max(line, done), size, true
	progress(p)
	return nil
}

// fileID names a file's checkpoint by its content (the first MiB and the size):
// the same file under another name resumes, a changed one starts over.
func fileID(file string) (string, int64, error) {
	f, err := os.Open(file)
	if err != nil {
		return "", 0, fmt.Errorf("import: %w", err)
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return "", 0, fmt.Errorf("import: %w", err)
	}
	h := sha256.New()
	fmt.Fprintf(h, "%d\n", info.Size())
	if _, err := io.CopyN(h, f, 1<<20); err != nil && !errors.Is(err, io.EOF) {
		return "", 0, fmt.Errorf("import: %s: %w", file, err)
	}
	return hex.EncodeToString(h.Sum(nil)[:16]), info.Size(), nil
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}
