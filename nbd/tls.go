package nbd

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
)

// TLSMode is a Server's TLS policy, the spec's NOTLS / FORCEDTLS modes plus
// an optional one.
type TLSMode int

const (
	// TLSOff refuses NBD_OPT_STARTTLS with NBD_REP_ERR_UNSUP; everything
	// is in the clear.
	TLSOff TLSMode = iota
	// TLSAllow lets clients upgrade with NBD_OPT_STARTTLS, and serves
	// clients that do not in the clear.
	TLSAllow
	// TLSRequire is the spec's forced TLS: before STARTTLS every option
	// other than STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD,
	// and NBD_OPT_EXPORT_NAME closes the connection.
	TLSRequire
)

// String returns the mode's name as accepted by ParseTLSMode.
func (m TLSMode) String() string {
	switch m {
	case TLSOff:
		return "off"
	case TLSAllow:
		return "allow"
	case TLSRequire:
		return "require"
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// ParseTLSMode parses "off", "allow" or "require" (a command-line flag's
// value) into a TLSMode.
func ParseTLSMode(s string) (TLSMode, error) {
	for _, m := range []TLSMode{TLSOff, TLSAllow, TLSRequire} {
		if s == m.String() {
			return m, nil
		}
	}
	return TLSOff, fmt.Errorf("nbd: TLS mode %q: want off, allow or require", s)
}

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
