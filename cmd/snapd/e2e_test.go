package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"github.com/clustersnap/clustersnap/volumes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// These tests run the built snapd binary against clients nobody here wrote:
// qemu-io writes through the exports and nbdcopy reads them.

// tool finds a client program, or skips (fails when CI=true) naming the
// Debian package that installs it.
func tool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s not found: apt-get install %s", name, pkg)
		}
		t.Skipf("%s not found: apt-get install %s", name, pkg)
	}
	return p
}

// buildSnapd builds the binary under test.
func buildSnapd(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "snapd")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return bin
}

// server is a running snapd serve.
type server struct {
	cmd    *exec.Cmd
	stdout *bufio.Scanner
	lines  []string
	stderr *bytes.Buffer // read only after stop
}

// startServe runs snapd serve and waits until it prints its exports.
func startServe(t *testing.T, bin string, args ...string) *server {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"serve"}, args...)...)
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	s := &server{cmd: cmd, stdout: bufio.NewScanner(out), stderr: &stderr}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	for s.stdout.Scan() {
		s.lines = append(s.lines, s.stdout.Text())
		if strings.HasPrefix(s.stdout.Text(), "stop with") {
			return s
		}
	}
	cmd.Wait()
	t.Fatalf("snapd serve ended before serving: %s\nstderr: %s", strings.Join(s.lines, "\n"), stderr.String())
	return nil
}

// stop sends SIGTERM and returns the exit code and the rest of stdout.
func (s *server) stop(t *testing.T) (int, string) {
	t.Helper()
	require.NoError(t, s.cmd.Process.Signal(syscall.SIGTERM))
	var rest []string
	for s.stdout.Scan() {
		rest = append(rest, s.stdout.Text())
	}
	err := s.cmd.Wait()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return code, strings.Join(rest, "\n")
}

func run1(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %s: %s", name, strings.Join(args, " "), out)
	return string(out)
}

// fixture is an origin with random content and a fresh COW for it.
type fixture struct {
	dir, origin, cow string
	orig             []byte // the origin's content when the snapshot was made
}

// newFixture writes a random origin of size bytes (no zero bytes, so
// zeroed ranges show) and formats a 4 MiB COW for it with the built snapd.
func newFixture(t *testing.T, bin string, size int, seed uint64) fixture {
	t.Helper()
	f := fixture{dir: t.TempDir(), orig: make([]byte, size)}
	rng := rand.New(rand.NewPCG(seed, seed))
	for i := range f.orig {
		f.orig[i] = byte(rng.Uint32()) | 1
	}
	f.origin, f.cow = filepath.Join(f.dir, "origin.img"), filepath.Join(f.dir, "cow.img")
	require.NoError(t, os.WriteFile(f.origin, f.orig, 0o600))
	run1(t, bin, "create", "--origin", f.origin, "--cow", f.cow, "--cow-size", "4MiB")
	return f
}

