// Package chserver runs a local clickhouse-server with its data under a directory,
// for `sluice up` on a laptop and for tests.
package chserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrNotInstalled means no ClickHouse server binary is on PATH.
var ErrNotInstalled = errors.New("clickhouse-server is not installed: install it with `sudo apt-get install -y clickhouse-server clickhouse-client` (Debian/Ubuntu), or run `docker compose up -d clickhouse`, and point CLICKHOUSE_ADDR at it")

// Server is a running clickhouse-server process.
type Server struct {
	// Addr is the native-protocol address, 127.0.0.1:<port>.
	Addr string
	Dir  string
	cmd  *exec.Cmd
	done chan struct{}
	err  error
	// logFrom is the size of each log file before this start (a restart appends).
	logFrom map[string]int64
}

// Signal sends sig to the server process: SIGSTOP makes a server that takes
// connections and never answers (a test's hung server), SIGCONT resumes it.
func (s *Server) Signal(sig os.Signal) error {
	return s.cmd.Process.Signal(sig)
}

// Binary returns the command that runs a server: clickhouse-server (Debian's
// package), or `clickhouse server` (the single binary of current releases).
func Binary() ([]string, error) {
	if p, err := exec.LookPath("clickhouse-server"); err == nil {
		return []string{p}, nil
	}
	if p, err := exec.LookPath("clickhouse"); err == nil {
		return []string{p, "server"}, nil
	}
	return nil, ErrNotInstalled
}

// Start runs a server storing under dir, listening on 127.0.0.1:port (0 picks a
// free port), and waits until it answers. The process is stopped by Stop, or when
// ctx is cancelled.
func Start(ctx context.Context, dir string, port int) (*Server, error) {
	return StartWith(ctx, dir, port, "")
}

// StartWith is Start with extra server configuration: XML elements added inside
// the config's root (a cluster's zookeeper, remote_servers, macros,
// interserver_http_port).
func StartWith(ctx context.Context, dir string, port int, extra string) (*Server, error) {
	if port != 0 {
		// The port is given (a cluster's nodes name each other's): when another
		// process holds it (the local port of an outgoing connection is drawn from
		// the range free ports come from), the start is tried again once it is free.
		var err error
		for range 5 {
			var s *Server
			if s, err = start(ctx, dir, port, extra); !errors.Is(err, errAddrInUse) {
				return s, err
			}
			if werr := waitBindable(ctx, port, time.Minute); werr != nil {
				return nil, errors.Join(err, werr)
			}
		}
		return nil, err
	}
	// A free port can be taken by another process before the server binds it; try
	// a few.
	var err error
	for range 3 {
		var p int
		if p, err = freePort(); err != nil {
			return nil, err
		}
		var s *Server
		if s, err = start(ctx, dir, p, extra); err == nil {
			return s, nil
		}
		if errors.Is(err, ErrNotInstalled) || ctx.Err() != nil {
			return nil, err
		}
	}
	return nil, err
}

func start(ctx context.Context, dir string, port int, extra string) (*Server, error) {
	bin, err := Binary()
	if err != nil {
		return nil, err
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	for _, sub := range []string{"data", "tmp", "user_files", "format_schemas", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, sub), 0o755); err != nil {
			return nil, fmt.Errorf("clickhouse data dir: %w", err)
		}
	}
	cfgPath := filepath.Join(dir, "config.xml")
	if err := os.WriteFile(cfgPath, []byte(configXML(dir, port, extra)), 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "users.xml"), []byte(usersXML), 0o644); err != nil {
		return nil, err
	}
	logFrom := logSizes(dir)
	logFile, err := os.OpenFile(filepath.Join(dir, "log", "stdout.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	args := append(bin[1:], "--config-file="+cfgPath)
	cmd := exec.Command(bin[0], args...)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", strings.Join(bin, " "), err)
	}
	s := &Server{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), Dir: dir, cmd: cmd, done: make(chan struct{}), logFrom: logFrom}
	go func() {
		s.err = cmd.Wait()
		logFile.Close()
		close(s.done)
	}()
	if err := s.waitReady(ctx, 60*time.Second); err != nil {
		_ = s.Stop()
		return nil, err
	}
	return s, nil
}

