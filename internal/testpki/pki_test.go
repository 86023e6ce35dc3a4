package testpki_test

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/internal/testpki"
)

func readCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	block, _ := pem.Decode(data)
	require.NotNil(t, block, "%s: no PEM", path)
	cert, err := x509.ParseCertificate(block.Bytes)
	require.NoError(t, err)
	return cert
}

// The certificates verify against their own CA, for the names and uses
// they are for, and not against another PKI's.
func TestCertificatesVerify(t *testing.T) {
	p, stranger := testpki.New(t), testpki.New(t)
	server := readCert(t, p.ServerCert())
	for _, name := range []string{"localhost", "127.0.0.1", "::1"} {
		_, err := server.Verify(x509.VerifyOptions{Roots: p.CertPool(), DNSName: name})
		assert.NoError(t, err, "server certificate for %s", name)
	}
	_, err := server.Verify(x509.VerifyOptions{Roots: p.CertPool(), DNSName: "example.com"})
	assert.Error(t, err, "server certificate for another name")
	_, err = server.Verify(x509.VerifyOptions{Roots: stranger.CertPool(), DNSName: "localhost"})
	assert.Error(t, err, "server certificate against another CA")

	client := readCert(t, p.ClientCert())
	clientUse := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	_, err = client.Verify(x509.VerifyOptions{Roots: p.CertPool(), KeyUsages: clientUse})
	assert.NoError(t, err, "client certificate")
	_, err = client.Verify(x509.VerifyOptions{Roots: stranger.CertPool(), KeyUsages: clientUse})
	assert.Error(t, err, "client certificate against another CA")

	for _, dir := range []string{p.CADir, p.ServerDir, p.ClientDir} {
		assert.Equal(t, readCert(t, p.CACert()).Raw, readCert(t, dir+"/"+testpki.CAFile).Raw, "%s has the CA", dir)
	}
	entries, err := os.ReadDir(p.CADir)
	require.NoError(t, err)
	assert.Len(t, entries, 1, "the CA directory holds the CA certificate only")
}

// The key files match their certificates: a mutually authenticated
// handshake succeeds with them.
func TestMutualHandshake(t *testing.T) {
	p := testpki.New(t)
	serverCert, err := tls.LoadX509KeyPair(p.ServerCert(), p.ServerKey())
	require.NoError(t, err)
	clientCert, err := tls.LoadX509KeyPair(p.ClientCert(), p.ClientKey())
	require.NoError(t, err)
	sc, cc := net.Pipe()
	defer sc.Close()
	defer cc.Close()
	srv := tls.Server(sc, &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: p.CertPool()})
	cli := tls.Client(cc, &tls.Config{Certificates: []tls.Certificate{clientCert}, RootCAs: p.CertPool(), ServerName: testpki.ServerName})
	done := make(chan error, 1)
	go func() { done <- srv.HandshakeContext(t.Context()) }()
	require.NoError(t, cli.HandshakeContext(t.Context()))
	require.NoError(t, <-done)
	assert.Equal(t, "client", srv.ConnectionState().PeerCertificates[0].Subject.CommonName)
}
