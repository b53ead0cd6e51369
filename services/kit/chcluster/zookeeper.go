package chcluster

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

// ErrNoZooKeeper means Debian's zookeeper package (or java) is missing.
var ErrNoZooKeeper = errors.New("ZooKeeper is not installed: install it with `sudo apt-get install -y --no-install-recommends zookeeper` (Debian's package, with java)")

// zkJars are the jars of Debian's zookeeper package a standalone server needs.
var zkJars = []string{"zookeeper.jar", "zookeeper-jute.jar", "slf4j-api.jar", "slf4j-simple.jar", "netty-handler.jar", "netty-transport.jar", "netty-common.jar", "netty-buffer.jar", "netty-codec.jar", "netty-resolver.jar", "netty-transport-native-epoll.jar", "netty-transport-native-unix-common.jar", "commons-io.jar"}

// ZooKeeper is a standalone ZooKeeper server process.
type ZooKeeper struct {
	// Addr is its client address, 127.0.0.1:<port>.
	Addr string
	dir  string
	port int
	cmd  *exec.Cmd
	done chan struct{}
}

// StartZooKeeper runs a standalone ZooKeeper storing under dir on 127.0.0.1:port
// and waits until it answers.
func StartZooKeeper(ctx context.Context, dir string, port int) (*ZooKeeper, error) {
	java, err := exec.LookPath("java")
	if err != nil {
		return nil, ErrNoZooKeeper
	}
	var cp []string
	for _, jar := range zkJars {
		p := filepath.Join("/usr/share/java", jar)
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("%w (%s is missing)", ErrNoZooKeeper, p)
		}
		cp = append(cp, p)
	}
	if err := os.MkdirAll(filepath.Join(dir, "data"), 0o755); err != nil {
		return nil, err
	}
	logFile, err := os.OpenFile(filepath.Join(dir, "zookeeper.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	// ZooKeeperServerMain <port> <dataDir> <tickTime ms>: a short tick makes
	// ClickHouse's sessions expire within seconds of a stop, not half a minute.
	cmd := exec.Command(java, "-Xmx256m", "-cp", strings.Join(cp, ":"),
		"org.apache.zookeeper.server.ZooKeeperServerMain", strconv.Itoa(port), filepath.Join(dir, "data"), "500")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start zookeeper: %w", err)
	}
	z := &ZooKeeper{Addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), dir: dir, port: port, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		logFile.Close()
		close(z.done)
	}()
	deadline := time.Now().Add(time.Minute)
	for !z.answers() {
		select {
		case <-z.done:
			return nil, fmt.Errorf("zookeeper exited during start-up; see %s", filepath.Join(dir, "zookeeper.log"))
		case <-ctx.Done():
			z.Stop()
			return nil, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			z.Stop()
			return nil, fmt.Errorf("zookeeper did not answer on %s within a minute; see %s", z.Addr, filepath.Join(dir, "zookeeper.log"))
		}
	}
	return z, nil
}

// answers asks the server "srvr" (a four-letter command ZooKeeper allows by
// default) and reports whether it says it serves.
func (z *ZooKeeper) answers() bool {
	c, err := net.DialTimeout("tcp", z.Addr, 300*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("srvr")); err != nil {
		return false
	}
	buf := make([]byte, 512)
	n, _ := c.Read(buf)
	return strings.Contains(string(buf[:n]), "Mode:")
}

// Stop stops the server (SIGTERM, then SIGKILL after 10 s) and waits for it.
func (z *ZooKeeper) Stop() {
	select {
	case <-z.done:
		return
	default:
	}
	_ = syscall.Kill(-z.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-z.done:
	case <-time.After(10 * time.Second):
		_ = syscall.Kill(-z.cmd.Process.Pid, syscall.SIGKILL)
		<-z.done
	}
}

// Restart starts a stopped server again on the same port and data.
func (z *ZooKeeper) Restart(ctx context.Context) (*ZooKeeper, error) {
	z.Stop()
	return StartZooKeeper(ctx, z.dir, z.port)
}
