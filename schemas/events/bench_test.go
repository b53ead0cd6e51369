package events

import (
	"testing"
	"time"
)

func benchEventJSON(b *testing.B) []byte {
	d := NewDecoder(nil, nil)
	e, err := d.Decode(Message{Subject: "events.web.pageview", Received: time.Now(), Data: []byte(`{"specversion":"1.0","id":"pv-1","source":"web","type":"page.view","time":"2026-11-21T10:00:00.123Z","datacontenttype":"application/json","data":{"user":"u1","session":"s-1","path":"/products/1","referrer":"https://search.example.com/?q=item+1","ip":"203.0.113.1","ua":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36","duration_ms":1}}`)})
	if err != nil {
		b.Fatal(err)
	}
	e.Key = "0123456789abcdef0123456789abcdef"
	out, err := e.Marshal()
	if err != nil {
		b.Fatal(err)
	}
	return out
}

// BenchmarkUnmarshal decodes the inter-stage form of a ~430-byte event.
func BenchmarkUnmarshal(b *testing.B) {
	data := benchEventJSON(b)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := Unmarshal(data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecode validates and normalises a raw structured event.
func BenchmarkDecode(b *testing.B) {
	types, err := LoadTypeSchemas()
	if err != nil {
		b.Fatal(err)
	}
	d := NewDecoder(types, nil)
	raw := []byte(`{"specversion":"1.0","id":"pv-1","source":"web","type":"page.view","time":"2026-11-21T10:00:00.123Z","datacontenttype":"application/json","data":{"user":"u1","session":"s-1","path":"/products/1","referrer":"https://search.example.com/?q=item+1","ip":"203.0.113.1","ua":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36","duration_ms":1}}`)
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		e, err := d.Decode(Message{Subject: "events.web.pageview", Data: raw, Received: time.Now()})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := e.Marshal(); err != nil {
			b.Fatal(err)
		}
	}
}
