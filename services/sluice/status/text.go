package status

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"
	"unicode/utf8"
)

// Text writes the report for people: one screen, problems first.
func (r *Report) Text(w io.Writer) error {
	var b strings.Builder
	verdict := "healthy"
	if !r.Healthy {
		verdict = fmt.Sprintf("UNHEALTHY (%d)", len(r.Problems))
	}
	fmt.Fprintf(&b, "sluice status  %s  %s\n", r.At.Format("2006-01-02 15:04:05 MST"), verdict)
	for _, p := range r.Problems {
		fmt.Fprintf(&b, "  ! %s\n", p)
	}
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	if len(r.Partitions) > 0 {
		fmt.Fprintln(tw, "\nPARTITION\tWORKER\tINPUT/S\tBEHIND\tLAG\tLAST STORED\tSTATE SAVED")
		for _, p := range r.Partitions {
			worker := p.Worker
			if worker == "" {
				worker = "(none)"
			}
			stored := ago(r.At, p.StoredAt)
			if p.Stalled != "" {
				stored += " STALLED"
			}
			fmt.Fprintf(tw, "%d\t%s\t%.1f\t%d\t%s\t%s\t%s\n", p.Partition, worker, p.Rate, p.Pending, lag(p.LagSeconds), stored, ago(r.At, p.SavedAt))
		}
	}
	var used, unused []Consumer
	for _, c := range r.Consumers {
		if c.Unused {
			unused = append(unused, c)
		} else {
			used = append(used, c)
		}
	}
	if len(used) > 0 {
		fmt.Fprintln(tw, "\nSTREAM\tCONSUMER\tINPUT/S\tBEHIND\tACK PENDING\tLAG\tLAST DELIVERED")
		for _, c := range used {
			rate := "-"
			if c.Rate != nil {
				rate = fmt.Sprintf("%.1f", *c.Rate)
			}
			delivered := ago(r.At, c.LastActive)
			if c.Stalled {
				delivered += " STALLED"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\n", c.Stream, c.Name, rate, c.Pending, c.AckPending, lag(c.LagSeconds), delivered)
		}
	}
	tw.Flush()
	if len(unused) > 0 {
		names := make([]string, len(unused))
		for i, c := range unused {
			names[i] = c.Stream + "/" + c.Name
		}
		fmt.Fprintf(&b, "(never read, not judged: %s)\n", strings.Join(names, ", "))
	}
	ch := "unreachable: " + r.ClickHouse.Error
	if r.ClickHouse.Reachable {
		var parts []string
		for _, t := range []string{"events", "dead_letters", "alerts"} {
			parts = append(parts, t+" "+ago(r.At, r.ClickHouse.LastInsert[t]))
		}
		ch = "reachable; last insert: " + strings.Join(parts, ", ")
		if len(r.ClickHouse.Held) > 0 {
			months := make([]string, len(r.ClickHouse.Held))
			for i, m := range r.ClickHouse.Held {
				months[i] = fmt.Sprint(m)
			}
			ch += "; held by sluice replay (the pipeline's inserts of these months wait): " + strings.Join(months, ", ")
		}
		if r.ClickHouse.PartsError != "" {
			ch += "; parts not judged (system.parts not read: " + OneLine(r.ClickHouse.PartsError, 100) + ")"
		}
	}
	fmt.Fprintf(&b, "\nClickHouse %s: %s\n", r.ClickHouse.Addr, ch)
	// Dead letters and firing alerts are read from ClickHouse: none read is not none
	// there.
	dead, firing := "unknown (ClickHouse not read)", "unknown (ClickHouse not read)"
	if r.ClickHouse.Reachable {
		dead, firing = fmt.Sprint(r.DeadLettersHour), "none"
	}
	fmt.Fprintf(&b, "\nDead letters in the last hour: %s\n", dead)
	tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	for _, d := range r.DeadLetters {
		fmt.Fprintf(tw, "  %d\t%s\t%s\n", d.Count, d.Stage, OneLine(d.Reason, 100))
	}
	tw.Flush()
	if len(r.Firing) > 0 {
		var parts []string
		for _, f := range r.Firing {
			parts = append(parts, fmt.Sprintf("%s %d", f.Rule, f.Count))
		}
		firing = strings.Join(parts, ", ")
	}
	fmt.Fprintf(&b, "\nAlerts firing: %s\n", firing)
	if len(r.Receivers) > 0 {
		tw = tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "\nRECEIVER\tSTATE\tPENDING\tSINCE\tLAST ERROR")
		for _, rc := range r.Receivers {
			last := rc.LastError
			if rc.Disabled != "" {
				last = rc.Disabled
			}
			since := ""
			if !rc.Since.IsZero() {
				since = ago(r.At, rc.Since)
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", rc.Name, rc.State, rc.Pending, since, OneLine(last, 80))
		}
		tw.Flush()
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func lag(s float64) string {
	if s == 0 {
		return "-"
	}
	return seconds(s).Round(100 * time.Millisecond).String()
}

func ago(now, t time.Time) string {
	if t.IsZero() || t.Unix() <= 0 {
		return "never"
	}
	return now.Sub(t).Round(time.Second).String() + " ago"
}

// OneLine makes s one line of at most n bytes for a table cell, cut at a
// character's start and marked with "…" where it was cut.
func OneLine(s string, n int) string {
	s = Printable(strings.Join(strings.Fields(s), " "))
	if len(s) <= n {
		return s
	}
	cut := n - len("…")
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:max(cut, 0)] + "…"
}

// Printable returns s with its control characters and the bytes that are not UTF-8
// written as Go escapes (\x1b, \n), so that text a producer sent cannot drive the
// terminal it is shown on (colours, the title, the screen cleared).
func Printable(s string) string {
	if !strings.ContainsFunc(s, func(r rune) bool { return r == utf8.RuneError || unicode.IsControl(r) }) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case unicode.IsControl(r):
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

// PrintableLines is Printable for each line of s, the line breaks kept.
func PrintableLines(s string) string {
	lines := strings.Split(s, "\n")
	for i := range lines {
		lines[i] = Printable(lines[i])
	}
	return strings.Join(lines, "\n")
}
