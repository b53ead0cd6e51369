package alert

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	rtmetrics "runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/sluicehq/sluice/schemas/events"
)

// benchRules returns 50 rules of mixed kinds: 20 threshold, 10 rate, 10 absence
// and 10 match, each on one event type of ten, grouped by user where windowed.
func benchRules(b *testing.B) []*Rule {
	var cfgs []RuleConfig
	for i := range 20 {
		agg, value := AggCount, ""
		switch i % 4 {
		case 1:
			agg, value = AggSum, "data.amount"
		case 2:
			agg, value = AggAvg, "data.amount"
		case 3:
			agg, value = AggMax, "data.amount"
		}
		cfgs = append(cfgs, RuleConfig{Name: fmt.Sprint("threshold-", i), Kind: KindThreshold, Filter: fmt.Sprintf(`type == "t%d"`, i%10),
			GroupBy: []string{"data.user"}, Window: time.Minute, Aggregate: agg, Value: value, Op: ">", Threshold: 1e9})
	}
	for i := range 10 {
		cfgs = append(cfgs, RuleConfig{Name: fmt.Sprint("rate-", i), Kind: KindRate, Filter: fmt.Sprintf(`type == "t%d" && data.amount > 0`, i),
			GroupBy: []string{"data.user"}, Window: time.Minute, Change: "factor", Op: ">", Threshold: 100})
	}
	for i := range 10 {
		cfgs = append(cfgs, RuleConfig{Name: fmt.Sprint("absence-", i), Kind: KindAbsence, Filter: fmt.Sprintf(`type == "t%d"`, i),
			GroupBy: []string{"data.user"}, For: time.Hour})
	}
	for i := range 10 {
		cfgs = append(cfgs, RuleConfig{Name: fmt.Sprint("match-", i), Filter: fmt.Sprintf(`type == "t%d" && data.amount > 1e9`, i)})
	}
	rules, err := CompileRules(cfgs)
	if err != nil {
		b.Fatal(err)
	}
	return rules
}

// benchEvents returns n events over 10,000 users and ten types, 10 µs of event
// time apart: events arriving at 100,000/s.
func benchEvents(n int) []*events.Event {
	rng := rand.New(rand.NewPCG(1, 2))
	start := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	out := make([]*events.Event, n)
	for i := range out {
		data := fmt.Sprintf(`{"user":"u%d","amount":%d,"order_id":"o-%d","items":[{"sku":"s-%d","qty":1}],"note":"a typical order created by a typical user"}`,
			rng.IntN(10_000), rng.IntN(1000), i, rng.IntN(500))
		out[i] = &events.Event{ID: fmt.Sprint("e", i), Source: "bench", Type: fmt.Sprint("t", rng.IntN(10)),
			Time: start.Add(time.Duration(i) * 10 * time.Microsecond), Key: fmt.Sprint("bench/e", i), Data: json.RawMessage(data)}
	}
	return out
}

