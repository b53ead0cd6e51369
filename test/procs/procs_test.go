// Package procs runs each service as its own process, the way production does,
// against a NATS server and a real clickhouse-server.
package procs

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/chtest"
	"github.com/sluicehq/sluice/services/kit/service"
	"github.com/sluicehq/sluice/test/oracle"
)

// services are the split stages, each hop a stream.
var services = []string{"dedup", "enrich", "alert", "notify", "sink"}

// pipelineServices run the platform with the pipeline stage: the sink fills only
// dead_letters and alerts (pipelineEnv).
var pipelineServices = []string{"pipeline", "notify", "sink"}

// pipelineEnv is the environment the pipelineServices add to the common one.
var pipelineEnv = map[string][]string{"sink": {"SINK_TABLES=dead_letters,alerts"}}

func build(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, s := range append(slices.Clone(services), "pipeline") {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, s), "github.com/sluicehq/sluice/services/"+s+"/cmd/"+s)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", s, err, out)
		}
	}
	return dir
}

var metricsAddr = regexp.MustCompile(`msg="serving /metrics, /healthz, /readyz[^"]*".* addr=(127\.0\.0\.1:[0-9]+)`)

// syncWriter lets a process write its output while the test reads it.
type syncWriter struct {
	b  *strings.Builder
	mu *sync.Mutex
}

func (w syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// TestServicesAsProcesses starts the five service binaries with configuration from
// the environment only, publishes events, checks ClickHouse and each /readyz, then
// sends SIGTERM and expects each to drain and exit 0.
func TestServicesAsProcesses(t *testing.T) {
	bin := build(t)
	ns := runNATS(t)
	srv := chtest.Start(t)
	chs, conn := chtest.Database(t, srv)
	nc, _ := ns.connect(t)
	if err := service.ApplyTopology(context.Background(), nc, 1); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(t.TempDir(), "sluice.yaml")
	if err := os.WriteFile(cfg, []byte("rules:\n  - name: any\n    filter: type == \"never\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	type proc struct {
		name    string
		cmd     *exec.Cmd
		metrics string
		mu      sync.Mutex
		out     *strings.Builder
		done    chan error
	}
	var procs []*proc
	for _, s := range services {
		p := &proc{name: s, out: &strings.Builder{}, done: make(chan error, 1)}
		p.cmd = exec.Command(filepath.Join(bin, s))
		// Port 0: the service picks a free port and logs it.
		// The test applies the topology once: five processes updating the same streams
		// at once trip a data race inside nats-server (fileStore.UpdateConfig against
		// ConsumerStore) that -race reports in this process, where the server runs.
		p.cmd.Env = append(cleanEnv(), "SLUICE_APPLY_TOPOLOGY=false",
			"NATS_URL="+ns.url(), "METRICS_ADDR=127.0.0.1:0", "LOG_LEVEL=info",
			"CLICKHOUSE_ADDR="+chs.Addr, "CLICKHOUSE_DATABASE="+chs.Database,
			"SLUICE_CONFIG="+cfg, "SLUICE_DATA_DIR="+t.TempDir(),
		)
		p.cmd.Stdout, p.cmd.Stderr = syncWriter{p.out, &p.mu}, syncWriter{p.out, &p.mu}
		if err := p.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { p.done <- p.cmd.Wait() }()
		t.Cleanup(func() { _ = p.cmd.Process.Kill() })
		procs = append(procs, p)
	}
	ctx := context.Background()
	for _, p := range procs {
		err := oracle.WaitFor(ctx, time.Minute, func() error {
			select {
			case err := <-p.done:
				return fmt.Errorf("exited: %v\n%s", err, p.out)
			default:
			}
			if p.metrics == "" {
				p.mu.Lock()
				m := metricsAddr.FindStringSubmatch(p.out.String())
				p.mu.Unlock()
				if m == nil {
					return fmt.Errorf("no metrics address logged yet")
				}
				p.metrics = m[1]
			}
			return httpOK("http://" + p.metrics + "/readyz")
		})
		if err != nil {
			t.Fatalf("%s: %v", p.name, err)
		}
	}
	m := oracle.NewManifest(oracle.Spec{Total: 1000, RepeatRatio: 0.05, InvalidRate: 0.01, Seed: 7})
	if err := m.PublishAll(nc, 100); err != nil {
		t.Fatal(err)
	}
	err := oracle.WaitFor(ctx, time.Minute, func() error {
		c, err := oracle.ReadCounts(ctx, conn)
		if err != nil {
			return err
		}
		if c.Events < uint64(len(m.Events)) || c.DeadLetters < uint64(len(m.Invalid)) {
			return fmt.Errorf("%+v", c)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Check(ctx, conn); err != nil {
		t.Fatal(err)
	}
	for _, p := range procs {
		if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range procs {
		select {
		case err := <-p.done:
			if err != nil {
				t.Errorf("%s exited with %v after SIGTERM:\n%s", p.name, err, p.out)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("%s did not exit within 30s of SIGTERM", p.name)
		}
	}
}

// process is a service binary running as a process, its output in a log file.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  string
}

// startProcess runs bin/name with env added to the clean environment, its output in
// a log file of its own in dir; it is killed when t ends.
func startProcess(t *testing.T, bin, dir, name string, env []string) *process {
	t.Helper()
	return startCommand(t, dir, name, env, filepath.Join(bin, name))
}

// startProcessIn is startProcess in network namespace netns (ip netns exec runs the
// program in place: the process is the program's).
func startProcessIn(t *testing.T, netns, bin, dir, name string, env []string) *process {
	t.Helper()
	return startCommand(t, dir, name, env, "ip", "netns", "exec", netns, filepath.Join(bin, name))
}

func startCommand(t *testing.T, dir, name string, env []string, argv ...string) *process {
	t.Helper()
	c := exec.Command(argv[0], argv[1:]...)
	c.Env = append(cleanEnv(), env...)
	if !slices.ContainsFunc(env, func(v string) bool { return strings.HasPrefix(v, "SLUICE_DATA_DIR=") }) {
		// A data directory of its own, not ./data under test/procs (in the source
		// tree, and shared by every process that does not name one).
		c.Env = append(c.Env, "SLUICE_DATA_DIR="+t.TempDir())
	}
	logPath := filepath.Join(dir, fmt.Sprintf("%s-%d.log", name, time.Now().UnixNano()))
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	c.Stdout, c.Stderr = logFile, logFile
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	logFile.Close()
	p := &process{cmd: c, done: make(chan struct{}), log: logPath}
	go func() { _ = c.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = c.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("%s (%s) ended with:\n%s", name, filepath.Base(logPath), p.tail())
		}
	})
	return p
}

// tail is the end of the process's output, for a failure message.
func (p *process) tail() string {
	out, _ := os.ReadFile(p.log)
	return string(out[max(0, len(out)-3000):])
}
