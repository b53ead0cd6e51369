// Package compose runs compose.yaml, as users run it, with images built on this
// machine without a registry (test/compose/compose.override.yaml), and checks the
// stack from outside through its published ports.
package compose

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/services/kit/poll"
)

// repoRoot is the repository, two levels up from this package.
var repoRoot, _ = filepath.Abs(filepath.Join("..", ".."))

func TestMain(m *testing.M) {
	if err := checkDocker(); err != nil {
		fmt.Fprintln(os.Stderr, "compose suite:", err)
		os.Exit(1)
	}
	if err := buildImages(); err != nil {
		fmt.Fprintln(os.Stderr, "compose suite: build the images:", err)
		os.Exit(1)
	}
	os.Exit(m.Run())
}

// checkDocker fails with an install hint when the engine or the compose plugin is
// missing.
func checkDocker() error {
	if out, err := exec.Command("docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		return fmt.Errorf("no Docker engine answers (%v: %s): run `make docker` (installs Debian's docker.io and starts dockerd) or set DOCKER_HOST", err, bytes.TrimSpace(out))
	}
	if out, err := exec.Command("docker", "compose", "version").CombinedOutput(); err != nil {
		return fmt.Errorf("the docker compose plugin is missing (%v: %s): run `make docker` (builds it from the Go module proxy)", err, bytes.TrimSpace(out))
	}
	return nil
}

// run runs a command, returning its combined output; the error holds the output.
func run(ctx context.Context, env []string, name string, args ...string) (string, error) {
	c := exec.CommandContext(ctx, name, args...)
	c.Env = append(os.Environ(), env...)
	out, err := c.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// stack is one compose project: compose.yaml with the suite's override, its own
// name (so its containers, network and volumes are its own) and config directory.
type stack struct {
	t       *testing.T
	project string
	// ConfigDir is mounted at /etc/sluice-test in the pipeline and notify containers.
	ConfigDir string
	// CertsDir is SLUICE_CERTS_DIR: the certs step writes the CA and NATS's
	// certificate there.
	CertsDir string
	// Passwords are the stack's secrets, by variable (as deploy/secrets.sh writes
	// them to .env): made for this run.
	Passwords map[string]string
	// env is what compose.yaml and the override read (the published ports, the
	// passwords).
	env []string
	// files are the compose files, after compose.yaml.
	files []string
	// urls are the NATS client addresses connect uses (empty: the nats service's).
	urls []string
}

// secrets are the variables deploy/secrets.sh sets.
var secrets = []string{"CLICKHOUSE_PASSWORD", "NATS_ADMIN_PASSWORD", "NATS_PRODUCER_PASSWORD",
	"NATS_PIPELINE_PASSWORD", "NATS_NOTIFY_PASSWORD", "NATS_SINK_PASSWORD"}

// newStack is compose.yaml with the suite's override, then files (relative to the
// repository).
func newStack(t *testing.T, name string, files ...string) *stack {
	t.Helper()
	s := &stack{t: t, project: "sluice-test-" + name, ConfigDir: t.TempDir(), CertsDir: t.TempDir(), Passwords: map[string]string{},
		files: append([]string{"test/compose/compose.override.yaml"}, files...)}
	for _, dir := range []string{s.ConfigDir, s.CertsDir} {
		if err := os.Chmod(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s.env = append(s.env, "SLUICE_CERTS_DIR="+s.CertsDir)
	for _, name := range secrets {
		s.Passwords[name] = randomSecret(t)
		s.env = append(s.env, name+"="+s.Passwords[name])
	}
	// A run killed before its cleanup leaves its containers and volumes: the
	// project starts from nothing (old streams and notify state would skew it).
	if _, err := s.compose("down", "--volumes", "--remove-orphans", "--timeout", "5"); err != nil {
		t.Fatalf("clear what an earlier run left: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := s.compose("logs", "--no-color", "--timestamps")
			path := filepath.Join(os.TempDir(), s.project+".log")
			_ = os.WriteFile(path, []byte(out), 0o644)
			lines := strings.Split(out, "\n")
			t.Logf("docker compose logs (all in %s), the last 80 lines:\n%s", path, strings.Join(lines[max(0, len(lines)-80):], "\n"))
		}
		if _, err := s.compose("down", "--volumes", "--remove-orphans", "--timeout", "5"); err != nil {
			t.Logf("down: %v", err)
		}
	})
	return s
}

// compose runs docker compose on the project.
func (s *stack) compose(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	base := []string{"compose", "--project-name", s.project, "--project-directory", repoRoot, "-f", filepath.Join(repoRoot, "compose.yaml")}
	for _, f := range s.files {
		base = append(base, "-f", filepath.Join(repoRoot, f))
	}
	env := append([]string{"SLUICE_TEST_CONFIG_DIR=" + s.ConfigDir, "SLUICE_TEST_CLICKHOUSE_IMAGE=" + clickhouseImage}, s.env...)
	return run(ctx, env, "docker", append(base, args...)...)
}

// connect connects to the stack's NATS as user (admin, producer, pipeline, notify or
// sink) over TLS, verifying the server with the certs step's CA.
func (s *stack) connect(user string, opts ...nats.Option) (*nats.Conn, error) {
	s.t.Helper()
	opts = append([]nats.Option{nats.RootCAs(filepath.Join(s.CertsDir, "ca.pem")),
		nats.UserInfo(user, s.Passwords["NATS_"+strings.ToUpper(user)+"_PASSWORD"])}, opts...)
	urls := s.urls
	if len(urls) == 0 {
		urls = []string{s.addr("nats", 4222)}
	}
	return nats.Connect("tls://"+strings.Join(urls, ",tls://"), opts...)
}

// noViolations fails the test when a NATS node of the stack logged a permissions
// violation: the services must run within their users' permissions.
func (s *stack) noViolations(nodes ...string) {
	s.t.Helper()
	for _, line := range strings.Split(s.must(append([]string{"logs", "--no-color"}, nodes...)...), "\n") {
		if strings.Contains(line, "Violation") {
			s.t.Fatalf("NATS refused a service something its user may not do (deploy/nats/auth.conf): %s", line)
		}
	}
}

// docker runs a docker command (not compose), failing the test on an error.
func (s *stack) docker(args ...string) string {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := run(ctx, nil, "docker", args...)
	if err != nil {
		s.t.Fatal(err)
	}
	return out
}

// must runs docker compose and fails the test on an error.
func (s *stack) must(args ...string) string {
	s.t.Helper()
	out, err := s.compose(args...)
	if err != nil {
		s.t.Fatal(err)
	}
	return out
}

// writeConfig writes the SLUICE_CONFIG the pipeline and notify containers read.
func (s *stack) writeConfig(cfg string) {
	s.t.Helper()
	if err := os.WriteFile(filepath.Join(s.ConfigDir, "sluice.yaml"), []byte(cfg), 0o644); err != nil {
		s.t.Fatal(err)
	}
}

// up starts services (all without any) and waits until they are running and
// healthy.
func (s *stack) up(services ...string) {
	s.t.Helper()
	s.must(append([]string{"up", "--detach", "--wait", "--wait-timeout", "180"}, services...)...)
}

// addr is the host address a service's container port is published on.
func (s *stack) addr(service string, port int) string {
	s.t.Helper()
	var out string
	poll.Until(s.t, time.Minute, func() error {
		var err error
		out, err = s.compose("port", service, fmt.Sprint(port))
		if err == nil && strings.TrimSpace(out) == "" {
			err = fmt.Errorf("%s:%d is not published yet", service, port)
		}
		return err
	})
	return strings.TrimSpace(out)
}

// container is the id of a service's container.
func (s *stack) container(service string) string {
	s.t.Helper()
	return strings.TrimSpace(s.must("ps", "--all", "--quiet", service))
}

// inspect reads a Go template of docker inspect on a service's container.
func (s *stack) inspect(service, format string) string {
	s.t.Helper()
	out, err := run(context.Background(), nil, "docker", "inspect", "--format", format, s.container(service))
	if err != nil {
		s.t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// kill sends SIGKILL to a service's container (docker kill).
func (s *stack) kill(service string) {
	s.t.Helper()
	s.must("kill", "--signal", "SIGKILL", service)
}

// saveLogs writes the project's logs so far to a file named after it and what, and
// logs where: containers removed by down take their logs with them.
func (s *stack) saveLogs(what string) {
	out, _ := s.compose("logs", "--no-color", "--timestamps")
	path := filepath.Join(os.TempDir(), s.project+"-"+what+".log")
	if err := os.WriteFile(path, []byte(out), 0o644); err == nil {
		s.t.Logf("docker compose logs %s: %s", what, path)
	}
}
