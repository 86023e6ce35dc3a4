package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/internal/testpki"
)

// testPKI is a throwaway CA (package testpki) with the TLS configurations
// the server and Go clients of these tests use.
type testPKI struct {
	*testpki.PKI
	// server is the server's TLS configuration, loaded from ServerDir
	// without client verification.
	server *tls.Config
	// client trusts the CA, for Go clients.
	client *tls.Config
}

// newTestPKI makes a CA with server and client certificates, and the
// configurations of both sides.
func newTestPKI(t testing.TB) *testPKI {
	t.Helper()
	p := testpki.New(t)
	server, err := TLSConfigFromDir(p.ServerDir, false)
	require.NoError(t, err)
	return &testPKI{PKI: p, server: server, client: &tls.Config{RootCAs: p.CertPool(), ServerName: testpki.ServerName}}
}

// startTLS sends STARTTLS on rc and switches it to TLS.
func (rc *rawClient) startTLS(cfg *tls.Config) {
	rc.t.Helper()
	rc.sendOption(optStartTLS, nil)
	typ, _ := rc.readOptionReply(optStartTLS)
	require.Equal(rc.t, repAck, typ, "STARTTLS")
	tc := tls.Client(rc.conn, cfg)
	require.NoError(rc.t, tc.Handshake())
	rc.conn = tc
}

func TestStartTLSRequired(t *testing.T) {
	pki := newTestPKI(t)
	mem := newMemBackend(1 << 20)
	srv := NewServer([]Export{{Name: "disk", Backend: mem}}, Options{TLSMode: TLSRequire, TLS: pki.server})

	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	for _, opt := range []uint32{optList, optInfo, optGo, optStructuredReply, optListMetaContext, 99} {
		rc.sendOption(opt, nil)
		typ, msg := rc.readOptionReply(opt)
		assert.Equal(t, repErrTLSReqd, typ, "option %d before TLS", opt)
		assert.Contains(t, string(msg), "TLS")
	}
	rc.sendOption(optStartTLS, []byte{1})
	typ, _ := rc.readOptionReply(optStartTLS)
	assert.Equal(t, repErrInvalid, typ, "STARTTLS with data")

	rc.startTLS(pki.client)
	rc.sendOption(optStartTLS, nil)
	typ, _ = rc.readOptionReply(optStartTLS)
	assert.Equal(t, repErrInvalid, typ, "second STARTTLS")

	rc.sendOption(optList, nil)
	typ, data := rc.readOptionReply(optList)
	require.Equal(t, repServer, typ)
	assert.Equal(t, append([]byte{0, 0, 0, 4}, "disk"...), data)
	typ, _ = rc.readOptionReply(optList)
	require.Equal(t, repAck, typ)

	size, _ := rc.goExport("disk")
	assert.Equal(t, uint64(1<<20), size)
	rc.sendRequest(0, cmdWrite, 1, 4096, 5, []byte("hello"))
	errno, _ := rc.readSimpleReply()
	require.Equal(t, uint32(0), errno)
	rc.sendRequest(0, cmdRead, 2, 4096, 5, nil)
	errno, cookie := rc.readSimpleReply()
	require.Equal(t, uint32(0), errno)
	assert.Equal(t, uint64(2), cookie)
	got := make([]byte, 5)
	rc.read(got)
	assert.Equal(t, "hello", string(got))
	assert.Equal(t, []byte("hello"), mem.data[4096:4101])
	rc.sendRequest(0, cmdDisc, 3, 0, 0, nil)
	rc.requireClosed()

	// EXPORT_NAME cannot be refused, so it closes before TLS.
	rc = dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle)
	rc.sendOption(optExportName, []byte("disk"))
	rc.requireClosed()

	// ABORT is allowed before TLS.
	rc = dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle)
	rc.sendOption(optAbort, nil)
	typ, _ = rc.readOptionReply(optAbort)
	assert.Equal(t, repAck, typ)
	rc.requireClosed()
}

func TestStartTLSForgetsEarlierState(t *testing.T) {
	pki := newTestPKI(t)
	srv := NewServer([]Export{{Name: "disk", Backend: newMemBackend(1 << 20)}}, Options{TLSMode: TLSAllow, TLS: pki.server})
	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	rc.sendOption(optStructuredReply, nil)
	typ, _ := rc.readOptionReply(optStructuredReply)
	require.Equal(t, repAck, typ, "TLS is optional")
	rc.sendOption(optSetMetaContext, metaRequest("disk", metaContextBaseAllocation))
	typ, _ = rc.readOptionReply(optSetMetaContext)
	require.Equal(t, repMetaContext, typ)
	typ, _ = rc.readOptionReply(optSetMetaContext)
	require.Equal(t, repAck, typ)

	rc.startTLS(pki.client)
	rc.sendOption(optSetMetaContext, metaRequest("disk", metaContextBaseAllocation))
	typ, _ = rc.readOptionReply(optSetMetaContext)
	assert.Equal(t, repErrInvalid, typ, "structured replies were negotiated before TLS only")
	rc.goExport("disk")
	rc.sendRequest(0, cmdBlockStatus, 1, 0, 4096, nil)
	errno, _ := rc.readSimpleReply()
	assert.Equal(t, errInval, errno, "no metadata context after TLS")
	rc.sendRequest(0, cmdDisc, 2, 0, 0, nil)
	rc.requireClosed()
}

