package notify

import (
	"errors"
	"net/http"
	"testing"
	"time"
)

// The example from the Standard Webhooks specification's reference libraries.
func TestSignMatchesStandardWebhooksExample(t *testing.T) {
	secret, err := ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		t.Fatal(err)
	}
	got := Sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, []byte(`{"test": 2432232314}`))
	want := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
	if got != want {
		t.Fatalf("Sign = %s, want %s", got, want)
	}
}

func TestVerify(t *testing.T) {
	old, _ := ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	cur, _ := ParseSecret("rotated-secret")
	now := time.Unix(1_800_000_000, 0)
	body := []byte(`{"a":1}`)
	h := http.Header{}
	SetHeaders(h, []Secret{cur, old}, "msg_1", now, body)
	tests := []struct {
		name    string
		secret  Secret
		body    []byte
		now     time.Time
		wantErr error
	}{
		{"current secret", cur, body, now, nil},
		{"old secret during rotation", old, body, now, nil},
		{"wrong secret", Secret("nope"), body, now, ErrBadSignature},
		{"tampered body", cur, []byte(`{"a":2}`), now, ErrBadSignature},
		{"too old", cur, body, now.Add(6 * time.Minute), ErrBadTimestamp},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := Verify(tt.secret, h, tt.body, tt.now, 5*time.Minute)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Verify = %v, want %v", err, tt.wantErr)
			}
		})
	}
	if err := Verify(cur, http.Header{}, body, now, time.Minute); !errors.Is(err, ErrNoSignature) {
		t.Fatalf("no headers: %v", err)
	}
}
