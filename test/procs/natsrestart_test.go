package procs

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/configfile"
	"github.com/sluicehq/sluice/services/kit/natsconn"
	"github.com/sluicehq/sluice/services/kit/natstest"
	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/services/kit/settings"
	"github.com/sluicehq/sluice/services/kit/telemetry"
	"github.com/sluicehq/sluice/services/kit/testnet"
	"github.com/sluicehq/sluice/services/sluice/platform"
	"github.com/sluicehq/sluice/streams"
)

// natsProcess is a nats-server process with JetStream on a fixed port and store;
// a cluster's node runs from its config file conf, on host, in the network
// namespace netns when set.
type natsProcess struct {
	bin, store string
	port       int
	conf       string
	host       string
	netns      string
	log        string // where the output goes, when set
	cmd        *exec.Cmd
	done       chan struct{}
}

func (n *natsProcess) start(t *testing.T) {
	t.Helper()
	n.launch(t)
	n.waitReady(t)
}

// launch starts the process and returns.
func (n *natsProcess) launch(t *testing.T) {
	t.Helper()
	args := []string{"-js", "-sd", n.store, "-a", "127.0.0.1", "-p", strconv.Itoa(n.port)}
	if n.conf != "" {
		args = []string{"-c", n.conf}
	}
	if n.netns != "" {
		// ip netns exec execs the server in place: the process is the server's.
		args = append([]string{"netns", "exec", n.netns, n.bin}, args...)
		n.cmd = exec.Command("ip", args...)
	} else {
		n.cmd = exec.Command(n.bin, args...)
	}
	if n.log != "" {
		f, err := os.OpenFile(n.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		n.cmd.Stdout, n.cmd.Stderr = f, f
	}
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n.done = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { _ = c.Wait(); close(done) }(n.cmd, n.done)
}

// waitReady waits until JetStream answers through the server.
func (n *natsProcess) waitReady(t *testing.T) {
	t.Helper()
	poll.Until(t, 60*time.Second, func() error {
		nc, err := nats.Connect(n.url())
		if err != nil {
			return err
		}
		defer nc.Close()
		js, _ := jetstream.New(nc)
		_, err = js.AccountInfo(context.Background())
		return err
	})
}

func (n *natsProcess) kill() {
	_ = n.cmd.Process.Signal(syscall.SIGKILL)
	<-n.done
}

func (n *natsProcess) url() string {
	return "nats://" + net.JoinHostPort(cmp.Or(n.host, "127.0.0.1"), strconv.Itoa(n.port))
}

// runNATS builds nats-server and runs it as a process (JetStream, a file store in a
// temporary directory) until the test ends, so a fault test's server is a real one.
func runNATS(t *testing.T) *natsProcess {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "nats-server")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/nats-io/nats-server/v2").CombinedOutput(); err != nil {
		t.Fatalf("build nats-server: %v\n%s", err, out)
	}
	_, portText, _ := net.SplitHostPort(testnet.FreeAddr(t))
	port, _ := strconv.Atoi(portText)
	n := &natsProcess{bin: bin, store: filepath.Join(dir, "store"), port: port}
	n.start(t)
	t.Cleanup(n.kill)
	return n
}

// connect returns a connection to n, closed when the test ends; it reconnects
// across restarts of n.
func (n *natsProcess) connect(t *testing.T) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	return dial(t, n.url())
}

