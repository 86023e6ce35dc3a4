package etcd

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.etcd.io/etcd/client/pkg/v3/transport"

	"github.com/clustersnap/clustersnap/internal/testpki"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
)

// tlsEngine makes an Engine on endpoints whose TLS configuration comes
// from PEM files as snapd's --etcd-cacert, --etcd-cert and --etcd-key
// make it (volumes' openEtcd), and closes it at cleanup.
func tlsEngine(t *testing.T, endpoints []string, caFile, certFile, keyFile string, dialTimeout time.Duration) *Engine {
	t.Helper()
	info := transport.TLSInfo{TrustedCAFile: caFile, CertFile: certFile, KeyFile: keyFile}
	tc, err := info.ClientConfig()
	require.NoError(t, err)
	o := testOptions()
	o.Endpoints, o.TLS, o.DialTimeout = endpoints, tc, dialTimeout
	e, err := New(o)
	require.NoError(t, err)
	t.Cleanup(func() { e.Close() })
	return e
}

// Two nodes reach an etcd that requires client certificates, over TLS
// with certificates of its CA, and share a lock and its LVB there.
func TestTLSClientCertificates(t *testing.T) {
	pki := testpki.New(t)
	server := etcdtest.StartTLS(t, pki)
	require.Regexp(t, `^https://127\.0\.0\.1:\d+$`, server.Endpoint(0))
	ctx := t.Context()

	var spaces [2]lockc.Lockspace
	for i := range spaces {
		e := tlsEngine(t, server.Endpoints(), pki.CACert(), pki.ClientCert(), pki.ClientKey(), DefaultDialTimeout)
		ls, err := e.Open(ctx, "tls")
		require.NoError(t, err, "node %d", i)
		spaces[i] = ls
	}
	a, err := spaces[0].Lock(ctx, []byte("r"), lockc.EX)
	require.NoError(t, err)
	// The second node holds the resource in NL, so it (and its LVB)
	// outlives the first node's unlock.
	b, err := spaces[1].Lock(ctx, []byte("r"), lockc.NL)
	require.NoError(t, err)
	require.ErrorIs(t, b.Convert(ctx, lockc.EX, lockc.NoQueue), lockc.ErrWouldBlock, "the first node holds EX")
	a.SetLVB(lockc.LVB{1, 2, 3})
	require.NoError(t, a.Unlock(ctx))
	require.NoError(t, b.Convert(ctx, lockc.EX))
	lvb, state := b.LVB()
	assert.Equal(t, lockc.LVBValid, state)
	assert.Equal(t, lockc.LVB{1, 2, 3}, lvb, "the LVB the first node published")
	require.NoError(t, b.Unlock(ctx))
}

// A node that cannot complete the TLS handshake with etcd (no client
// certificate, a client certificate of another CA, a server certificate
// of a CA it does not trust) fails Open within the dial timeout; when the
// client itself refused, the error says why.
func TestTLSRefused(t *testing.T) {
	pki, stranger := testpki.New(t), testpki.New(t)
	server := etcdtest.StartTLS(t, pki)
	const dialTimeout = 2 * time.Second
	for _, tc := range []struct {
		name                      string
		caFile, certFile, keyFile string
		want                      string
	}{
		// The server refuses these after the client's side of the
		// handshake: the client reads its alert, or finds the
		// connection closed, whichever comes first.
		{"no client certificate", pki.CACert(), "", "", ""},
		{"client certificate of another CA", pki.CACert(), stranger.ClientCert(), stranger.ClientKey(), ""},
		// The client refuses this one itself.
		{"server certificate of an untrusted CA", stranger.CACert(), pki.ClientCert(), pki.ClientKey(), "x509: certificate signed by unknown authority"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := tlsEngine(t, server.Endpoints(), tc.caFile, tc.certFile, tc.keyFile, dialTimeout)
			start := time.Now()
			ls, err := e.Open(context.Background(), "tls")
			elapsed := time.Since(start)
			require.Error(t, err)
			assert.Nil(t, ls)
			assert.Less(t, elapsed, 2*dialTimeout, "Open gave up within the dial timeout")
			assert.ErrorIs(t, err, context.DeadlineExceeded)
			assert.ErrorContains(t, err, "lease from etcd at "+server.Endpoint(0))
			if tc.want != "" {
				assert.ErrorContains(t, err, tc.want, "the error says why")
			}
		})
	}
}
