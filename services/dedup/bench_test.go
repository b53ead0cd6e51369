package dedup

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/dedup/window"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/streams"
)

func benchPayload(i int) []byte {
	return fmt.Appendf(nil, `{"specversion":"1.0","id":"pv-%d","source":"web","type":"page.view","time":"2026-11-21T10:00:00.123Z","datacontenttype":"application/json","data":{"user":"u%d","session":"s-%d","path":"/products/%d","referrer":"https://search.example.com/?q=item+1","ip":"203.0.113.1","ua":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36","duration_ms":%d}}`,
		i, i%5000, i%20000, i%997, i%3000)
}

// BenchmarkProcess is the stage's core on ~430-byte events (decode, validate, key,
// look up, encode) with a million keys in the window.
func BenchmarkProcess(b *testing.B) {
	store := window.NewStore(0)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 1_000_000 {
		store.Add(window.Key{Hi: r.Uint64(), Lo: r.Uint64()}, 1<<31, uint64(i+1), 0)
	}
	w := DefaultWindowConfig()
	w.MinHold = 10 * time.Minute
	h, err := NewHandler(HandlerConfig{MaxPayload: 1 << 20, Window: w, Store: store})
	if err != nil {
		b.Fatal(err)
	}
	payloads := make([][]byte, 4096)
	for i := range payloads {
		payloads[i] = benchPayload(i)
	}
	recv := time.Now()
	b.ResetTimer()
	for i := range b.N {
		res := h.Process(events.Message{Subject: "events.web.pageview", Data: payloads[i&4095], Received: recv})
		if res.Invalid != nil {
			b.Fatal(res.Invalid)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkStage measures the stage through JetStream: 200,000 events (5% repeats)
// pre-published to EVENTS, from start until the consumer has acked them all. NATS
// runs embedded in the benchmark's process.
func BenchmarkStage(b *testing.B) {
	const total = 200_000
	for range b.N {
		b.StopTimer()
		ns := natstest.Run(b)
		nc, js := ns.Connect(b)
		ctx := context.Background()
		if err := service.ApplyTopology(ctx, nc, 1); err != nil {
			b.Fatal(err)
		}
		for i := range total {
			n := i
			if i%20 == 19 {
				n = i - 1
			}
			if _, err := js.PublishAsync("events.web.pageview", benchPayload(n)); err != nil {
				b.Fatal(err)
			}
			if i%10_000 == 9_999 {
				<-js.PublishAsyncComplete()
			}
		}
		<-js.PublishAsyncComplete()
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		b.StartTimer()
		start := time.Now()
		go func() {
			done <- Run(runCtx, DefaultConfig(), Deps{NATS: nc, Logger: benchLog, Registerer: prometheus.NewRegistry()})
		}()
		poll.Until(b, 5*time.Minute, func() error { return natstest.Idle(ctx, js, streams.Events, "dedup") })
		elapsed := time.Since(start)
		b.StopTimer()
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(total/elapsed.Seconds(), "events/s")
		b.ReportMetric(0, "ns/op")
	}
}

// BenchmarkRestart fills UNIQUE with 1,000,000 keys, then measures how long the
// stage takes from start to consuming: from a snapshot, and with no snapshot
// (replaying all of UNIQUE).
func BenchmarkRestart(b *testing.B) {
	const keys = 1_000_000
	ns := natstest.Run(b)
	nc, js := ns.Connect(b)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		b.Fatal(err)
	}
	exp := strconv.FormatInt(time.Now().Add(time.Hour).Unix(), 10)
	for i := range keys {
		m := nats.NewMsg("unique.web.pageview")
		m.Header.Set(nats.MsgIdHdr, keyOf("e", "web", strconv.Itoa(i)))
		m.Header.Set(HeaderExpires, exp)
		m.Data = []byte(`{}`)
		if _, err := js.PublishMsgAsync(m); err != nil {
			b.Fatal(err)
		}
		if i%10_000 == 9_999 {
			<-js.PublishAsyncComplete()
		}
	}
	<-js.PublishAsyncComplete()
	dataDir := b.TempDir()
	start := func() time.Duration {
		runCtx, cancel := context.WithCancel(ctx)
		defer cancel()
		ready := make(chan struct{})
		done := make(chan error, 1)
		cfg := DefaultConfig()
		cfg.DataDir = dataDir
		began := time.Now()
		go func() {
			done <- Run(runCtx, cfg, Deps{NATS: nc, Logger: benchLog, Registerer: prometheus.NewRegistry(), Ready: func() { close(ready) }})
		}()
		select {
		case <-ready:
		case err := <-done:
			b.Fatal(err)
		}
		took := time.Since(began)
		cancel()
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		return took
	}
	for range b.N {
		replay := start() // no snapshot yet: replays UNIQUE; writes one on stop
		fromSnapshot := start()
		b.ReportMetric(replay.Seconds(), "s-replay-1M")
		b.ReportMetric(fromSnapshot.Seconds(), "s-snapshot-1M")
		b.ReportMetric(0, "ns/op")
	}
}

var benchLog = slog.New(slog.NewTextHandler(io.Discard, nil))

// BenchmarkAdmitDuringSave is how long the stage's Admit waits while the state
// expires its keys and writes its snapshot, a million keys held: the worst wait
// of the admits made during each expiry and save (worst-admit-ms, the worst of
// b.N rounds). Each admitted key's window has ended, so the store does not grow
// and each admit is the lock's wait and a lookup.
func BenchmarkAdmitDuringSave(b *testing.B) {
	const n = 1_000_000
	const now = 1_000_000
	store := window.NewStore(0)
	for i := range n {
		exp := uint32(now + 1_000_000)
		if i%10 == 0 {
			exp = now + 100 // a tenth of the keys end before the first expiry
		}
		store.Add(testKey(i), exp, uint64(i+1), now)
	}
	s := &state{store: store, path: filepath.Join(b.TempDir(), "snapshot"), log: slog.New(slog.DiscardHandler)}
	var worst time.Duration
	next := 10 * n
	b.ResetTimer()
	for round := range b.N {
		done := make(chan error, 1)
		go func() {
			s.expire(uint32(now + 200 + round))
			done <- s.save()
		}()
	admits:
		for {
			select {
			case err := <-done:
				if err != nil {
					b.Fatal(err)
				}
				break admits
			default:
			}
			began := time.Now()
			store.Admit(testKey(next), now, uint64(next+1), now+200)
			worst = max(worst, time.Since(began))
			next++
		}
	}
	b.ReportMetric(float64(worst.Microseconds())/1000, "worst-admit-ms")
}
