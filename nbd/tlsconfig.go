package nbd

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
)

// Names of the files in a TLS certificates directory, the layout qemu-nbd's
// tls-creds-x509 and nbdkit's --tls-certificates read (and libnbd on the
// client side).
const (
	tlsCAFile         = "ca-cert.pem"
	tlsServerCertFile = "server-cert.pem"
	tlsServerKeyFile  = "server-key.pem"
)

// TLSConfigFromDir loads a server TLS configuration for Options.TLS from dir:
// server-cert.pem (the certificate chain) and server-key.pem. With
// verifyClients, clients must also present a certificate signed by a CA in
// dir/ca-cert.pem.
func TLSConfigFromDir(dir string, verifyClients bool) (*tls.Config, error) {
	certFile := filepath.Join(dir, tlsServerCertFile)
	cert, err := tls.LoadX509KeyPair(certFile, filepath.Join(dir, tlsServerKeyFile))
	if err != nil {
		return nil, fmt.Errorf("nbd: TLS certificates %s: %w", dir, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if verifyClients {
		caFile := filepath.Join(dir, tlsCAFile)
		caPEM, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("nbd: TLS client CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(caPEM) {
			return nil, fmt.Errorf("nbd: TLS client CA %s: no certificate found", caFile)
		}
		cfg.ClientCAs = pool
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
	}
	return cfg, nil
}
