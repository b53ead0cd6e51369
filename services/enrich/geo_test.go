package enrich

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func writeFile(t *testing.T, name, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestGeoLongestPrefix(t *testing.T) {
	p := writeFile(t, "nets.csv", `0.0.0.0/0,default-v4
10.0.0.0/8,ten
10.1.0.0/16,ten-one
10.1.2.3/32,host
::/0,default-v6
2001:db8::/32,doc
2001:db8:1::/48,doc-one
2001:db8:1::1/128,host6
192.168.1.0,192.168.1.127,range-low
`)
	g, err := LoadGeo([]string{p}, []string{"name"})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ addr, want string }{
		{"8.8.8.8", "default-v4"},
		{"10.200.0.1", "ten"},
		{"10.1.9.9", "ten-one"},
		{"10.1.2.3", "host"},
		{"10.1.2.4", "ten-one"},
		{"::ffff:10.1.2.3", "host"},
		{"2001:db8:ffff::1", "doc"},
		{"2001:db8:1::2", "doc-one"},
		{"2001:db8:1::1", "host6"},
		{"2a00::1", "default-v6"},
		{"192.168.1.5", "range-low"},
		{"192.168.1.127", "range-low"},
		{"192.168.1.128", "default-v4"},
	}
	for _, tt := range tests {
		got, ok := g.Lookup(tt.addr)
		if !ok || got[0] != tt.want {
			t.Errorf("Lookup(%s) = %v %v, want %s", tt.addr, got, ok, tt.want)
		}
	}
	if _, ok := g.Lookup("not an ip"); ok {
		t.Error("a bad address matched")
	}
	for _, bad := range []string{"10.0.0.0/33,x\n", "10.0.0.9,10.0.0.1,x\n", "1.2.3.4,x\n", "10.0.0.0/8\n"} {
		if _, err := LoadGeo([]string{writeFile(t, "bad.csv", bad)}, []string{"name"}); err == nil {
			t.Errorf("loaded %q", bad)
		}
	}
}

// The real IPv4 and IPv6 country and ASN tables of ../shared/data.
func TestGeoRealData(t *testing.T) {
	dir := sharedData(t, "ip")
	start := time.Now()
	country, err := LoadGeo([]string{filepath.Join(dir, "geo-whois-asn-country-ipv4.csv.gz"), filepath.Join(dir, "geo-whois-asn-country-ipv6.csv.gz")}, []string{"country"})
	if err != nil {
		t.Fatal(err)
	}
	asn, err := LoadGeo([]string{filepath.Join(dir, "asn-ipv4.csv.gz"), filepath.Join(dir, "asn-ipv6.csv.gz")}, []string{"asn", "as_org"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("loaded %d country and %d ASN ranges in %s", country.Len(), asn.Len(), time.Since(start))
	// First lines of the files: 1.0.0.0-1.0.0.255 is AU; 2001::/32 is AS6939.
	if got, ok := country.Lookup("1.0.0.7"); !ok || got[0] != "AU" {
		t.Errorf("1.0.0.7 = %v", got)
	}
	if got, ok := country.Lookup("1.0.2.1"); !ok || got[0] != "CN" {
		t.Errorf("1.0.2.1 = %v", got)
	}
	if got, ok := asn.Lookup("2001::1"); !ok || got[0] != "6939" || got[1] != "Hurricane Electric LLC" {
		t.Errorf("2001::1 = %v", got)
	}
	if _, ok := country.Lookup("10.0.0.1"); ok {
		t.Error("a private address has a country")
	}
}