func TestServeEndToEnd(t *testing.T) {
	qemuIO := tool(t, "qemu-io", "qemu-utils")
	nbdcopy := tool(t, "nbdcopy", "libnbd-bin")
	bin := buildSnapd(t)
	f := newFixture(t, bin, 8<<20, 7)
	dir, origin, cowPath, orig := f.dir, f.origin, f.cow, f.orig

	sock := filepath.Join(dir, "nbd.sock")
	srv := startServe(t, bin, "--origin", origin, "--snapshot", "snap="+cowPath, "--listen", "", "--socket", sock)
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
	assert.Contains(t, strings.Join(srv.lines, "\n"), uri("snap"), "the URIs are printed")

	// A second snapd may not serve the same COW: it is locked.
	second, err := exec.Command(bin, "serve", "--origin", origin, "--snapshot", "snap="+cowPath, "--listen", "", "--socket", sock+"2").CombinedOutput()
	require.Error(t, err)
	assert.Equal(t, 1, err.(*exec.ExitError).ExitCode())
	assert.Contains(t, string(second), "in use by another process")

	// Origin writes through NBD: 16 chunks, 2 more, flushed.
	run1(t, qemuIO, "-f", "raw", uri("origin"), "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 1M 8k", "-c", "flush")
	// A snapshot write, FUA.
	run1(t, qemuIO, "-f", "raw", uri("snap"), "-c", "write -f -P 0xee 2M 4k", "-c", "read -P 0xee 2M 4k")

	// The changed-block map: exactly the chunks the snapshot keeps in its COW.
	nbdinfo := tool(t, "nbdinfo", "libnbd-bin")
	var extents []struct {
		Offset, Length int64
		Type           uint32
	}
	require.NoError(t, json.Unmarshal([]byte(run1(t, nbdinfo, "--map=clustersnap:exceptions", "--json", uri("snap"))), &extents))
	var inCOW [][2]int64
	for _, e := range extents {
		if e.Type&1 != 0 {
			inCOW = append(inCOW, [2]int64{e.Offset, e.Length})
		}
	}
	assert.Equal(t, [][2]int64{{0, 64 << 10}, {1 << 20, 8 << 10}, {2 << 20, 4 << 10}}, inCOW)

	snapOut := filepath.Join(dir, "snap.out")
	run1(t, nbdcopy, uri("snap"), snapOut)
	got, err := os.ReadFile(snapOut)
	require.NoError(t, err)
	want := append([]byte(nil), orig...)
	copy(want[2<<20:], bytes.Repeat([]byte{0xee}, 4096))
	assert.True(t, bytes.Equal(want, got), "the snapshot shows the origin as it was, plus its own write")

	originOut := filepath.Join(dir, "origin.out")
	run1(t, nbdcopy, uri("origin"), originOut)
	got, err = os.ReadFile(originOut)
	require.NoError(t, err)
	want = append([]byte(nil), orig...)
	copy(want[0:], bytes.Repeat([]byte{0xab}, 64<<10))
	copy(want[1<<20:], bytes.Repeat([]byte{0xcd}, 8<<10))
	assert.True(t, bytes.Equal(want, got), "the origin has the new data, and not the snapshot's write")

	code, rest := srv.stop(t)
	assert.Equal(t, 0, code, "SIGTERM drains and exits 0")
	assert.Contains(t, rest, "snapshot snap: 19 exceptions")
	assert.Contains(t, rest, "stopped")

	// The COW on disk says the same after the server is gone.
	var reports []statusReport
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "status", "--json", cowPath)), &reports))
	require.Len(t, reports, 1)
	assert.Equal(t, uint64(19), reports[0].Exceptions)
	assert.Equal(t, "valid", reports[0].State)
	assert.Contains(t, run1(t, bin, "check", cowPath), "19 exceptions in 1 metadata areas")

	// Socket activation, as libnbd starts a server: the default export is the snapshot.
	activatedSize, err := exec.Command(nbdinfo, "--size", "--", "[", bin, "serve", "--origin", origin, "--snapshot", "snap="+cowPath, "--default-export", "snap", "]").Output()
	require.NoError(t, err)
	assert.Equal(t, "8388608", strings.TrimSpace(string(activatedSize)), "only nbdinfo's answer on stdout")
	copied := filepath.Join(dir, "activated.out")
	run1(t, tool(t, "nbdcopy", "libnbd-bin"), "--", "[", bin, "serve", "--origin", origin, "--snapshot", "snap="+cowPath, "--default-export", "snap", "]", copied)
	got, err = os.ReadFile(copied)
	require.NoError(t, err)
	snapView0, err := os.ReadFile(snapOut)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(snapView0, got), "the socket-activated default export is the snapshot")

	// stdin/stdout, as libnbd's connect_command starts a server.
	probe := `import nbd, sys
h = nbd.NBD()
h.set_export_name("snap")
h.connect_command(sys.argv[1:])
print(h.get_size(), h.pread(4096, 2 << 20) == b"\xee" * 4096)
h.shutdown()`
	out, err := exec.Command("/usr/bin/python3", "-c", probe, bin, "serve", "--origin", origin, "--snapshot", "snap="+cowPath, "--stdio").Output()
	require.NoError(t, err, "python3-libnbd connect_command")
	assert.Equal(t, "8388608 True", strings.TrimSpace(string(out)))

	// Merge: the origin becomes the snapshot's former view, and the COW empties.
	mergeOut := run1(t, bin, "merge", "--origin", origin, "--cow", cowPath)
	assert.Contains(t, mergeOut, "merged 19 exceptions")
	merged, err := os.ReadFile(origin)
	require.NoError(t, err)
	snapView, err := os.ReadFile(snapOut)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(snapView, merged), "after the merge the origin is the snapshot's view")
	reports = nil
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "status", "--json", cowPath)), &reports))
	assert.Equal(t, uint64(0), reports[0].Exceptions)
	assert.Equal(t, "16/8192 16", reports[0].Status)
}

