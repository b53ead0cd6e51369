package sink

import "testing"

func TestParseCrash(t *testing.T) {
	tests := []struct {
		in      string
		want    Crash
		wantErr bool
	}{
		{"after-insert:0.3", Crash{CrashAfterInsert, 0.3}, false},
		{"during-insert:1", Crash{CrashDuringInsert, 1}, false},
		{"before-insert:0", Crash{CrashBeforeInsert, 0}, false},
		{"after-insert", Crash{}, true},
		{"after-insert:2", Crash{}, true},
		{"somewhere:0.5", Crash{}, true},
	}
	for _, tt := range tests {
		got, err := ParseCrash(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParseCrash(%q) = %+v, %v", tt.in, got, err)
		}
	}
}