func (s *Server) waitReady(ctx context.Context, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			err := fmt.Errorf("clickhouse-server exited during start-up (%v); see %s", s.err, filepath.Join(s.Dir, "log"))
			tail := s.logTail()
			if strings.Contains(tail, "Address already in use") {
				err = fmt.Errorf("%w: %w", err, errAddrInUse)
			}
			if tail != "" {
				err = fmt.Errorf("%w; its log ends:\n%s", err, tail)
			}
			return err
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if Answers(s.Addr) {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("clickhouse-server did not answer on %s within %s; see %s", s.Addr, limit, filepath.Join(s.Dir, "log"))
}

// errAddrInUse: the server exited at start-up because a port it listens on was
// taken.
var errAddrInUse = errors.New("a port it listens on is taken")

// logFiles are the files a server logs to, in its dir's log directory: the
// errors, and its output.
var logFiles = []string{"error.log", "stdout.log"}

// logSizes is the size of each log file under dir (absent: 0).
func logSizes(dir string) map[string]int64 {
	sizes := map[string]int64{}
	for _, name := range logFiles {
		if fi, err := os.Stat(filepath.Join(dir, "log", name)); err == nil {
			sizes[name] = fi.Size()
		}
	}
	return sizes
}

// logTail is the end of what this start wrote to the server's error log (to its
// output when nothing): why a server that exited at start-up did.
func (s *Server) logTail() string {
	for _, name := range logFiles {
		b, err := os.ReadFile(filepath.Join(s.Dir, "log", name))
		if from := s.logFrom[name]; err == nil && from <= int64(len(b)) {
			b = b[from:]
		}
		if err != nil || len(b) == 0 {
			continue
		}
		if len(b) > 2000 {
			b = b[len(b)-2000:]
		}
		return strings.TrimSpace(string(b))
	}
	return ""
}

// waitBindable waits until port can be listened on at 127.0.0.1.
func waitBindable(ctx context.Context, port int, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err == nil {
			return l.Close()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("port %d still taken after %s: %w", port, limit, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Answers reports whether something accepts TCP connections at addr.
func Answers(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 300*time.Millisecond)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// Kill stops the server at once (SIGKILL), as a crash would.
func (s *Server) Kill() error {
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.done
	return nil
}

// Stop stops the server (SIGTERM, then SIGKILL after 20 s) and waits for it.
func (s *Server) Stop() error {
	select {
	case <-s.done:
		return nil
	default:
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(20 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	}
	return nil
}

// Done is closed when the process has exited.
func (s *Server) Done() <-chan struct{} { return s.done }

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func configXML(dir string, port int, extra string) string {
	return fmt.Sprintf(`<?xml version="1.0"?>
<!-- written by sluice; a local server for development and tests -->
<yandex>
  <logger><level>warning</level><log>%[1]s/log/server.log</log><errorlog>%[1]s/log/error.log</errorlog><size>20M</size><count>2</count></logger>
  <listen_host>127.0.0.1</listen_host>
  <tcp_port>%[2]d</tcp_port>
  <path>%[1]s/data/</path>
  <tmp_path>%[1]s/tmp/</tmp_path>
  <user_files_path>%[1]s/user_files/</user_files_path>
  <format_schema_path>%[1]s/format_schemas/</format_schema_path>
  <mark_cache_size>268435456</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mlock_executable>false</mlock_executable>
  <users_config>users.xml</users_config>
%[3]s
</yandex>
`, dir, port, extra)
}

const usersXML = `<?xml version="1.0"?>
<yandex>
  <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
  </users>
  <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
`

// Pid is the server process's id (for CPU and memory accounting).
func (s *Server) Pid() int { return s.cmd.Process.Pid }
