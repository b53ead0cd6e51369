package streams

import (
	"context"
	"encoding/json"
	"io/fs"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

func runServer(t *testing.T) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	srv, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

type apiResponse struct {
	Error *struct {
		Code        int    `json:"code"`
		Description string `json:"description"`
	} `json:"error"`
}

// Every file is accepted by the JetStream API as it is on disk, the way
// `nats stream add --config FILE` and `nats consumer add STREAM --config FILE` send it.
func TestFilesLoadAsIsThroughTheJetStreamAPI(t *testing.T) {
	nc, _ := runServer(t)
	topo, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	if len(topo.Streams) != 8 || len(topo.Consumers) != 7 {
		t.Fatalf("loaded %d streams and %d consumers", len(topo.Streams), len(topo.Consumers))
	}
	request := func(subject string, body []byte) {
		t.Helper()
		resp, err := nc.Request(subject, body, 5*time.Second)
		if err != nil {
			t.Fatalf("%s: %v", subject, err)
		}
		var r apiResponse
		if err := json.Unmarshal(resp.Data, &r); err != nil {
			t.Fatal(err)
		}
		if r.Error != nil {
			t.Fatalf("%s: %d %s", subject, r.Error.Code, r.Error.Description)
		}
	}
	for _, s := range topo.Streams {
		raw, err := fs.ReadFile(files, s.File)
		if err != nil {
			t.Fatal(err)
		}
		request("$JS.API.STREAM.CREATE."+s.Config.Name, raw)
	}
	for _, c := range topo.Consumers {
		raw, err := fs.ReadFile(files, c.File)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := json.Marshal(map[string]any{"stream_name": c.Stream, "config": json.RawMessage(raw)})
		request("$JS.API.CONSUMER.CREATE."+c.Stream+"."+c.Config.Durable, body)
	}
}

func TestApplyIsIdempotentAndUpdates(t *testing.T) {
	_, js := runServer(t)
	ctx := context.Background()
	topo, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := topo.Apply(ctx, js); err != nil {
			t.Fatal(err)
		}
	}
	cfg, _ := topo.Stream(Events)
	cfg.MaxAge = 48 * time.Hour
	if err := topo.Apply(ctx, js); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(ctx, Events)
	if err != nil {
		t.Fatal(err)
	}
	if s.CachedInfo().Config.MaxAge != 48*time.Hour {
		t.Fatalf("max_age = %v after update", s.CachedInfo().Config.MaxAge)
	}
	cfg.Storage = jetstream.MemoryStorage
	err = topo.Apply(ctx, js)
	if err == nil || !strings.Contains(err.Error(), "streams/EVENTS.stream.json") || !strings.Contains(err.Error(), `field "storage"`) {
		t.Fatalf("err = %v, want it to name the file and the field", err)
	}
	cfg.Storage = jetstream.FileStorage
	cons, _ := topo.Consumer(Events, "dedup")
	cons.DeliverPolicy = jetstream.DeliverNewPolicy
	err = topo.Apply(ctx, js)
	if err == nil || !strings.Contains(err.Error(), "streams/EVENTS.dedup.consumer.json") {
		t.Fatalf("err = %v, want the refused consumer update to name its file", err)
	}
}

func TestLoadRejectsUnknownFields(t *testing.T) {
	fsys := fstest.MapFS{"X.stream.json": {Data: []byte(`{"name":"X","subjects":["x"],"max_agee":1}`)}}
	_, err := LoadFS(fsys)
	if err == nil || !strings.Contains(err.Error(), "streams/X.stream.json") || !strings.Contains(err.Error(), "max_agee") {
		t.Fatalf("err = %v", err)
	}
}

// Five services starting at once all apply the topology; none fails.
func TestApplyConcurrently(t *testing.T) {
	_, js := runServer(t)
	topo, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 5)
	for range 5 {
		go func() { errs <- topo.Apply(context.Background(), js) }()
	}
	for range 5 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

func TestWithReplicas(t *testing.T) {
	topo, err := Load()
	if err != nil {
		t.Fatal(err)
	}
	r3 := topo.WithReplicas(3)
	for i, s := range r3.Streams {
		if s.Config.Replicas != 3 {
			t.Fatalf("%s: %d replicas", s.File, s.Config.Replicas)
		}
		if topo.Streams[i].Config.Replicas != 1 {
			t.Fatalf("%s: the loaded topology changed too (%d replicas)", s.File, topo.Streams[i].Config.Replicas)
		}
	}
	if len(r3.Consumers) != len(topo.Consumers) {
		t.Fatal("consumers lost")
	}
	// 0: each stream as it is, new ones with one copy.
	_, js := runServer(t)
	if err := topo.WithReplicas(0).Apply(context.Background(), js); err != nil {
		t.Fatal(err)
	}
	for _, s := range topo.Streams {
		st, err := js.Stream(context.Background(), s.Config.Name)
		if err != nil {
			t.Fatal(err)
		}
		if r := st.CachedInfo().Config.Replicas; r != 1 {
			t.Fatalf("%s created with %d replicas", s.Config.Name, r)
		}
	}
	if err := topo.WithReplicas(0).Apply(context.Background(), js); err != nil {
		t.Fatalf("applied again: %v", err)
	}
}
