package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/lockc/etcd"
	"github.com/clustersnap/clustersnap/persistent"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(context.Background(), args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func sparse(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, name)
	require.NoError(t, blockdev.Create(p, size))
	return p
}

func TestDemoShowsTheSnapshotSurvivingAReload(t *testing.T) {
	code, out, errOut := runCLI(t, "demo", "--writes", "50", "--no-serve")
	require.Equal(t, exitOK, code, errOut)
	assert.Contains(t, out, "identical to the origin before the writes")
	assert.Contains(t, out, "exceptions: 50 of 4,079")
}

func TestCreateAndStatus(t *testing.T) {
	dir := t.TempDir()
	origin := sparse(t, dir, "origin", 8<<20)
	cow := filepath.Join(dir, "cow")
	code, out, errOut := runCLI(t, "create", "--origin", origin, "--cow", cow, "--cow-size", "1MiB")
	require.Equal(t, exitOK, code, errOut)
	assert.Contains(t, out, "status: 16/2048 16")

	code, out, errOut = runCLI(t, "status", "--json", cow)
	require.Equal(t, exitOK, code, errOut)
	var reports []statusReport
	require.NoError(t, json.Unmarshal([]byte(out), &reports))
	require.Len(t, reports, 1)
	assert.Equal(t, "valid", reports[0].State)
	assert.Equal(t, uint64(4096), reports[0].ChunkSize)
	assert.Equal(t, "16/2048 16", reports[0].Status)
	assert.Equal(t, uint64(254), reports[0].Capacity, "256 chunks: header, area 0, 254 data")
	require.NotNil(t, reports[0].Label, "create labels the COW")
	id := reports[0].Label.UUID
	assert.False(t, id.IsZero())
	assert.Equal(t, exstore.Label{UUID: id}, *reports[0].Label, "a UUID, no cluster, no origin yet")
	assert.Empty(t, reports[0].LabelError)
	assert.Contains(t, out, `"uuid": "`+id.String()+`"`)

	code, out, errOut = runCLI(t, "status", cow)
	require.Equal(t, exitOK, code, errOut)
	assert.Contains(t, out, "uuid:       "+id.String())
	assert.Contains(t, out, "cluster:    (none yet)")
	code, out, errOut = runCLI(t, "check", cow)
	require.Equal(t, exitOK, code, errOut)
	assert.Contains(t, out, "uuid:       "+id.String())

	// A second create refuses the COW that now holds a snapshot.
	code, _, errOut = runCLI(t, "create", "--origin", origin, "--cow", cow)
	assert.Equal(t, exitError, code)
	assert.Contains(t, errOut, "already holds data")
	code, out, errOut = runCLI(t, "create", "--origin", origin, "--cow", cow, "--force", "--chunk-size", "8KiB")
	assert.Equal(t, exitOK, code, errOut)
	assert.NotContains(t, out, id.String(), "a new COW gets a new UUID")
}

func TestCheckAndStatusRefuseADamagedLabel(t *testing.T) {
	dir := t.TempDir()
	origin := sparse(t, dir, "origin", 8<<20)
	cow := filepath.Join(dir, "cow")
	code, _, errOut := runCLI(t, "create", "--origin", origin, "--cow", cow, "--cow-size", "1MiB")
	require.Equal(t, exitOK, code, errOut)
	f, err := os.OpenFile(cow, os.O_RDWR, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte{0xff}, 16+30) // inside the origin size field
	require.NoError(t, err)
	require.NoError(t, f.Close())

	code, out, _ := runCLI(t, "check", cow)
	assert.Equal(t, exitError, code, "a damaged label fails the check")
	assert.Contains(t, out, "label:      unusable:")
	assert.Contains(t, out, "checksum")
	code, out, errOut = runCLI(t, "status", "--json", cow)
	require.Equal(t, exitOK, code, errOut)
	var reports []statusReport
	require.NoError(t, json.Unmarshal([]byte(out), &reports))
	require.Len(t, reports, 1)
	assert.Nil(t, reports[0].Label)
	assert.Contains(t, reports[0].LabelError, "checksum")
}

