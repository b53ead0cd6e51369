package crash

import "testing"

func TestParse(t *testing.T) {
	tests := []struct {
		in      string
		want    Injection
		wantErr bool
	}{
		{"after-insert:0.3", Injection{AfterInsert, 0.3}, false},
		{"during-insert:1", Injection{DuringInsert, 1}, false},
		{"before-insert:0", Injection{BeforeInsert, 0}, false},
		{"after-insert", Injection{}, true},
		{"after-insert:2", Injection{}, true},
		{"somewhere:0.5", Injection{}, true},
	}
	for _, tt := range tests {
		got, err := Parse(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("Parse(%q) = %+v, %v", tt.in, got, err)
		}
	}
}