func TestTLSModeParseAndConfig(t *testing.T) {
	for _, m := range []TLSMode{TLSOff, TLSAllow, TLSRequire} {
		got, err := ParseTLSMode(m.String())
		require.NoError(t, err)
		assert.Equal(t, m, got)
	}
	_, err := ParseTLSMode("forced")
	assert.ErrorContains(t, err, `"forced"`)
	assert.Panics(t, func() {
		NewServer([]Export{{Name: "disk", Backend: newMemBackend(4096)}}, Options{TLSMode: TLSAllow})
	})
}

// tlsURI returns the nbds:// URI of export name, trusting the test CA.
func tlsURI(ts *testServer, pki *testPKI, name string) string {
	return "nbds://" + ts.addr + "/" + name + "?tls-certificates=" + pki.CADir
}

func TestTLSInteropQemu(t *testing.T) {
	qemuIO := requireTool(t, "qemu-io", "qemu-utils")
	pki := newTestPKI(t)
	mem := newMemBackend(4 << 20)
	ts := startServer(t, []Export{{Name: "mem", Backend: mem}}, Options{TLSMode: TLSRequire, TLS: pki.server}, false)
	host, port, err := net.SplitHostPort(ts.addr)
	require.NoError(t, err)
	image := strings.Join([]string{
		"driver=nbd", "server.type=inet", "server.host=" + host, "server.port=" + port,
		"export=mem", "tls-creds=tls0",
	}, ",")
	out := runTool(t, qemuIO,
		"--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+pki.CADir,
		"--image-opts", image,
		"-c", "write -P 0x5a 8k 12k",
		"-c", "read -P 0x5a 8k 12k",
		"-c", "read -P 0 0 8k")
	assert.NotContains(t, out, "Pattern verification failed")
	assert.Equal(t, bytes.Repeat([]byte{0x5a}, 12<<10), mem.data[8<<10:20<<10])

	// The same client without TLS is refused.
	out, err = runToolStatus(t, qemuIO, "-f", "raw", "-c", "read 0 4k", ts.uri("mem"))
	assert.Error(t, err)
	assert.Contains(t, out, "TLS")
}

func TestTLSInteropAllowed(t *testing.T) {
	py := libnbdPython(t)
	pki := newTestPKI(t)
	ts := startServer(t, []Export{{Name: "mem", Backend: newMemBackend(1 << 20)}}, Options{TLSMode: TLSAllow, TLS: pki.server}, false)
	script := `
import sys, nbd
for tls in (False, True):
    h = nbd.NBD()
    if tls:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(sys.argv[2])
    h.set_export_name("mem")
    host, port = sys.argv[1].rsplit(":", 1)
    h.connect_tcp(host, port)
    assert h.get_tls_negotiated() == tls, tls
    h.pwrite(b"tls=%d" % tls, 512 * tls)
    assert h.pread(5, 512 * tls) == b"tls=%d" % tls
    h.shutdown()
print("ok")
`
	out := runTool(t, py, "-c", script, ts.addr, pki.CADir)
	assert.Contains(t, out, "ok")
}

func TestTLSClientCertificates(t *testing.T) {
	py := libnbdPython(t)
	pki := newTestPKI(t)
	verifying, err := TLSConfigFromDir(pki.ServerDir, true)
	require.NoError(t, err)
	ts := startServer(t, []Export{{Name: "mem", Backend: newMemBackend(1 << 20)}}, Options{TLSMode: TLSRequire, TLS: verifying}, false)
	script := `
import sys, nbd
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[2])
h.set_export_name("mem")
host, port = sys.argv[1].rsplit(":", 1)
try:
    h.connect_tcp(host, port)
except nbd.Error as e:
    print("refused:", e)
    sys.exit(0)
h.pwrite(b"certified", 0)
assert h.pread(9, 0) == b"certified"
h.shutdown()
print("connected")
`
	out := runTool(t, py, "-c", script, ts.addr, pki.ClientDir)
	assert.Equal(t, "connected\n", out, "client with a certificate")
	out = runTool(t, py, "-c", script, ts.addr, pki.CADir)
	assert.Contains(t, out, "refused:", "client without a certificate")

	_, err = TLSConfigFromDir(pki.CADir, false)
	assert.ErrorContains(t, err, pki.CADir, "no server certificate")
	_, err = TLSConfigFromDir(pki.ClientDir, true)
	assert.ErrorContains(t, err, "server-cert.pem")
}

// tlsTransmitting returns a raw client that upgraded to TLS and is in
// transmission on export name.
func tlsTransmitting(t *testing.T, srv *Server, pki *testPKI, name string) *rawClient {
	t.Helper()
	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	rc.startTLS(pki.client)
	rc.goExport(name)
	return rc
}

// Shutdown works through TLS: the read deadline that stops the reader does
// not break the TLS stream, so a request half-received is still read whole
// and answered.
func TestShutdownOverTLS(t *testing.T) {
	pki := newTestPKI(t)
	srv := NewServer([]Export{{Name: "disk", Backend: newMemBackend(1 << 20)}}, Options{TLSMode: TLSRequire, TLS: pki.server})
	idle := tlsTransmitting(t, srv, pki, "disk")
	rc := tlsTransmitting(t, srv, pki, "disk")
	req := encodeRequest(0, cmdWrite, 9, 0, 4)
	rc.write(req[:10])
	srv.mu.Lock()
	for c := range srv.conns {
		c.beginShutdown()
	}
	srv.mu.Unlock()
	idle.requireClosed()
	rc.write(append(req[10:], "abcd"...))
	errno, cookie := rc.readSimpleReply()
	assert.Equal(t, errShutdown, errno)
	assert.Equal(t, uint64(9), cookie)
	rc.requireClosed()
	require.NoError(t, srv.Shutdown(context.Background()))
}
