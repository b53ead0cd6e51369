package procs

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

// TestDedupKill9 runs two dedup processes on one consumer, each with its own data
// dir, and kills one with SIGKILL five times while 12,000 unique events and 6,000
// repeats flow. UNIQUE's own duplicate window is cut to 1 s and every repeat comes
// at least 2 s after its original, so only the stages' window state (snapshots,
// replay of UNIQUE, the tail) can drop them. UNIQUE ends with each key once.
func TestDedupKill9(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "dedup"), "github.com/sluicehq/sluice/services/dedup/cmd/dedup")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	ns := runNATS(t)
	nc, js := ns.connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	topo, _ := streams.Load()
	uc, _ := topo.Stream(streams.Unique)
	uc.Duplicates = time.Second
	if _, err := js.UpdateStream(ctx, *uc); err != nil {
		t.Fatal(err)
	}
	cc, _ := topo.Consumer(streams.Events, "dedup")
	cc.AckWait = 2 * time.Second
	if _, err := js.CreateOrUpdateConsumer(ctx, streams.Events, *cc); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "sluice.yaml")
	if err := os.WriteFile(cfgPath, []byte("dedup:\n  window: 1h\n  snapshot_interval: 300ms\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	exited := map[*exec.Cmd]chan struct{}{}
	outputs := map[*exec.Cmd]*strings.Builder{}
	start := func(dataDir string) *exec.Cmd {
		out := &strings.Builder{}
		c := exec.Command(filepath.Join(dir, "dedup"))
		c.Env = append(cleanEnv(), "NATS_URL="+ns.url(), "METRICS_ADDR=", "LOG_LEVEL=error",
			"SLUICE_APPLY_TOPOLOGY=false", "SLUICE_CONFIG="+cfgPath, "SLUICE_DATA_DIR="+dataDir)
		c.Stdout, c.Stderr = out, out
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = c.Wait(); close(done) }()
		t.Cleanup(func() { _ = c.Process.Kill(); <-done })
		exited[c] = done
		outputs[c] = out
		return c
	}
	survivorDir, victimDir := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	start(survivorDir)
	victim := start(victimDir)

	const unique, repeats = 12_000, 6_000
	pub := func(i int) error {
		return nc.PublishMsg(&nats.Msg{Subject: "events.k9.t", Data: fmt.Appendf(nil, `{"id":"k%d","source":"k9"}`, i)})
	}
	published := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(3, 4))
		// Originals at 2,000/s; from the third second on, a repeat of an original at
		// least 2 s old after every second original.
		sent := make([]time.Time, unique)
		for i := range unique {
			if err := pub(i); err != nil {
				published <- err
				return
			}
			sent[i] = time.Now()
			if i%2 == 1 && i > 4000 {
				j := rng.IntN(i - 4000)
				if err := pub(j); err != nil {
					published <- err
					return
				}
			}
			if i%200 == 199 {
				_ = nc.Flush()
				time.Sleep(100 * time.Millisecond)
			}
		}
		// The rest of the repeats, of originals that are all old enough by now.
		for range repeats - (unique-4002)/2 {
			if err := pub(rng.IntN(unique - 4000)); err != nil {
				published <- err
				return
			}
		}
		published <- nc.Flush()
	}()
	rng := rand.New(rand.NewPCG(5, 6))
	for kill := range 5 {
		time.Sleep(time.Duration(500+rng.IntN(700)) * time.Millisecond)
		select {
		case <-exited[victim]:
			t.Fatalf("dedup exited by itself:\n%s", outputs[victim])
		default:
		}
		if err := victim.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-exited[victim]
		t.Logf("kill %d", kill+1)
		victim = start(victimDir)
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	if err := oracle.WaitFor(ctx, 2*time.Minute, func() error {
		s, err := js.Stream(ctx, streams.Events)
		if err != nil {
			return err
		}
		if got := s.CachedInfo().State.Msgs; got < unique+repeats {
			return fmt.Errorf("EVENTS holds %d", got)
		}
		return natstest.Idle(ctx, js, streams.Events, "dedup")
	}); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(ctx, streams.Unique)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for seq := uint64(1); seq <= s.CachedInfo().State.LastSeq; seq++ {
		m, err := s.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		seen[m.Header.Get(nats.MsgIdHdr)]++
	}
	extra := 0
	for _, n := range seen {
		extra += n - 1
	}
	if len(seen) != unique || extra != 0 {
		t.Fatalf("UNIQUE holds %d distinct keys (want %d) and %d repeats (want 0)", len(seen), unique, extra)
	}
}
