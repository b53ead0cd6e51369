package certs

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestEnsure(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "certs")
	now := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	hosts := []string{"nats", "localhost", "127.0.0.1"}
	wrote, err := Ensure(dir, hosts, now)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{CAFile, CAKeyFile, ServerFile, ServerKeyFile}; !slices.Equal(wrote, want) {
		t.Fatalf("wrote %v, want %v", wrote, want)
	}
	for _, f := range []string{CAKeyFile, ServerKeyFile} {
		if info, err := os.Stat(filepath.Join(dir, f)); err != nil || info.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v, mode %v; want 0600", f, err, info.Mode())
		}
	}
	for _, h := range hosts {
		handshake(t, dir, h)
	}

	// Again: everything is good and stays.
	before, _ := os.ReadFile(filepath.Join(dir, ServerFile))
	if wrote, err := Ensure(dir, hosts, now.Add(24*time.Hour)); err != nil || len(wrote) != 0 {
		t.Fatalf("second run wrote %v (%v), want nothing", wrote, err)
	}
	// A host more: a new server certificate from the same CA.
	ca, _ := os.ReadFile(filepath.Join(dir, CAFile))
	wrote, err = Ensure(dir, append(hosts, "nats-2"), now)
	if err != nil || !slices.Equal(wrote, []string{ServerFile, ServerKeyFile}) {
		t.Fatalf("with a new host: wrote %v (%v), want the server certificate only", wrote, err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, ServerFile)); string(after) == string(before) {
		t.Fatal("the server certificate stayed though it lacks a host")
	}
	if again, _ := os.ReadFile(filepath.Join(dir, CAFile)); string(again) != string(ca) {
		t.Fatal("the CA changed")
	}
	handshake(t, dir, "nats-2")
	// Near its end: made again.
	if wrote, err := Ensure(dir, hosts, now.Add(serverLifetime-renewBefore+time.Hour)); err != nil || len(wrote) != 2 {
		t.Fatalf("near the end: wrote %v (%v), want the server certificate", wrote, err)
	}
	// A CA without its key: a good server certificate stays; one to be made is an
	// error that says why, and nothing is replaced.
	if err := os.Remove(filepath.Join(dir, CAKeyFile)); err != nil {
		t.Fatal(err)
	}
	if wrote, err := Ensure(dir, hosts, now); err != nil || len(wrote) != 0 {
		t.Fatalf("without the CA's key: wrote %v (%v), want nothing", wrote, err)
	}
	if _, err := Ensure(dir, append(hosts, "nats-3"), now); err == nil || !strings.Contains(err.Error(), "CA's key") {
		t.Fatalf("a new host without the CA's key: %v, want an error naming the key", err)
	}
	if again, _ := os.ReadFile(filepath.Join(dir, CAFile)); string(again) != string(ca) {
		t.Fatal("the CA changed")
	}
	// Unreadable files are an error naming the file, not replaced.
	if err := os.WriteFile(filepath.Join(dir, CAFile), []byte("junk"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Ensure(dir, hosts, now); err == nil {
		t.Fatal("a broken ca.pem was taken")
	}
	if _, err := Ensure(t.TempDir(), nil, now); err == nil {
		t.Fatal("no hosts was taken")
	}
}

// handshake connects over TLS to a server with the certificate, verifying it as a
// client of host does with the CA.
func handshake(t *testing.T, dir, host string) {
	t.Helper()
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, ServerFile), filepath.Join(dir, ServerKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, CAFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.pem holds no certificate")
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{pair}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			_ = c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: pool, ServerName: host})
	if err != nil {
		t.Fatalf("host %s: %v", host, err)
	}
	c.Close()
}