func TestBadInputIsRefusedAndWritesNothing(t *testing.T) {
	dir := t.TempDir()
	origin := sparse(t, dir, "origin", 8<<20)
	cow := sparse(t, dir, "cow", 1<<20)
	tiny := sparse(t, dir, "tiny", 8192)
	corrupt := sparse(t, dir, "corrupt", 1<<20)
	f, err := os.OpenFile(corrupt, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt([]byte("NOPE-not-a-cow"), 0)
	require.NoError(t, err)
	require.NoError(t, f.Close())

	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"missing origin", []string{"create", "--origin", filepath.Join(dir, "nope"), "--cow", cow}, exitError, "origin"},
		{"missing cow", []string{"create", "--origin", origin, "--cow", filepath.Join(dir, "nope")}, exitError, "--cow-size"},
		{"bad chunk size", []string{"create", "--origin", origin, "--cow", cow, "--chunk-size", "3KiB"}, exitUsage, "power of two"},
		{"unparsable chunk size", []string{"create", "--origin", origin, "--cow", cow, "--chunk-size", "lots"}, exitUsage, "--chunk-size"},
		{"cow is origin", []string{"create", "--origin", origin, "--cow", origin}, exitError, "is the origin itself"},
		{"cow below three chunks", []string{"create", "--origin", origin, "--cow", tiny}, exitError, "fewer than 3 chunks"},
		{"unknown flag", []string{"create", "--bogus"}, exitUsage, "bogus"},
		{"unknown command", []string{"frobnicate"}, exitUsage, "unknown command"},
		{"status of a zero cow", []string{"status", cow}, exitError, "header is zero"},
		{"status of a corrupt cow", []string{"status", corrupt}, exitError, "bad magic 4e 4f 50 45"},
		{"status of a missing cow", []string{"status", filepath.Join(dir, "nope")}, exitError, "no such file"},
		{"check of a zero cow", []string{"check", cow}, exitError, "header is zero"},
		{"check of a corrupt cow", []string{"check", corrupt}, exitError, "bad magic"},
		{"merge without cow", []string{"merge", "--origin", origin}, exitUsage, "--cow are required"},
		{"merge of a zero cow", []string{"merge", "--origin", origin, "--cow", cow}, exitError, "header is zero"},
		{"merge onto itself", []string{"merge", "--origin", origin, "--cow", origin}, exitError, "is the origin itself"},
		{"attach without the nbd module", []string{"attach", "--connect", "127.0.0.1:1", "--export", "snap", filepath.Join(dir, "nbd0")}, exitError, "modprobe nbd"},
		{"attach with two servers", []string{"attach", "--connect", "a:1", "--socket", "s", "--export", "x", "/dev/nbd0"}, exitUsage, "exactly one of"},
		{"tls without certificates", []string{"serve", "--origin", origin, "--tls", "require"}, exitUsage, "needs --tls-dir"},
		{"unknown tls mode", []string{"serve", "--origin", origin, "--tls", "maybe"}, exitUsage, "--tls"},
		{"missing tls directory", []string{"serve", "--origin", origin, "--tls", "allow", "--tls-dir", filepath.Join(dir, "nope")}, exitError, "nope"},
		{"unknown default export", []string{"serve", "--origin", origin, "--default-export", "snap", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, `--default-export "snap": no such export`},
		{"transient store without chunk size", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow + ",type=N", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "chunk size"},
		{"unknown store type", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow + ",type=X", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "known: persistent (P), transient (N)"},
		{"clustered transient store", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow + ",type=N,chunk=4KiB", "--cluster-id", "c1", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "cannot be clustered"},
		{"dlm with buffered devices", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "dlm", "--direct=false", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "must be opened with O_DIRECT"},
		{"merge step without a cluster", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--merge-step", "1MiB", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "only with a cluster"},
		{"zero merge step", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--merge-step", "0", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "--merge-step \"0\": want a positive size"},
		{"lockspace without a cluster", []string{"serve", "--origin", origin, "--lockspace", "ls", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "need --cluster-id"},
		{"etcd endpoints without a cluster", []string{"serve", "--origin", origin, "--etcd-endpoints", "http://127.0.0.1:2379", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "need --cluster-id"},
		{"etcd flags with the dlm", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "dlm", "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-lease-ttl", "2s", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "--etcd-endpoints, --etcd-lease-ttl: only with --lock etcd"},
		{"etcd flags with the default engine", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--etcd-prefix", "/p/", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "--etcd-prefix: only with --lock etcd"},
		{"etcd without endpoints", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "--lock etcd needs --etcd-endpoints"},
		{"etcd empty endpoint", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379,", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "empty endpoint"},
		{"etcd TLS over plaintext", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379,http://127.0.0.1:2380", "--etcd-cacert", origin, "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, `"http://127.0.0.1:2380": plaintext`},
		{"etcd certificate without its key", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cert", origin, "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "certificate and its key go together"},
		{"etcd missing CA file", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cacert", filepath.Join(dir, "nope.pem"), "--listen", "", "--socket", filepath.Join(dir, "s")}, exitError, "nope.pem"},
		{"etcd client certificate that is not one", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cert", tiny, "--etcd-key", tiny, "--listen", "", "--socket", filepath.Join(dir, "s")}, exitError, "lock engine etcd: TLS"},
		{"etcd lease below a second", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-lease-ttl", "500ms", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitError, "lease TTL 500ms"},
		{"etcd with buffered devices", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", "unix:///nonexistent", "--direct=false", "--listen", "", "--socket", filepath.Join(dir, "s")}, exitUsage, "lock engine etcd shares the devices with other nodes, so they must be opened with O_DIRECT"},
		{"serve of a zero cow", []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--listen", "", "--socket", filepath.Join(dir, "s")}, exitError, "header is zero"},
		{"detach without the nbd module", []string{"detach", filepath.Join(dir, "nbd0")}, exitError, "modprobe nbd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := map[string][]byte{}
			for _, p := range []string{origin, cow, tiny, corrupt} {
				b, err := os.ReadFile(p)
				require.NoError(t, err)
				before[p] = b
			}
			code, _, errOut := runCLI(t, tc.args...)
			assert.Equal(t, tc.code, code)
			assert.Contains(t, errOut, tc.want)
			if tc.code == exitError {
				assert.Equal(t, 1, strings.Count(errOut, "\n"), "a failure is one line: %q", errOut)
			}
			for p, b := range before {
				after, err := os.ReadFile(p)
				require.NoError(t, err)
				assert.True(t, bytes.Equal(b, after), "%s changed", p)
			}
		})
	}
}

func TestMergeRefusesAnInvalidSnapshotAndCheckSaysWhere(t *testing.T) {
	dir := t.TempDir()
	origin := sparse(t, dir, "origin", 8<<20)
	cowPath := filepath.Join(dir, "cow")
	code, _, errOut := runCLI(t, "create", "--origin", origin, "--cow", cowPath, "--cow-size", "1MiB")
	require.Equal(t, exitOK, code, errOut)

	// A record pointing past the end of the COW, as corruption would leave.
	dev, err := blockdev.Open(cowPath, blockdev.Options{})
	require.NoError(t, err)
	rec := make([]byte, 16)
	persistent.EncodeRecord(rec, 0, exstore.Exception{Old: 3, New: 99999})
	_, err = dev.WriteAt(rec, 4096)
	require.NoError(t, err)
	require.NoError(t, dev.Close())
	code, out, errOut := runCLI(t, "check", cowPath)
	assert.Equal(t, exitError, code)
	assert.Contains(t, out, "error: area 0 slot 0: 3→99999: COW chunk 99999 is past the end")
	assert.Contains(t, errOut, "1 metadata errors, the first at area 0 slot 0")

	// An invalidated snapshot cannot be merged, and the origin is untouched.
	require.NoError(t, os.Remove(cowPath))
	code, _, errOut = runCLI(t, "create", "--origin", origin, "--cow", cowPath, "--cow-size", "1MiB")
	require.Equal(t, exitOK, code, errOut)
	dev, err = blockdev.Open(cowPath, blockdev.Options{})
	require.NoError(t, err)
	s, err := persistent.Open(context.Background(), dev, persistent.Options{NoFormat: true})
	require.NoError(t, err)
	require.NoError(t, s.Invalidate(context.Background(), errors.New("test")))
	require.NoError(t, s.Close())
	require.NoError(t, dev.Close())
	before, err := os.ReadFile(origin)
	require.NoError(t, err)
	code, _, errOut = runCLI(t, "merge", "--origin", origin, "--cow", cowPath)
	assert.Equal(t, exitError, code)
	assert.Contains(t, errOut, "cannot merge an invalid snapshot")
	after, err := os.ReadFile(origin)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(before, after), "origin unchanged")
}

// serve --lock dlm on a host without a running kernel DLM says so, and
// writes nothing.
func TestServeDLMWithoutDLM(t *testing.T) {
	if _, err := os.Stat("/sys/kernel/config/dlm/cluster"); err == nil {
		t.Skip("this host runs a DLM cluster")
	}
	dir := t.TempDir()
	origin := sparse(t, dir, "origin", 8<<20)
	cow := sparse(t, dir, "cow", 1<<20)
	code, _, errOut := runCLI(t, "create", "--origin", origin, "--cow", cow)
	require.Equal(t, exitOK, code, errOut)
	before, err := os.ReadFile(cow)
	require.NoError(t, err)
	code, _, errOut = runCLI(t, "serve", "--origin", origin, "--snapshot", "s="+cow, "--cluster-id", "c1", "--lock", "dlm", "--listen", "", "--socket", filepath.Join(dir, "s"))
	assert.Equal(t, exitError, code)
	if !strings.Contains(errOut, "O_DIRECT") {
		assert.Contains(t, errOut, "DLM", "the error names what is missing")
	}
	after, err := os.ReadFile(cow)
	require.NoError(t, err)
	assert.Equal(t, before, after, "the COW is untouched")
}

// serve --lock etcd with no etcd at its endpoint fails within the engine's
// dial timeout, says which endpoints it tried, and writes nothing.
func TestServeEtcdWithoutServer(t *testing.T) {
	dir := t.TempDir()
	origin := sparse(t, dir, "origin", 8<<20)
	cow := sparse(t, dir, "cow", 1<<20)
	code, _, errOut := runCLI(t, "create", "--origin", origin, "--cow", cow)
	require.Equal(t, exitOK, code, errOut)
	before, err := os.ReadFile(cow)
	require.NoError(t, err)
	// Nothing interrupts serve: it must give up by itself, within the
	// engine's dial timeout, so that a supervisor sees the failure.
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	var out, errBuf bytes.Buffer
	start := time.Now()
	code = run(ctx, []string{"serve", "--origin", origin, "--snapshot", "s=" + cow, "--cluster-id", "c1", "--lock", "etcd",
		"--etcd-endpoints", "unix://" + filepath.Join(dir, "no-etcd.sock"), "--listen", "", "--socket", filepath.Join(dir, "s")}, &out, &errBuf)
	assert.Less(t, time.Since(start), 2*etcd.DefaultDialTimeout, "serve gave up on etcd by itself")
	assert.Equal(t, exitError, code, errBuf.String())
	assert.Contains(t, errBuf.String(), "snapshot s:", "the error names what could not be served")
	assert.Contains(t, errBuf.String(), "lease from etcd at unix://", "the error names etcd's endpoints")
	assert.NotContains(t, out.String(), "serving:")
	after, err := os.ReadFile(cow)
	require.NoError(t, err)
	assert.Equal(t, before, after, "the COW is untouched")
}

// serve --help documents the etcd engine's flags.
func TestServeHelpNamesTheEtcdFlags(t *testing.T) {
	code, _, errOut := runCLI(t, "serve", "--help")
	require.Equal(t, exitOK, code)
	for _, f := range []string{"--lock\t", "etcd (an etcd cluster", "--etcd-endpoints", "--etcd-cacert", "--etcd-cert", "--etcd-key", "--etcd-prefix", "--etcd-lease-ttl"} {
		assert.Contains(t, errOut, f)
	}
}
