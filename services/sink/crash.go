package sink

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Crash points for fault injection: where the sink may kill itself with SIGKILL.
const (
	CrashBeforeInsert = "before-insert" // the batch is pulled and checked, nothing inserted
	CrashDuringInsert = "during-insert" // a few milliseconds into the insert
	CrashAfterInsert  = "after-insert"  // the insert returned, no ack sent
	// CrashDuringTypedInsert: a few milliseconds into the insert into a typed table
	// (the pipeline inserts its events rows first).
	CrashDuringTypedInsert = "during-typed-insert"
)

// Crash is fault injection for the crash tests: at Point, with Probability, the
// process kills itself with SIGKILL, as `kill -9` would. The zero value never
// crashes; production leaves it so.
type Crash struct {
	Point       string
	Probability float64
}

// ParseCrash reads "<point>:<probability>", for example "after-insert:0.3".
func ParseCrash(s string) (Crash, error) {
	point, prob, ok := strings.Cut(s, ":")
	p, err := strconv.ParseFloat(prob, 64)
	switch {
	case !ok || err != nil || p < 0 || p > 1:
		return Crash{}, fmt.Errorf("crash %q: want <point>:<probability from 0 to 1>", s)
	case point != CrashBeforeInsert && point != CrashDuringInsert && point != CrashAfterInsert && point != CrashDuringTypedInsert:
		return Crash{}, fmt.Errorf("crash %q: point must be %s, %s, %s or %s", s, CrashBeforeInsert, CrashDuringInsert, CrashAfterInsert, CrashDuringTypedInsert)
	}
	return Crash{Point: point, Probability: p}, nil
}

// At kills the process if c says so at point. For CrashDuringInsert and
// CrashDuringTypedInsert it arms a timer and returns; the insert runs on until the
// kill lands.
func (c Crash) At(point string) {
	if c.Point != point || c.Probability == 0 || rand.Float64() >= c.Probability {
		return
	}
	kill := func() { _ = syscall.Kill(os.Getpid(), syscall.SIGKILL) }
	if point == CrashDuringInsert || point == CrashDuringTypedInsert {
		time.AfterFunc(time.Duration(1+rand.IntN(20))*time.Millisecond, kill)
		return
	}
	kill()
	select {} // the signal ends the process
}
