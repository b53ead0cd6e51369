// Package certs makes the TLS files of a self-run NATS: a certificate authority and
// a server certificate it signed, for the compose stack (`sluice certs`).
package certs

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// The files Ensure writes in its directory.
const (
	CAFile        = "ca.pem"
	CAKeyFile     = "ca-key.pem"
	ServerFile    = "server.pem"
	ServerKeyFile = "server-key.pem"
)

// Lifetimes, and how long before its end a server certificate is made again.
const (
	caLifetime     = 10 * 365 * 24 * time.Hour
	serverLifetime = 825 * 24 * time.Hour
	renewBefore    = 30 * 24 * time.Hour
)

// Ensure makes what dir lacks: the CA (ca.pem, ca-key.pem) when there is none, and
// the server certificate (server.pem, server-key.pem) when it is missing, was not
// signed by that CA, does not name every one of hosts (DNS names or IP addresses),
// or ends within 30 days. It keeps what is good, so it can run at every start (a CA
// of one's own needs no ca-key.pem while its server certificate is good), and
// returns the files it wrote. Keys are written readable by their owner only.
func Ensure(dir string, hosts []string, now time.Time) ([]string, error) {
	if len(hosts) == 0 {
		return nil, errors.New("certs: the server certificate needs at least one host name")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("certs: %w", err)
	}
	var wrote []string
	ca, err := readCert(filepath.Join(dir, CAFile))
	var caKey *ecdsa.PrivateKey
	if errors.Is(err, fs.ErrNotExist) {
		if ca, caKey, err = newCA(now); err != nil {
			return nil, err
		}
		if err := writePair(dir, CAFile, CAKeyFile, ca, caKey); err != nil {
			return nil, err
		}
		wrote = append(wrote, CAFile, CAKeyFile)
	} else if err != nil {
		return nil, err
	}
	server, err := readCert(filepath.Join(dir, ServerFile))
	if err == nil {
		_, err = readKey(filepath.Join(dir, ServerKeyFile))
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	if err == nil && serves(server, ca, hosts, now) {
		return wrote, nil
	}
	// A CA of one's own may come without its key, as long as the server
	// certificate it signed is good.
	if caKey == nil {
		if caKey, err = readKey(filepath.Join(dir, CAKeyFile)); err != nil {
			return nil, fmt.Errorf("certs: the server certificate must be made (missing, not signed by %s, lacking one of %v, or near its end), which needs the CA's key: %w", CAFile, hosts, err)
		}
	}
	server, key, err := newServer(ca, caKey, hosts, now)
	if err != nil {
		return nil, err
	}
	if err := writePair(dir, ServerFile, ServerKeyFile, server, key); err != nil {
		return nil, err
	}
	return append(wrote, ServerFile, ServerKeyFile), nil
}

// serves tells whether server was signed by ca, names every host, and lasts.
func serves(server, ca *x509.Certificate, hosts []string, now time.Time) bool {
	if server.CheckSignatureFrom(ca) != nil || now.Add(renewBefore).After(server.NotAfter) {
		return false
	}
	for _, h := range hosts {
		if server.VerifyHostname(h) != nil {
			return false
		}
	}
	return true
}

func newCA(now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: "sluice NATS CA", Organization: []string{"sluice"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caLifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	return sign(tmpl, nil, nil)
}

// newServer is a certificate for hosts, for clients and for the routes between
// cluster nodes (each node is a client of the others).
func newServer(ca *x509.Certificate, caKey *ecdsa.PrivateKey, hosts []string, now time.Time) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	tmpl := &x509.Certificate{
		Subject:     pkix.Name{CommonName: hosts[0], Organization: []string{"sluice"}},
		NotBefore:   now.Add(-time.Hour),
		NotAfter:    now.Add(serverLifetime),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, h := range slices.Compact(slices.Sorted(slices.Values(hosts))) {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	return sign(tmpl, ca, caKey)
}

// sign makes a key and a certificate of tmpl signed by parent (itself when nil).
func sign(tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("certs: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, fmt.Errorf("certs: %w", err)
	}
	tmpl.SerialNumber = serial
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, nil, fmt.Errorf("certs: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("certs: %w", err)
	}
	return cert, key, nil
}

// readCert reads a PEM certificate; fs.ErrNotExist when it is missing.
func readCert(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("certs: %w", err)
	}
	p, _ := pem.Decode(b)
	if p == nil || p.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("certs: %s holds no PEM certificate", path)
	}
	cert, err := x509.ParseCertificate(p.Bytes)
	if err != nil {
		return nil, fmt.Errorf("certs: %s: %w", path, err)
	}
	return cert, nil
}

// readKey reads a PEM EC private key; fs.ErrNotExist when it is missing.
func readKey(path string) (*ecdsa.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("certs: %w", err)
	}
	p, _ := pem.Decode(b)
	if p == nil {
		return nil, fmt.Errorf("certs: %s holds no PEM key", path)
	}
	key, err := x509.ParseECPrivateKey(p.Bytes)
	if err != nil {
		return nil, fmt.Errorf("certs: %s: %w", path, err)
	}
	return key, nil
}

func writePair(dir, certFile, keyFile string, cert *x509.Certificate, key *ecdsa.PrivateKey) error {
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("certs: %w", err)
	}
	// The key first: a certificate without its key would read as missing anyway.
	if err := writeFile(filepath.Join(dir, keyFile), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		return err
	}
	return writeFile(filepath.Join(dir, certFile), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw}), 0o644)
}

// writeFile replaces path whole (a temporary file renamed over it).
func writeFile(path string, b []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return fmt.Errorf("certs: %w", err)
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fmt.Errorf("certs: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("certs: %w", err)
	}
	return nil
}
