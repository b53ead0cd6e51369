package keyed

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func sample() []Entry {
	return []Entry{
		{Subject: "events.web.pageview", Header: map[string][]string{"Nats-Msg-Id": {"a-1"}, "X-Two": {"1", "2"}}, Data: []byte(`{"id":"1"}`),
			Seq: 7, Received: time.Date(2026, 12, 1, 10, 0, 0, 123456789, time.UTC), Key: "web|1", Element: -1},
		{Subject: "events.app.batch", Data: []byte(`{"id":"2"}`), Seq: 1 << 40, Received: time.Unix(0, 0).UTC(), Key: "e|2", Element: 3},
		{Subject: "events.x.y", Data: []byte{}, Seq: 9, Received: time.Date(1969, 7, 20, 20, 17, 0, 0, time.UTC), Key: "h|" + strings.Repeat("k", 300), Element: 0},
	}
}

func TestRoundTrip(t *testing.T) {
	var e Encoder
	in := sample()
	sizes := len(magic) + 10
	for i := range in {
		e.Add(&in[i])
		if sizes += Size(&in[i]); e.Len() > sizes {
			t.Fatalf("Len %d after %d entries is more than their sizes, %d", e.Len(), i+1, sizes)
		}
	}
	b := e.Bytes()
	if len(b) > e.Len() {
		t.Fatalf("envelope of %d bytes, Len said %d", len(b), e.Len())
	}
	var out []Entry
	if err := Decode(b, func(i int, x Entry) bool {
		if i != len(out) {
			t.Fatalf("entry %d passed as %d", len(out), i)
		}
		out = append(out, x)
		return true
	}); err != nil {
		t.Fatal(err)
	}
	if len(out) != len(in) {
		t.Fatalf("%d entries back, %d in", len(out), len(in))
	}
	for i := range in {
		if len(in[i].Data) == 0 {
			in[i].Data = out[i].Data // empty either way
		}
		if !reflect.DeepEqual(in[i], out[i]) {
			t.Errorf("entry %d:\n in %+v\nout %+v", i, in[i], out[i])
		}
	}
	e.Reset()
	if e.Count() != 0 {
		t.Fatal("Reset kept entries")
	}
}

func TestDecodeMalformed(t *testing.T) {
	var e Encoder
	in := sample()
	for i := range in {
		e.Add(&in[i])
	}
	b := e.Bytes()
	for _, c := range []struct {
		name string
		b    []byte
		want string
	}{
		{"no magic", []byte("{}"), "not an envelope"},
		{"cut", b[:len(b)-5], "entry 2 of 3: envelope: cut short"},
		{"trailing", append(append([]byte{}, b...), 1, 2), "2 bytes after its 3 entries"},
	} {
		n := 0
		err := Decode(c.b, func(int, Entry) bool { n++; return true })
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: err %v, want %q", c.name, err, c.want)
		}
		if c.name == "cut" && n != 2 {
			t.Errorf("cut: %d entries before the error, want 2", n)
		}
	}
}

func FuzzDecode(f *testing.F) {
	var e Encoder
	in := sample()
	for i := range in {
		e.Add(&in[i])
	}
	f.Add(e.Bytes())
	f.Add([]byte("SLK1\xff\xff\xff\xff\x0f"))
	f.Fuzz(func(t *testing.T, b []byte) {
		var got []Entry
		if err := Decode(b, func(_ int, x Entry) bool { got = append(got, x); return true }); err != nil {
			return
		}
		// What decodes encodes back to the same entries.
		var e Encoder
		for i := range got {
			e.Add(&got[i])
		}
		n := 0
		if err := Decode(e.Bytes(), func(i int, x Entry) bool {
			if !reflect.DeepEqual(x, got[i]) && !(len(x.Data) == 0 && len(got[i].Data) == 0) {
				t.Fatalf("entry %d: %+v, re-encoded %+v", i, got[i], x)
			}
			n++
			return true
		}); err != nil || n != len(got) {
			t.Fatalf("re-encoded: %d entries, err %v", n, err)
		}
	})
}
