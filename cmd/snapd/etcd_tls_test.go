package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/internal/testpki"
	"github.com/clustersnap/clustersnap/lockc/etcd"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"github.com/clustersnap/clustersnap/volumes"
)

// snapd serve --lock etcd reaches an etcd that requires client
// certificates with --etcd-cacert, --etcd-cert and --etcd-key, and serves;
// with a CA that did not sign the server's certificate, or without a
// client certificate, it exits 1 within the engine's dial timeout, names
// what TLS refused when the refusal is its own, and leaves the COW as it
// was.
func TestServeEtcdTLS(t *testing.T) {
	qemuIO := tool(t, "qemu-io", "qemu-utils")
	nbdcopy := tool(t, "nbdcopy", "libnbd-bin")
	bin := buildSnapd(t)
	f := newFixture(t, bin, 4<<20, 19)
	pki, stranger := testpki.New(t), testpki.New(t)
	server := etcdtest.StartTLS(t, pki)
	sock := filepath.Join(f.dir, "nbd.sock")
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
	serveArgs := func(tlsArgs ...string) []string {
		return append([]string{"--origin", f.origin, "--snapshot", "snap=" + f.cow, "--listen", "", "--socket", sock,
			"--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", server.Endpoint(0)}, tlsArgs...)
	}

	cowBefore, err := os.ReadFile(f.cow)
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		tls  []string
		want string
	}{
		{"server certificate of an untrusted CA", []string{"--etcd-cacert", stranger.CACert(), "--etcd-cert", pki.ClientCert(), "--etcd-key", pki.ClientKey()},
			"x509: certificate signed by unknown authority"},
		// The server refuses the handshake; the client reads its
		// alert or finds the connection closed, whichever comes first.
		{"no client certificate", []string{"--etcd-cacert", pki.CACert()}, ""},
	} {
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		var stderr bytes.Buffer
		cmd := exec.CommandContext(ctx, bin, append([]string{"serve"}, serveArgs(tc.tls...)...)...)
		cmd.Stderr = &stderr
		start := time.Now()
		err := cmd.Run()
		elapsed := time.Since(start)
		cancel()
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee, "%s: %s", tc.name, stderr.String())
		assert.Equal(t, exitError, ee.ExitCode(), "%s: %s", tc.name, stderr.String())
		assert.Less(t, elapsed, 2*etcd.DefaultDialTimeout, "%s: serve gave up on etcd by itself", tc.name)
		assert.Contains(t, stderr.String(), "lease from etcd at "+server.Endpoint(0), tc.name)
		if tc.want != "" {
			assert.Contains(t, stderr.String(), tc.want, "%s: the error says why", tc.name)
		}
		cowAfter, err := os.ReadFile(f.cow)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(cowBefore, cowAfter), "%s: the COW is untouched", tc.name)
	}

	ctl := filepath.Join(f.dir, "control.sock")
	srv := startServe(t, bin, append(serveArgs("--etcd-cacert", pki.CACert(), "--etcd-cert", pki.ClientCert(), "--etcd-key", pki.ClientKey()), "--control", ctl)...)
	// The origin write copies its chunks under the COW's lock in EX,
	// which the node takes from etcd.
	run1(t, qemuIO, "-f", "raw", uri("origin"), "-c", "write -P 0xab 0 64k", "-c", "flush")
	snapOut := filepath.Join(f.dir, "snap.out")
	run1(t, nbdcopy, uri("snap"), snapOut)
	got, err := os.ReadFile(snapOut)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(f.orig, got), "the snapshot shows the origin as it was before the write")

	var live volumes.Status
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "status", "--control", ctl, "--json")), &live))
	require.NotNil(t, live.Cluster)
	assert.Equal(t, "etcd", live.Cluster.Engine)
	assert.False(t, live.Cluster.Lost)
	require.Len(t, live.Snapshots, 1)
	assert.Equal(t, uint64(16), live.Snapshots[0].Exceptions, "the write's 16 chunks were copied")
	require.NotNil(t, live.Snapshots[0].Cluster)
	assert.Positive(t, live.Snapshots[0].Cluster.UpConverts, "copying took the COW's lock in EX")
	code, _ := srv.stop(t)
	assert.Equal(t, 0, code, srv.stderr.String())
}
