// Package chdb runs SQL on a current ClickHouse engine in-process through chDB's
// libchdb.so (npm package @chdb/lib-linux-x64-gnu), loaded with purego. Tests use it
// to check that sluice's DDL and queries also run on current ClickHouse, where the
// machine has only an old clickhouse-server.
package chdb

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// EnvLib names the variable that points at libchdb.so.
const EnvLib = "CHDB_LIB"

// ErrNotInstalled means libchdb.so was not found.
var ErrNotInstalled = errors.New("libchdb.so not found: run `make chdb` (npm install @chdb/lib-linux-x64-gnu into .tools/chdb) or set CHDB_LIB to its path")

// Find returns the path of libchdb.so: $CHDB_LIB, or .tools/chdb/... in dir or one
// of its parents.
func Find(dir string) (string, error) {
	if p := os.Getenv(EnvLib); p != "" {
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s=%s: %w", EnvLib, p, err)
		}
		return p, nil
	}
	for d := dir; ; d = filepath.Dir(d) {
		p := filepath.Join(d, ".tools", "chdb", "node_modules", "@chdb", "lib-linux-x64-gnu", "libchdb.so")
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
		if filepath.Dir(d) == d {
			return "", ErrNotInstalled
		}
	}
}

type lib struct {
	connect       func(argc int32, argv **byte) unsafe.Pointer
	closeConn     func(conn unsafe.Pointer)
	queryN        func(conn unsafe.Pointer, q *byte, qlen uintptr, f *byte, flen uintptr) unsafe.Pointer
	destroyResult func(res unsafe.Pointer)
	buffer        func(res unsafe.Pointer) *byte
	length        func(res unsafe.Pointer) uintptr
	errorText     func(res unsafe.Pointer) *byte
}

var (
	loadOnce sync.Once
	loaded   *lib
	loadErr  error
)

// Session is one chDB connection with its data in a directory. chDB allows one
// session per process at a time.
type Session struct {
	l    *lib
	conn unsafe.Pointer // chdb_connection*
	mu   sync.Mutex
}

// Open loads the library at path (once per process) and opens a session storing in dir.
func Open(path, dir string) (*Session, error) {
	loadOnce.Do(func() { loaded, loadErr = load(path) })
	if loadErr != nil {
		return nil, loadErr
	}
	args := []string{"clickhouse", "--path=" + dir}
	cargs := make([]*byte, len(args))
	keep := make([][]byte, len(args))
	for i, a := range args {
		keep[i] = append([]byte(a), 0)
		cargs[i] = &keep[i][0]
	}
	conn := loaded.connect(int32(len(args)), &cargs[0])
	runtime.KeepAlive(keep)
	if conn == nil {
		return nil, errors.New("chdb_connect failed")
	}
	return &Session{l: loaded, conn: conn}, nil
}

func load(path string) (*lib, error) {
	h, err := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	l := &lib{}
	purego.RegisterLibFunc(&l.connect, h, "chdb_connect")
	purego.RegisterLibFunc(&l.closeConn, h, "chdb_close_conn")
	purego.RegisterLibFunc(&l.queryN, h, "chdb_query_n")
	purego.RegisterLibFunc(&l.destroyResult, h, "chdb_destroy_query_result")
	purego.RegisterLibFunc(&l.buffer, h, "chdb_result_buffer")
	purego.RegisterLibFunc(&l.length, h, "chdb_result_length")
	purego.RegisterLibFunc(&l.errorText, h, "chdb_result_error")
	return l, nil
}

// Query runs q and returns its output in format (for example TSV or JSONEachRow).
func (s *Session) Query(q, format string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	qb := append([]byte(q), 0)
	fb := append([]byte(format), 0)
	conn := *(*unsafe.Pointer)(s.conn) // chdb_connect returns chdb_connection*, a pointer to the handle
	res := s.l.queryN(conn, &qb[0], uintptr(len(q)), &fb[0], uintptr(len(format)))
	runtime.KeepAlive(qb)
	runtime.KeepAlive(fb)
	if res == nil {
		return "", errors.New("chdb: query returned no result")
	}
	defer s.l.destroyResult(res)
	if e := s.l.errorText(res); e != nil {
		return "", fmt.Errorf("chdb: %s", cString(e))
	}
	n := s.l.length(res)
	if n == 0 {
		return "", nil
	}
	// The buffer belongs to the result; string() copies it before the destroy.
	return string(unsafe.Slice(s.l.buffer(res), n)), nil
}

// Close closes the session.
func (s *Session) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != nil {
		s.l.closeConn(s.conn)
		s.conn = nil
	}
}

func cString(p *byte) string {
	n := 0
	for *(*byte)(unsafe.Add(unsafe.Pointer(p), n)) != 0 {
		n++
	}
	return string(unsafe.Slice(p, n))
}
