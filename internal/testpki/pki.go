package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Names of the files in a PKI's directories, the layout qemu and libnbd
// read.
const (
	CAFile         = "ca-cert.pem"
	ServerCertFile = "server-cert.pem"
	ServerKeyFile  = "server-key.pem"
	ClientCertFile = "client-cert.pem"
	ClientKeyFile  = "client-key.pem"
)

// ServerName is the name the server certificate is for, besides the
// loopback addresses.
const ServerName = "localhost"

// PKI is a certificate authority and the certificates it signed, on disk.
type PKI struct {
	// CADir holds CAFile only: what a client needs to check the server
	// and nothing to present of its own.
	CADir string
	// ServerDir holds CAFile, ServerCertFile and ServerKeyFile.
	ServerDir string
	// ClientDir holds CAFile, ClientCertFile and ClientKeyFile.
	ClientDir string

	ca *x509.Certificate
}

// New makes a CA, its server and client certificates and their
// directories. It fails tb if it cannot.
func New(tb testing.TB) *PKI {
	tb.Helper()
	now := time.Now()
	caKey := newKey(tb)
	caTemplate := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "clustersnap test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		tb.Fatalf("testpki: CA certificate: %v", err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		tb.Fatalf("testpki: CA certificate: %v", err)
	}

	// leaf signs template with the CA and returns its DER and PKCS#8 key.
	leaf := func(template *x509.Certificate) (certDER, keyDER []byte) {
		key := newKey(tb)
		template.NotBefore = now.Add(-time.Hour)
		template.NotAfter = now.Add(24 * time.Hour)
		template.KeyUsage = x509.KeyUsageDigitalSignature
		certDER, err := x509.CreateCertificate(rand.Reader, template, ca, &key.PublicKey, caKey)
		if err != nil {
			tb.Fatalf("testpki: certificate %s: %v", template.Subject.CommonName, err)
		}
		keyDER, err = x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			tb.Fatalf("testpki: key of %s: %v", template.Subject.CommonName, err)
		}
		return certDER, keyDER
	}
	serverDER, serverKey := leaf(&x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: ServerName},
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{ServerName},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
	})
	clientDER, clientKey := leaf(&x509.Certificate{
		SerialNumber: big.NewInt(3),
		Subject:      pkix.Name{CommonName: "client"},
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})

	p := &PKI{CADir: tb.TempDir(), ServerDir: tb.TempDir(), ClientDir: tb.TempDir(), ca: ca}
	for _, dir := range []string{p.CADir, p.ServerDir, p.ClientDir} {
		writePEM(tb, dir, CAFile, "CERTIFICATE", caDER)
	}
	writePEM(tb, p.ServerDir, ServerCertFile, "CERTIFICATE", serverDER)
	writePEM(tb, p.ServerDir, ServerKeyFile, "PRIVATE KEY", serverKey)
	writePEM(tb, p.ClientDir, ClientCertFile, "CERTIFICATE", clientDER)
	writePEM(tb, p.ClientDir, ClientKeyFile, "PRIVATE KEY", clientKey)
	return p
}

// CACert is the CA certificate's file.
func (p *PKI) CACert() string { return filepath.Join(p.CADir, CAFile) }

// ServerCert is the server certificate's file.
func (p *PKI) ServerCert() string { return filepath.Join(p.ServerDir, ServerCertFile) }

// ServerKey is the server key's file.
func (p *PKI) ServerKey() string { return filepath.Join(p.ServerDir, ServerKeyFile) }

// ClientCert is the client certificate's file.
func (p *PKI) ClientCert() string { return filepath.Join(p.ClientDir, ClientCertFile) }

// ClientKey is the client key's file.
func (p *PKI) ClientKey() string { return filepath.Join(p.ClientDir, ClientKeyFile) }

// CertPool returns a pool that trusts the CA alone.
func (p *PKI) CertPool() *x509.CertPool {
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	return pool
}

func newKey(tb testing.TB) *ecdsa.PrivateKey {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatalf("testpki: key: %v", err)
	}
	return key
}

// writePEM writes one PEM block to dir/name, readable by its owner only.
func writePEM(tb testing.TB, dir, name, typ string, der []byte) {
	tb.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		tb.Fatalf("testpki: %v", err)
	}
}
