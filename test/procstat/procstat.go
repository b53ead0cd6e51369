// Package procstat reads a running process's CPU time, page faults and peak memory
// from /proc.
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
	if f := stat(pid); len(f) > 12 {
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		cpuSeconds = (ut + st) / 100 // clock ticks (USER_HZ)
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

// MinorFaults returns how many minor page faults the process pid has taken (each the
// kernel giving it a page of memory it had not touched before), zero where /proc does
// not tell.
func MinorFaults(pid int) int64 {
	f := stat(pid)
	if len(f) <= 7 {
		return 0
	}
	n, _ := strconv.ParseInt(f[7], 10, 64)
	return n
}

// stat returns the fields of /proc/<pid>/stat after the command's name (the third
// field, the state, first), nil where it cannot be read.
func stat(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return nil
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) {
		return nil
	}
	return strings.Fields(s[i+2:])
}
