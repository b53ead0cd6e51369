// Package crash is fault injection for the crash tests: a process kills itself
// with SIGKILL at a named point of its work.
package crash

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Points where a process may kill itself with SIGKILL.
const (
	BeforeInsert = "before-insert" // the batch is pulled and checked, nothing inserted
	DuringInsert = "during-insert" // a few milliseconds into the insert
	AfterInsert  = "after-insert"  // the insert returned, no ack sent
	// DuringTypedInsert: a few milliseconds into the insert into a typed table
	// (the pipeline inserts its events rows first).
	DuringTypedInsert = "during-typed-insert"
)

// Injection is fault injection for the crash tests: at Point, with Probability, the
// process kills itself with SIGKILL, as `kill -9` would. The zero value never
// crashes; production leaves it so.
type Injection struct {
	Point       string
	Probability float64
}

// Parse reads "<point>:<probability>", for example "after-insert:0.3".
func Parse(s string) (Injection, error) {
	point, prob, ok := strings.Cut(s, ":")
	p, err := strconv.ParseFloat(prob, 64)
	switch {
	case !ok || err != nil || p < 0 || p > 1:
		return Injection{}, fmt.Errorf("crash %q: want <point>:<probability from 0 to 1>", s)
	case point != BeforeInsert && point != DuringInsert && point != AfterInsert && point != DuringTypedInsert:
		return Injection{}, fmt.Errorf("crash %q: point must be %s, %s, %s or %s", s, BeforeInsert, DuringInsert, AfterInsert, DuringTypedInsert)
	}
	return Injection{Point: point, Probability: p}, nil
}

// At kills the process if c says so at point. For DuringInsert and
// DuringTypedInsert it arms a timer and returns; the insert runs on until the
// kill lands.
func (c Injection) At(point string) {
	if c.Point != point || c.Probability == 0 || rand.Float64() >= c.Probability {
		return
	}
	kill := func() { _ = syscall.Kill(os.Getpid(), syscall.SIGKILL) }
	if point == DuringInsert || point == DuringTypedInsert {
		time.AfterFunc(time.Duration(1+rand.IntN(20))*time.Millisecond, kill)
		return
	}
	kill()
	select {} // the signal ends the process
}