// dial connects to urls (comma-separated), reconnecting for ever; the
// connection is closed when the test ends.
func dial(t *testing.T, urls string) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(urls, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// TestNATSKill9 kills the NATS server (a separate process, file store) with SIGKILL
// twice while events flow and starts it again on the same store. Publishers retry
// every publish that was not acknowledged, with the same Nats-Msg-Id. Every
// acknowledged event ends in ClickHouse exactly once.
func TestNATSKill9(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "nats-server")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/nats-io/nats-server/v2").CombinedOutput(); err != nil {
		t.Fatalf("build nats-server: %v\n%s", err, out)
	}
	_, portText, _ := net.SplitHostPort(testnet.FreeAddr(t))
	p, _ := strconv.Atoi(portText)
	srv := &natsProcess{bin: bin, store: filepath.Join(dir, "store"), port: p}
	srv.start(t)
	t.Cleanup(srv.kill)

	ch := chtest.Start(t)
	_, conn := chtest.Database(t, ch)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	nc, err := natsconn.Connect(settings.NATS{URL: srv.url()}, "test", log)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ctx := context.Background()
	if err := service.ApplyTopology(ctx, nc, 1); err != nil {
		t.Fatal(err)
	}
	stageConn, err := natsconn.Connect(settings.NATS{URL: srv.url()}, "stages", log)
	if err != nil {
		t.Fatal(err)
	}
	defer stageConn.Close()
	file, _ := configfile.Parse("none.yaml", nil)
	runCtx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := platform.RunStages(runCtx, platform.Stages{NATS: stageConn, ClickHouse: conn, Config: file, Split: true, Env: func(string) (string, bool) { return "", false },
			Log: log, Registerer: prometheus.NewRegistry(), Ready: &telemetry.Readiness{}, DataDir: filepath.Join(dir, "state")}); err != nil {
			t.Errorf("stages: %v", err)
		}
	})
	defer func() { cancel(); wg.Wait() }()

	// The producer: a JetStream publish per event, retried with the same
	// Nats-Msg-Id until acknowledged, as a careful producer would.
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	const total = 3000
	acked := make(chan int, total)
	producer := make(chan error, 1)
	go func() {
		for i := range total {
			m := nats.NewMsg("events.k9.nats")
			m.Header.Set(nats.MsgIdHdr, "nk-"+strconv.Itoa(i))
			m.Data = fmt.Appendf(nil, `{"id":"nk-%d","source":"k9"}`, i)
			for attempt := 0; ; attempt++ {
				pctx, pcancel := context.WithTimeout(ctx, 2*time.Second)
				_, err := js.PublishMsg(pctx, m)
				pcancel()
				if err == nil {
					acked <- i
					break
				}
				if attempt > 300 {
					producer <- fmt.Errorf("event %d never acknowledged: %w", i, err)
					return
				}
				time.Sleep(100 * time.Millisecond)
			}
			if i%100 == 99 {
				time.Sleep(50 * time.Millisecond)
			}
		}
		producer <- nil
	}()
	for restart := range 2 {
		poll.Until(t, time.Minute, func() error {
			if len(acked) < (restart+1)*total/3 {
				return fmt.Errorf("%d acknowledged", len(acked))
			}
			return nil
		})
		srv.kill()
		t.Logf("killed nats-server after %d acknowledged publishes", len(acked))
		srv.start(t)
	}
	if err := <-producer; err != nil {
		t.Fatal(err)
	}
	close(acked)
	want := map[string]bool{}
	for i := range acked {
		want["nk-"+strconv.Itoa(i)] = true
	}
	if len(want) != total {
		t.Fatalf("%d acknowledged, want %d", len(want), total)
	}
	poll.Until(t, 2*time.Minute, func() error {
		var n uint64
		if err := conn.QueryRow(ctx, "SELECT count() FROM events").Scan(&n); err != nil {
			return err
		}
		if n < total {
			return fmt.Errorf("%d rows", n)
		}
		for _, c := range [][2]string{{streams.Events, "dedup"}, {streams.Unique, "enrich"}, {streams.Enriched, "sink"}} {
			if err := natstest.Idle(ctx, js, c[0], c[1]); err != nil {
				return err
			}
		}
		return nil
	})
	var n, unique uint64
	if err := conn.QueryRow(ctx, "SELECT count(), uniqExact(id) FROM events").Scan(&n, &unique); err != nil {
		t.Fatal(err)
	}
	if n != total || unique != total {
		rows, err := conn.Query(ctx, "SELECT id, groupArray(stream_seq), groupArray(key) FROM events GROUP BY id HAVING count() > 1 ORDER BY id LIMIT 5")
		if err == nil {
			for rows.Next() {
				var id string
				var seqs []uint64
				var keys []string
				_ = rows.Scan(&id, &seqs, &keys)
				t.Logf("duplicate %s: stream_seq %v keys %v", id, seqs, keys)
			}
			rows.Close()
		}
		t.Fatalf("count()=%d uniqExact(id)=%d, want %d each", n, unique, total)
	}
}
