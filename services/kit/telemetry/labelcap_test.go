package telemetry

import (
	"fmt"
	"sync"
	"testing"
)

func TestLabelCap(t *testing.T) {
	c := &LabelCap{Max: 3}
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() { c.Value(fmt.Sprint("warm", i%2)) })
	}
	wg.Wait()
	for _, tc := range []struct{ in, want string }{
		{"warm0", "warm0"}, {"warm1", "warm1"}, {"", None}, {"third", "third"}, {"fourth", Other}, {"third", "third"}, {"warm0", "warm0"},
	} {
		if got := c.Value(tc.in); got != tc.want {
			t.Errorf("Value(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestReasonClass(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"event is not valid JSON: invalid character 'x'", "event is not valid JSON"},
		{"no colon here", "no colon here"},
		{"  padded : x", "padded"},
		{string(make([]byte, 200)), string(make([]byte, 80))},
		{"é" + string(make([]byte, 79)), "é" + string(make([]byte, 78))},
	} {
		if got := ReasonClass(tc.in); got != tc.want {
			t.Errorf("ReasonClass(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
