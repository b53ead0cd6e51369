//go:build race

package enrich

// raceEnabled: the race detector slows the regex-heavy corpus test about 25 times.
const raceEnabled = true
