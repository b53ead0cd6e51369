// Package natsserver runs an embedded NATS server with JetStream, for the all-in-one
// command and for tests.
package natsserver

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Config says where the embedded server listens and stores.
type Config struct {
	// Host and Port to listen on; Port -1 picks a free port.
	Host string
	Port int
	// StoreDir is the JetStream file store.
	StoreDir string
	// MaxPayload is the largest message accepted; 0 keeps the server default (1 MiB).
	MaxPayload int32
	// Debug turns on the server's own logging (sluice up --log-level debug).
	Debug bool
}

// Start starts the server and waits until it accepts connections. The caller owns
// the server and must call Shutdown (then WaitForShutdown).
func Start(cfg Config) (*server.Server, error) {
	if cfg.StoreDir == "" {
		return nil, errors.New("natsserver: StoreDir is required")
	}
	if cfg.Port > 0 {
		// The server reports a port in use only to its log: say so now rather
		// than after the wait below.
		addr := net.JoinHostPort(cfg.Host, strconv.Itoa(cfg.Port))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("natsserver: cannot listen on %s (another NATS server or sluice up?): %w", addr, err)
		}
		_ = l.Close()
	}
	opts := &server.Options{
		ServerName: "sluice",
		Host:       cfg.Host,
		Port:       cfg.Port,
		JetStream:  true,
		StoreDir:   cfg.StoreDir,
		MaxPayload: cfg.MaxPayload,
		NoSigs:     true,
		NoLog:      !cfg.Debug,
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("natsserver: %w", err)
	}
	if cfg.Debug {
		srv.ConfigureLogger()
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		return nil, fmt.Errorf("natsserver: not ready after 10s (is %s:%d in use?)", cfg.Host, cfg.Port)
	}
	return srv, nil
}
