// Package procstat reads a running process's CPU time and peak memory from /proc.
package procstat

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Usage returns the CPU seconds (user and system) and the peak resident set size
// (bytes) of the process pid, zero where /proc does not tell.
func Usage(pid int) (cpuSeconds float64, peakRSS int64) {
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		s := string(b)
		if i := strings.LastIndexByte(s, ')'); i > 0 && i+2 < len(s) {
			f := strings.Fields(s[i+2:])
			if len(f) > 12 {
				ut, _ := strconv.ParseFloat(f[11], 64)
				st, _ := strconv.ParseFloat(f[12], 64)
				cpuSeconds = (ut + st) / 100 // clock ticks (USER_HZ)
			}
		}
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				peakRSS = kb * 1024
			}
		}
	}
	return cpuSeconds, peakRSS
}
