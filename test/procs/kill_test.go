package procs

import (
	"context"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluicehq/sluice/schemas/events"
	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/streams"
	"github.com/sluicehq/sluice/test/oracle"
)

func enriched(i int) []byte {
	e := events.Event{
		ID: "k9-" + strconv.Itoa(i), Source: "killtest", Type: "t", SpecVersion: "1.0",
		Time: time.Date(2026, 11, 21, 10, 0, 0, 0, time.UTC).Add(time.Duration(i) * time.Millisecond), Key: "key-" + strconv.Itoa(i),
		ReceivedAt: time.Now().UTC(), NATSSubject: "events.killtest.t", Data: json.RawMessage(`{"i":` + strconv.Itoa(i) + `}`),
	}
	b, _ := e.Marshal()
	return b
}

// TestSinkKill9 runs two sink processes on one consumer and kills one of them with
// SIGKILL six times while 100,000 events flow: after an insert and before its acks,
// before an insert, and during one, each twice; the table ends with each event
// exactly once.
func TestSinkKill9(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "sink"), "github.com/sluicehq/sluice/services/sink/cmd/sink")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	ns := runNATS(t)
	srv := chtest.Start(t)
	chs, conn := chtest.Database(t, srv)
	nc, js := ns.connect(t)
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	// A short ack wait, so batches of a killed sink come back quickly.
	topo, _ := streams.Load()
	cc, _ := topo.Consumer(streams.Enriched, "sink")
	cc.AckWait = 2 * time.Second
	if _, err := js.CreateOrUpdateConsumer(ctx, streams.Enriched, *cc); err != nil {
		t.Fatal(err)
	}
	exited := map[*exec.Cmd]chan struct{}{}
	start := func(crash string) (*exec.Cmd, *strings.Builder) {
		out := &strings.Builder{}
		c := exec.Command(filepath.Join(dir, "sink"))
		c.Env = append(cleanEnv(), "NATS_URL="+ns.url(), "CLICKHOUSE_ADDR="+chs.Addr, "CLICKHOUSE_DATABASE="+chs.Database,
			"METRICS_ADDR=", "LOG_LEVEL=error", "SLUICE_APPLY_TOPOLOGY=false", "SLUICE_TEST_CRASH="+crash)
		c.Stdout, c.Stderr = out, out
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{})
		go func() { _ = c.Wait(); close(done) }()
		t.Cleanup(func() { _ = c.Process.Kill(); <-done })
		exited[c] = done
		return c, out
	}
	const total = 100_000
	published := make(chan error, 1)
	go func() {
		for i := range total {
			if _, err := js.PublishAsync("enriched.killtest.t", enriched(i)); err != nil {
				published <- err
				return
			}
			if i%2000 == 1999 {
				// About 10,000 events/s, so the run outlasts the kills.
				<-js.PublishAsyncComplete()
				time.Sleep(200 * time.Millisecond)
			}
		}
		<-js.PublishAsyncComplete()
		published <- nil
	}()
	rng := rand.New(rand.NewPCG(1, 2))
	start("after-insert:0")
	// The victim kills itself (SIGKILL) at one point of the insert cycle in turn; if
	// it lives too long, the test kills it.
	points := []string{"after-insert", "before-insert", "during-insert"}
	victim, _ := start(points[0] + ":0.5")
	count := func() uint64 {
		var n uint64
		_ = conn.QueryRow(ctx, "SELECT count() FROM events").Scan(&n)
		return n
	}
	for kill := range 6 {
		how := "by itself"
		select {
		case <-exited[victim]:
		case <-time.After(time.Duration(1000+rng.IntN(1000)) * time.Millisecond):
			how = "by the test"
			// It may have killed itself just now (os.ErrProcessDone): as good.
			if err := victim.Process.Signal(syscall.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
				t.Fatal(err)
			}
			<-exited[victim]
		}
		t.Logf("kill %d (%s, %s) at %d rows", kill+1, points[kill%len(points)], how, count())
		victim, _ = start(points[(kill+1)%len(points)] + ":0.5")
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	if err := oracle.WaitFor(ctx, 2*time.Minute, func() error {
		return natstest.Idle(ctx, js, streams.Enriched, "sink")
	}); err != nil {
		t.Fatal(err)
	}
	var n, unique uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(key) FROM events").Scan(&n, &unique); err != nil {
		t.Fatal(err)
	}
	if n != total || unique != total {
		t.Fatalf("count()=%d uniqExact(key)=%d, want %d each", n, unique, total)
	}
}