// Trim and write-zeroes through NBD: the snapshot keeps what the origin
// loses, and zeroing a snapshot never touches the origin.
func TestServeTrimAndZeroes(t *testing.T) {
	qemuIO := tool(t, "qemu-io", "qemu-utils")
	nbdcopy := tool(t, "nbdcopy", "libnbd-bin")
	bin := buildSnapd(t)
	f := newFixture(t, bin, 4<<20, 9)
	dir, origin, cowPath, orig := f.dir, f.origin, f.cow, f.orig
	sock := filepath.Join(dir, "nbd.sock")
	srv := startServe(t, bin, "--origin", origin, "--snapshot", "snap="+cowPath, "--listen", "", "--socket", sock)
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }

	run1(t, qemuIO, "-f", "raw", uri("origin"), "-c", "discard 0 64k", "-c", "write -z 128k 64k", "-c", "flush")
	run1(t, qemuIO, "-f", "raw", uri("snap"), "-c", "write -z 1M 16k", "-c", "discard 2M 64k", "-c", "flush")

	dump := func(name string) []byte {
		out := filepath.Join(dir, name+".out")
		run1(t, nbdcopy, uri(name), out)
		b, err := os.ReadFile(out)
		require.NoError(t, err)
		return b
	}
	wantOrigin := append([]byte(nil), orig...)
	clear(wantOrigin[0 : 64<<10])
	clear(wantOrigin[128<<10 : 192<<10])
	assert.True(t, bytes.Equal(wantOrigin, dump("origin")), "origin: the discarded and zeroed ranges read zero, the rest is intact")
	wantSnap := append([]byte(nil), orig...)
	clear(wantSnap[1<<20 : 1<<20+16<<10])
	assert.True(t, bytes.Equal(wantSnap, dump("snap")), "snapshot: the origin's trim and zeroes did not reach it; its own zeroes did; its trim changed nothing")
	code, rest := srv.stop(t)
	assert.Equal(t, 0, code)
	// 16 chunks copied for the origin's discard, 16 for its zeroes, 4 for the snapshot's zeroes.
	assert.Contains(t, rest, "snapshot snap: 36 exceptions")
}