// BenchmarkEngine50Rules10kGroups: events/s through the rule engine (filters,
// groups, windows) with the event already decoded.
func BenchmarkEngine50Rules10kGroups(b *testing.B) {
	rules := benchRules(b)
	evs := benchEvents(200_000)
	envs := make([]*EventEnv, len(evs))
	for i, e := range evs {
		envs[i] = Env(e)
	}
	e := NewEngine(rules, nil)
	for _, env := range envs[:100_000] { // warm: every group exists
		e.Observe(env)
	}
	b.ResetTimer()
	b.ReportAllocs()
	for i := range b.N {
		env := envs[100_000+i%100_000]
		// Keep event time moving forward across loops.
		env.Time = env.Time.Add(time.Duration(i/100_000) * time.Second)
		e.Observe(env)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkEngineWithDecode adds what the stage does per message before the
// engine: decode the inter-stage event and its data.
func BenchmarkEngineWithDecode(b *testing.B) {
	rules := benchRules(b)
	evs := benchEvents(100_000)
	raw := make([][]byte, len(evs))
	for i, ev := range evs {
		raw[i], _ = ev.Marshal()
	}
	e := NewEngine(rules, nil)
	b.ResetTimer()
	b.ReportAllocs()
	for i := range b.N {
		ev, err := events.Unmarshal(raw[i%len(raw)])
		if err != nil {
			b.Fatal(err)
		}
		ev.Time = ev.Time.Add(time.Duration(i/len(raw)) * time.Second)
		e.Observe(Env(ev))
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkEngineProductionRules: the 20 rules of test/bench's BenchmarkProduction
// (every one sees every event: 5 match on a number, 5 count thresholds by user, 5
// rates by source on the same number, 5 absences by source) over 5,000 users.
func BenchmarkEngineProductionRules(b *testing.B) {
	var cfgs []RuleConfig
	for i := range 20 {
		switch i % 4 {
		case 0:
			cfgs = append(cfgs, RuleConfig{Name: fmt.Sprint("slow-", i), Filter: fmt.Sprintf(`type == "page.view" && data.duration_ms > %d`, 100_000+i)})
		case 1:
			cfgs = append(cfgs, RuleConfig{Name: fmt.Sprint("busy-user-", i), Kind: KindThreshold, Filter: `type == "page.view"`,
				GroupBy: []string{"data.user"}, Window: time.Minute, Op: ">", Threshold: float64(1_000_000 + i)})
		case 2:
			cfgs = append(cfgs, RuleConfig{Name: fmt.Sprint("path-rate-", i), Kind: KindRate, Filter: fmt.Sprintf(`type == "page.view" && data.duration_ms > %d`, i),
				GroupBy: []string{"source"}, Window: time.Minute, Change: "factor", Op: ">", Threshold: 1000})
		case 3:
			cfgs = append(cfgs, RuleConfig{Name: fmt.Sprint("quiet-", i), Kind: KindAbsence, Filter: `type == "page.view"`, GroupBy: []string{"source"}, For: time.Hour})
		}
	}
	rules, err := CompileRules(cfgs)
	if err != nil {
		b.Fatal(err)
	}
	start := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	envs := make([]*EventEnv, 100_000)
	for i := range envs {
		envs[i] = Env(&events.Event{ID: fmt.Sprint("pv-", i), Source: "web", Type: "page.view", Time: start.Add(time.Duration(i) * time.Millisecond),
			Data: json.RawMessage(fmt.Sprintf(`{"user":"u%d","duration_ms":%d}`, i%5000, i%3000))})
	}
	e := NewEngine(rules, nil)
	b.ResetTimer()
	b.ReportAllocs()
	for i := range b.N {
		env := envs[i%len(envs)]
		env.Time = env.Time.Add(time.Duration(i/len(envs)) * 100 * time.Second)
		e.Observe(env)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}

// BenchmarkEngineGroups: what alert groups cost in memory, the engine's state
// being in RAM: a per-user count threshold over a minute, evaluated every 10 s,
// with SLUICE_BENCH_GROUPS users (default 1,000,000) in its window, each with
// events in two steps of it. Reports the Go heap held per group (after a GC), the
// state's JSON per group (what a save writes) and the engine's events/s once
// every group exists, and the process's peak RSS (the setup's included).
func BenchmarkEngineGroups(b *testing.B) { benchGroups(b, false) }

// BenchmarkEngineGroupsOnDisk is BenchmarkEngineGroups with the groups beyond
// SLUICE_BENCH_HOT_GROUPS (default DefaultHotGroups) on disk (Spill): users come
// in turn, so nearly every event reads its group from disk and sends another
// there. Then the state is saved and restored (restore-s: from its encoding to
// an engine with its groups on disk), after the peak RSS is read.
func BenchmarkEngineGroupsOnDisk(b *testing.B) { benchGroups(b, true) }

func benchGroups(b *testing.B, onDisk bool) {
	groups := benchGroupCount(b)
	rules, err := CompileRules([]RuleConfig{{Name: "busy-user", Kind: KindThreshold, Filter: `type == "login"`, GroupBy: []string{"data.user"},
		Window: time.Minute, Step: 10 * time.Second, Op: ">", Threshold: 1000}})
	if err != nil {
		b.Fatal(err)
	}
	start := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	// 2×groups events over 20 s of event time: every user in two steps.
	spacing := 20 * time.Second / time.Duration(2*groups)
	env := func(i int) *EventEnv {
		return Env(&events.Event{ID: strconv.Itoa(i), Source: "web", Type: "login", Key: strconv.Itoa(i), Time: start.Add(time.Duration(i) * spacing),
			Data: json.RawMessage(`{"user":"u` + strconv.Itoa(i%groups) + `"}`)})
	}
	// The live heap after a GC (runtime/metrics; HeapInuse counts spans the GC has
	// not handed back). Two GCs: the first leaves sync.Pool's victims, such as the
	// buffer encoding/json kept from the last run's state.
	live := func() uint64 {
		runtime.GC()
		runtime.GC()
		m := []rtmetrics.Sample{{Name: "/gc/heap/live:bytes"}}
		rtmetrics.Read(m)
		return m[0].Value.Uint64()
	}
	// The peak RSS is this run's: the framework's first run (b.N = 1) did all of
	// this too, and its restore below would set the high-water mark.
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		b.Fatalf("reset the peak RSS: %v", err)
	}
	before := live()
	e := NewEngine(rules, nil)
	if onDisk {
		hot := DefaultHotGroups
		if v := os.Getenv("SLUICE_BENCH_HOT_GROUPS"); v != "" {
			if hot, err = strconv.Atoi(v); err != nil {
				b.Fatalf("SLUICE_BENCH_HOT_GROUPS: %v", err)
			}
		}
		s, err := OpenSpill(SpillOptions{Dir: b.TempDir(), HotGroups: hot})
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		e.SpillTo(s)
	}
	for i := range 2 * groups {
		e.Observe(env(i))
	}
	if err := e.Err(); err != nil {
		b.Fatal(err)
	}
	after := live()
	if held := e.State().Rules["busy-user"].size(); held != groups {
		b.Fatalf("%d groups held, want %d", held, groups)
	}
	var state []byte
	var encode time.Duration
	if !onDisk {
		encodeStart := time.Now()
		if state, err = e.State().MarshalBinary(); err != nil {
			b.Fatal(err)
		}
		encode = time.Since(encodeStart)
	}
	envs := make([]*EventEnv, 100_000)
	for i := range envs {
		envs[i] = env(2*groups + i)
	}
	b.ResetTimer()
	for i := range b.N {
		env := envs[i%len(envs)]
		env.Time = start.Add(time.Duration(2*groups+i) * spacing)
		e.Observe(env)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	b.ReportMetric(float64(after-before)/float64(groups), "heap-bytes/group")
	b.ReportMetric(float64(groups), "groups")
	if err := e.Err(); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(peakRSS(b)/(1<<20), "peak-rss-MiB")
	if onDisk {
		// A restore of the state saved now (after the peak RSS above: the saved
		// state is itself ~33 bytes a group), as OpenEngine does it.
		b.StopTimer()
		bin, err := e.State().MarshalBinary()
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		s, err := OpenSpill(SpillOptions{Dir: b.TempDir()})
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		st, err := decodeStateTo(bin, nil, rules, s)
		if err != nil {
			b.Fatal(err)
		}
		restored := NewEngine(rules, st)
		restored.SpillTo(s)
		b.ReportMetric(time.Since(start).Seconds(), "restore-s")
		b.ReportMetric(float64(len(bin))/float64(groups), "state-bytes/group")
		if got, want := restored.State().Rules["busy-user"].size(), e.State().Rules["busy-user"].size(); got != want || restored.Err() != nil {
			b.Fatalf("restored %d groups of %d (err %v)", got, want, restored.Err())
		}
		return
	}
	b.ReportMetric(float64(len(state))/float64(groups), "state-bytes/group")
	b.ReportMetric(float64(encode.Nanoseconds())/float64(groups), "encode-ns/group")
}

// benchGroupCount is SLUICE_BENCH_GROUPS (default 1,000,000).
func benchGroupCount(b *testing.B) int {
	v := os.Getenv("SLUICE_BENCH_GROUPS")
	if v == "" {
		return 1_000_000
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		b.Fatalf("SLUICE_BENCH_GROUPS: %v", err)
	}
	return n
}

// peakRSS is the process's peak resident set size since the last reset (VmHWM).
func peakRSS(b *testing.B) float64 {
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for line := range strings.Lines(string(status)) {
		if kb, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(kb), "kB")))
			if err != nil {
				b.Fatalf("VmHWM: %v", err)
			}
			return float64(n) * 1024
		}
	}
	b.Fatal("no VmHWM in /proc/self/status")
	return 0
}

// BenchmarkCheckpoint: what the incremental checkpoints (Checkpoints) write and
// cost per save at 20,000 events/s saved every 10 s, with SLUICE_BENCH_GROUPS
// users (default 1,000,000) of a per-user count threshold over an hour (every
// group stays in the window through the run), their groups in memory
// or, with SLUICE_BENCH_STORE=disk, beyond DefaultHotGroups on disk. Each
// iteration is one save: 200,000 events of users in turn (50 µs of event time
// apart), a capture (in the goroutine running the engine: capture-ms), then the
// upload of its files to a local directory, compactions included (upload-ms).
// Reports the bytes a save uploads (written-bytes/save), the whole state's
// encoding (what a save wrote before: state-bytes), the first capture's bytes,
// the share of a core the saves take at one per 10 s (core-%), and the time a
// restore of the last checkpoint takes (restore-s: files copied, then read).
// SLUICE_BENCH_CAPTURE=steps captures as the pipeline does (Begin, steps of 1,000
// groups, End) and reports the longest of those calls (longest-call-ms), the
// longest the engine's goroutine is held by the capture at once.
func BenchmarkCheckpoint(b *testing.B) {
	groups := benchGroupCount(b)
	s := Settings{Store: StoreMemory}
	if os.Getenv("SLUICE_BENCH_STORE") == StoreDisk {
		s = Settings{Store: StoreDisk, HotGroups: DefaultHotGroups}
	}
	// An hour's window: every group stays in it through the run.
	rules, err := CompileRules([]RuleConfig{{Name: "busy-user", Kind: KindThreshold, Filter: `type == "login"`, GroupBy: []string{"data.user"},
		Window: time.Hour, Step: 10 * time.Second, Op: ">", Threshold: 1000}})
	if err != nil {
		b.Fatal(err)
	}
	start := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	at := start
	next := 0
	observe := func(e *Engine, n int, spacing time.Duration) {
		for range n {
			at = at.Add(spacing)
			e.Observe(Env(&events.Event{ID: strconv.Itoa(next), Source: "web", Type: "login", Key: strconv.Itoa(next), Time: at,
				Data: json.RawMessage(`{"user":"u` + strconv.Itoa(next%groups) + `"}`)}))
			next++
		}
	}
	log := slog.New(slog.DiscardHandler)
	files := dirFiles{b.TempDir()}
	cp := NewCheckpoints(files, filepath.Join(b.TempDir(), "segments"), log)
	e, err := cp.Open(context.Background(), s, rules, nil, nil, nil, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	// Every user in two steps, over 20 s of event time.
	observe(e, 2*groups, 20*time.Second/time.Duration(2*groups))
	uploaded := map[string]bool{}
	var captureTime, uploadTime, longest time.Duration
	var last []Segment
	// stepped: captures in steps of 1,000 groups (Begin, Step, End), as the
	// pipeline's decide loop makes them; longest is the longest of those calls.
	stepped := os.Getenv("SLUICE_BENCH_CAPTURE") == "steps"
	capture := func() (*Capture, error) {
		if !stepped {
			return cp.Capture(e)
		}
		timed := func(f func()) {
			t := time.Now()
			f()
			longest = max(longest, time.Since(t))
		}
		var p *Pending
		var err error
		timed(func() { p, err = cp.Begin(e) })
		if err != nil {
			return nil, err
		}
		for more := true; more; {
			timed(func() { more = p.Step(1000) })
		}
		var c *Capture
		timed(func() { c, err = p.End() })
		return c, err
	}
	save := func() (written int64) {
		ctx := context.Background()
		t0 := time.Now()
		c, err := capture()
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		list, err := c.Upload(ctx)
		if err != nil {
			b.Fatal(err)
		}
		c.Saved(ctx)
		last = list
		captureTime += t1.Sub(t0)
		uploadTime += time.Since(t1)
		for _, sg := range list {
			if !uploaded[sg.File.Object] {
				uploaded[sg.File.Object] = true
				fi, err := os.Stat(filepath.Join(files.dir, sg.File.Object))
				if err != nil {
					b.Fatal(err)
				}
				written += fi.Size()
			}
		}
		return written
	}
	first := save()
	captureTime, uploadTime, longest = 0, 0, 0
	var written int64
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		observe(e, 200_000, 50*time.Microsecond)
		b.StartTimer()
		written += save()
	}
	b.StopTimer()
	if err := e.Err(); err != nil {
		b.Fatal(err)
	}
	state, err := e.State().MarshalBinary()
	if err != nil {
		b.Fatal(err)
	}
	perSave := (captureTime + uploadTime).Seconds() / float64(b.N)
	b.ReportMetric(float64(written)/float64(b.N), "written-bytes/save")
	b.ReportMetric(float64(len(state)), "state-bytes")
	b.ReportMetric(float64(first), "first-bytes")
	b.ReportMetric(float64(captureTime.Milliseconds())/float64(b.N), "capture-ms")
	b.ReportMetric(float64(uploadTime.Milliseconds())/float64(b.N), "upload-ms")
	if stepped {
		b.ReportMetric(float64(longest.Microseconds())/1000, "longest-call-ms")
	}
	b.ReportMetric(perSave/10*100, "core-%")
	b.ReportMetric(float64(e.State().Rules["busy-user"].size()), "groups")
	// A restore of the last checkpoint on another machine: its files downloaded
	// (copied), read at once into an engine (the groups beyond the hot ones to disk).
	restoreStart := time.Now()
	restored, err := NewCheckpoints(files, filepath.Join(b.TempDir(), "segments"), log).Open(context.Background(), s, rules, last, nil, nil, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer restored.Close()
	b.ReportMetric(time.Since(restoreStart).Seconds(), "restore-s")
	if got, want := restored.State().Rules["busy-user"].size(), e.State().Rules["busy-user"].size(); got != want {
		b.Fatalf("restored %d groups of %d", got, want)
	}
}

// BenchmarkStageSaveHold is how long the alert stage's loop stops for a save of
// many changed groups: 300,000 groups of a threshold rule changed (one event each),
// then an instant rule's event ("ping") published every 20 ms for 15 s, each waited
// for in ALERTS; a save every 10 s falls among them. It reports the pings' p50,
// p99 and max time from publish to the alert (the max: the longest the loop stopped
// for a save, within a ping's spacing).
func BenchmarkStageSaveHold(b *testing.B) {
	const groups, pings = 300_000, 700
	for range b.N {
		h := newHarness(b)
		st := h.start(writeConfig(b, `
alert: {snapshot_interval: 10s, idle_after: 1h}
rules:
  - name: ping
    filter: type == "ping"
  - name: busy
    kind: threshold
    filter: type == "view"
    group_by: [data.user]
    window: 1h
    op: ">"
    threshold: 1000000
`))
		ctx := context.Background()
		at := time.Now().UTC()
		publish := func(id, typ, data string, async bool) {
			e := &events.Event{ID: id, Source: "bench", Type: typ, Time: at, Key: "bench/" + id, Data: json.RawMessage(data)}
			body, err := e.Marshal()
			if err == nil && async {
				_, err = h.js.PublishAsync("enriched.bench", body)
			} else if err == nil {
				_, err = h.js.Publish(ctx, "enriched.bench", body)
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		for i := range groups {
			publish(fmt.Sprint("v", i), "view", fmt.Sprintf(`{"user":"u%d"}`, i), true)
		}
		<-h.js.PublishAsyncComplete()
		alerted := make(chan struct{}, pings+1)
		sub, err := h.nc.Subscribe("alerts.ping.>", func(*nats.Msg) { alerted <- struct{}{} })
		if err != nil {
			b.Fatal(err)
		}
		// The first ping's alert comes once the groups' events are read.
		publish("p-first", "ping", `{}`, false)
		select {
		case <-alerted:
		case <-time.After(5 * time.Minute):
			b.Fatal("the stage did not read the groups' events in 5 minutes")
		}
		lat := make([]float64, 0, pings)
		every := time.NewTicker(20 * time.Millisecond) // the pings' pace
		for i := range pings {
			<-every.C
			sent := time.Now()
			publish(fmt.Sprint("p", i), "ping", `{}`, false)
			select {
			case <-alerted:
			case <-time.After(time.Minute):
				b.Fatalf("ping %d: no alert in a minute", i)
			}
			lat = append(lat, float64(time.Since(sent).Microseconds())/1000)
		}
		every.Stop()
		_ = sub.Unsubscribe()
		st.stop(b)
		slices.Sort(lat)
		b.ReportMetric(lat[len(lat)/2], "ping-p50-ms")
		b.ReportMetric(lat[len(lat)*99/100], "ping-p99-ms")
		b.ReportMetric(lat[len(lat)-1], "ping-max-ms")
	}
}
