package procs

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/sluicehq/sluice/services/kit/poll"
	"github.com/sluicehq/sluice/services/kit/testlog"
)

// svc is a service binary running as its own process, its output kept.
type svc struct {
	name    string
	cmd     *exec.Cmd
	done    chan struct{}
	out     testlog.Buffer
	metrics string
}

func (s *svc) output() string { return s.out.String() }

// startService runs bin/name with env; it serves /readyz on a port it picks and
// logs (METRICS_ADDR=127.0.0.1:0, LOG_LEVEL=info), and is killed when t ends.
func startService(t *testing.T, bin, name string, env []string) *svc {
	t.Helper()
	s := &svc{name: name, done: make(chan struct{})}
	s.cmd = exec.Command(filepath.Join(bin, name))
	s.cmd.Env = append(append(cleanEnv(), env...), "METRICS_ADDR=127.0.0.1:0", "LOG_LEVEL=info")
	s.cmd.Stdout, s.cmd.Stderr = &s.out, &s.out
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.cmd.Wait(); close(s.done) }()
	t.Cleanup(func() { _ = s.cmd.Process.Kill(); <-s.done })
	return s
}

// waitReady polls the service's /readyz until it answers 200.
func (s *svc) waitReady(t *testing.T) {
	t.Helper()
	poll.Until(t, time.Minute, func() error {
		select {
		case <-s.done:
			return fmt.Errorf("%s exited:\n%s", s.name, s.output())
		default:
		}
		if s.metrics == "" {
			m := metricsAddr.FindStringSubmatch(s.output())
			if m == nil {
				return fmt.Errorf("%s has not logged its metrics address yet", s.name)
			}
			s.metrics = m[1]
		}
		return httpOK("http://" + s.metrics + "/readyz")
	})
}