// A clustered serve (--cluster-id, in-process lock engine) behaves as a
// plain one through NBD and leaves the same COW behind.
func TestServeClustered(t *testing.T) {
	qemuIO := tool(t, "qemu-io", "qemu-utils")
	nbdcopy := tool(t, "nbdcopy", "libnbd-bin")
	bin := buildSnapd(t)
	f := newFixture(t, bin, 4<<20, 11)
	sock := filepath.Join(f.dir, "nbd.sock")
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }

	for _, bad := range [][]string{
		{"--cluster-id", "c1", "--lock", "etcd"},
		{"--lock", "local"},
		{"--cluster-id", "a/b"},
	} {
		args := append([]string{"serve", "--origin", f.origin, "--snapshot", "snap=" + f.cow, "--listen", "", "--socket", sock}, bad...)
		out, err := exec.Command(bin, args...).CombinedOutput()
		require.Error(t, err, "%v", bad)
		assert.Equal(t, 2, err.(*exec.ExitError).ExitCode(), "%v: %s", bad, out)
		assert.Equal(t, 1, strings.Count(strings.TrimSpace(string(out)), "\n")+1, "%v: one line: %s", bad, out)
	}

	ctl := filepath.Join(f.dir, "control.sock")
	srv := startServe(t, bin, "--origin", f.origin, "--snapshot", "snap="+f.cow, "--listen", "", "--socket", sock, "--cluster-id", "c1", "--lock", "local", "--origin-id", "serial=ORIG1", "--control", ctl)
	run1(t, qemuIO, "-f", "raw", uri("origin"), "-c", "write -P 0xab 0 64k", "-c", "flush")
	run1(t, qemuIO, "-f", "raw", uri("snap"), "-c", "write -P 0xee 1M 4k", "-c", "flush")
	snapOut := filepath.Join(f.dir, "snap.out")
	run1(t, nbdcopy, uri("snap"), snapOut)
	got, err := os.ReadFile(snapOut)
	require.NoError(t, err)
	want := append([]byte(nil), f.orig...)
	copy(want[1<<20:], bytes.Repeat([]byte{0xee}, 4096))
	assert.True(t, bytes.Equal(want, got), "the clustered snapshot shows the origin as it was, plus its own write")

	// The running server reports its membership and its cluster counters.
	var live volumes.Status
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "status", "--control", ctl, "--json")), &live))
	require.NotNil(t, live.Cluster)
	assert.Equal(t, "c1", live.Cluster.ID)
	assert.Equal(t, "local", live.Cluster.Engine)
	assert.False(t, live.Cluster.Lost)
	require.Len(t, live.Snapshots, 1)
	assert.Equal(t, uint64(17), live.Snapshots[0].Exceptions)
	require.NotNil(t, live.Snapshots[0].Cluster)
	assert.Positive(t, live.Snapshots[0].Cluster.UpConverts, "copying needed EX")
	text := run1(t, bin, "status", "--control", ctl)
	assert.Contains(t, text, "cluster c1: node")
	assert.Contains(t, text, "metadata refreshes")
	code, _ := srv.stop(t)
	assert.Equal(t, 0, code)
	assert.Contains(t, srv.stderr.String(), "cluster c1: node", "the membership is logged at start")
	assert.Contains(t, srv.stderr.String(), "cluster c1 node", "the counters are logged at exit")
	_, err = os.Stat(ctl)
	assert.ErrorIs(t, err, os.ErrNotExist, "the control socket goes with the server")

	var reports []statusReport
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "status", "--json", f.cow)), &reports))
	require.Len(t, reports, 1)
	assert.Equal(t, uint64(17), reports[0].Exceptions, "16 origin chunks and one snapshot chunk")
	assert.Equal(t, "valid", reports[0].State)
	require.NotNil(t, reports[0].Label, "the clustered serve stamped the COW's label")
	assert.Equal(t, "c1", reports[0].Label.ClusterID)
	assert.Equal(t, exstore.OriginIdentity{Size: 4 << 20, ID: "serial=ORIG1"}, reports[0].Label.Origin)

	// Another cluster, or another origin, is refused the COW.
	for _, other := range [][]string{{"--cluster-id", "c2", "--origin-id", "serial=ORIG1"}, {"--cluster-id", "c1", "--origin-id", "serial=ORIG2"}} {
		args := append([]string{"serve", "--origin", f.origin, "--snapshot", "snap=" + f.cow, "--listen", "", "--socket", sock}, other...)
		out, err := exec.Command(bin, args...).CombinedOutput()
		require.Error(t, err, "%v", other)
		assert.Equal(t, 1, err.(*exec.ExitError).ExitCode(), "%v: %s", other, out)
		assert.Contains(t, string(out), `is labelled for cluster "c1" origin serial=ORIG1`, "%v", other)
	}
}

// A transient snapshot (type=N) needs no formatted COW and shows the
// origin as it was.
func TestServeTransientSnapshot(t *testing.T) {
	qemuIO := tool(t, "qemu-io", "qemu-utils")
	nbdcopy := tool(t, "nbdcopy", "libnbd-bin")
	bin := buildSnapd(t)
	f := newFixture(t, bin, 4<<20, 12)
	scratch := filepath.Join(f.dir, "scratch.img")
	require.NoError(t, os.WriteFile(scratch, make([]byte, 1<<20), 0o600))
	sock := filepath.Join(f.dir, "nbd.sock")
	uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }

	srv := startServe(t, bin, "--origin", f.origin, "--snapshot", "scratch="+scratch+",type=N,chunk=4KiB", "--listen", "", "--socket", sock)
	run1(t, qemuIO, "-f", "raw", uri("origin"), "-c", "write -P 0xab 0 64k", "-c", "flush")
	out := filepath.Join(f.dir, "scratch.out")
	run1(t, nbdcopy, uri("scratch"), out)
	got, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(f.orig, got), "the transient snapshot shows the origin as it was")
	code, rest := srv.stop(t)
	assert.Equal(t, 0, code)
	assert.Contains(t, rest, "snapshot scratch: 16 exceptions")
}
