//go:build linux

package nbd

// Interop tests against clients nobody on the project wrote: libnbd's
// nbdinfo, nbdcopy and Python bindings, nbdkit, qemu-io/qemu-img and fio.
// Debian packages: libnbd-bin python3-libnbd nbdkit qemu-utils fio.

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// interopExports serves a writable file export "disk" (multi-conn), a
// writable in-memory export "mem" that reports allocation, and a read-only
// view "snap" of the same memory.
func interopExports(t *testing.T, size int64, unix bool) (*testServer, string, *memBackend) {
	t.Helper()
	dev, path := fileDevice(t, size)
	mem := newMemBackend(16 << 20)
	ts := startServer(t, []Export{
		{Name: "disk", Description: "file-backed disk", Backend: NewDeviceBackend(dev), MultiConn: true},
		{Name: "mem", Backend: mem},
		{Name: "snap", Description: "read-only view", Backend: mem, ReadOnly: true},
	}, Options{}, unix)
	return ts, path, mem
}

func TestNbdinfoListAndFlags(t *testing.T) {
	nbdinfo := requireTool(t, "nbdinfo", "libnbd-bin")
	ts, _, _ := interopExports(t, 8<<20, false)

	var listing struct {
		Protocol   string `json:"protocol"`
		Structured bool   `json:"structured"`
		Exports    []struct {
			Name      string   `json:"export-name"`
			Size      int64    `json:"export-size"`
			ReadOnly  bool     `json:"is_read_only"`
			Contexts  []string `json:"contexts"`
			MinBlock  int      `json:"block_size_minimum"`
			MaxBlock  int      `json:"block_size_maximum"`
			MultiConn bool     `json:"can_multi_conn"`
		} `json:"exports"`
	}
	out := runTool(t, nbdinfo, "--list", "--json", "nbd://"+ts.addr)
	require.NoError(t, json.Unmarshal([]byte(out), &listing), out)
	assert.Equal(t, "newstyle-fixed", listing.Protocol)
	assert.True(t, listing.Structured)
	require.Len(t, listing.Exports, 3)
	byName := map[string]int{}
	for i, e := range listing.Exports {
		byName[e.Name] = i
		assert.Equal(t, []string{"base:allocation"}, e.Contexts, e.Name)
		assert.Equal(t, 1, e.MinBlock, e.Name)
		assert.Equal(t, DefaultMaxPayload, e.MaxBlock, e.Name)
	}
	require.Contains(t, byName, "disk")
	require.Contains(t, byName, "snap")
	assert.Equal(t, int64(8<<20), listing.Exports[byName["disk"]].Size)
	assert.False(t, listing.Exports[byName["disk"]].ReadOnly)
	assert.True(t, listing.Exports[byName["disk"]].MultiConn)
	assert.True(t, listing.Exports[byName["snap"]].ReadOnly)
	assert.False(t, listing.Exports[byName["snap"]].MultiConn)

	out = runTool(t, nbdinfo, ts.uri("snap"))
	assert.Contains(t, out, "description: read-only view")

	// nbdinfo --can/--is exits 0 for true and 2 for false.
	cases := []struct {
		export, query, what string
		want                bool
	}{
		{"disk", "--can", "flush", true},
		{"disk", "--can", "fua", true},
		{"disk", "--can", "trim", true},
		{"disk", "--can", "zero", true},
		{"disk", "--can", "fast-zero", true},
		{"disk", "--can", "cache", true},
		{"disk", "--can", "df", true},
		{"disk", "--can", "multi-conn", true},
		{"disk", "--can", "structured-reply", true},
		{"disk", "--is", "read-only", false},
		{"mem", "--can", "multi-conn", false},
		{"snap", "--is", "read-only", true},
		{"snap", "--can", "flush", false},
		{"snap", "--can", "fua", false},
		{"snap", "--can", "trim", false},
		{"snap", "--can", "zero", false},
		{"snap", "--can", "cache", true},
	}
	for _, tc := range cases {
		_, err := runToolStatus(t, nbdinfo, tc.query, tc.what, ts.uri(tc.export))
		want := 2
		if tc.want {
			want = 0
		}
		assert.Equal(t, want, exitCode(t, err), "%s %s %s", tc.export, tc.query, tc.what)
	}
}

func TestNbdinfoMap(t *testing.T) {
	nbdinfo := requireTool(t, "nbdinfo", "libnbd-bin")
	qemuIO := requireTool(t, "qemu-io", "qemu-utils")
	ts, _, _ := interopExports(t, 8<<20, true)

	// Data at 64 KiB..192 KiB and 1 MiB..1 MiB+4 KiB, with a written-then
	// trimmed hole at 128 KiB..160 KiB; the rest was never written.
	runTool(t, qemuIO, "-f", "raw",
		"-c", "write -P 0x11 64k 128k",
		"-c", "write -P 0x22 1M 4k",
		"-c", "discard 128k 32k",
		ts.uri("mem"))
	out := runTool(t, nbdinfo, "--map", "--json", ts.uri("mem"))
	var extents []struct {
		Offset int64 `json:"offset"`
		Length int64 `json:"length"`
		Type   int   `json:"type"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &extents), out)
	type ext struct {
		off, length int64
		typ         int
	}
	var got []ext
	for _, e := range extents {
		got = append(got, ext{e.Offset, e.Length, e.Type})
	}
	hole := 3 // HOLE|ZERO
	assert.Equal(t, []ext{
		{0, 64 << 10, hole},
		{64 << 10, 64 << 10, 0},
		{128 << 10, 32 << 10, hole},
		{160 << 10, 32 << 10, 0},
		{192 << 10, 1<<20 - 192<<10, hole},
		{1 << 20, 4 << 10, 0},
		{1<<20 + 4<<10, 16<<20 - (1<<20 + 4<<10), hole},
	}, got)

	// A backend without extent information reports everything as data.
	out = runTool(t, nbdinfo, "--map", "--json", ts.uri("disk"))
	require.NoError(t, json.Unmarshal([]byte(out), &extents), out)
	require.Len(t, extents, 1)
	assert.Equal(t, int64(8<<20), extents[0].Length)
	assert.Equal(t, 0, extents[0].Type)
}

func TestNbdcopyRoundTrip(t *testing.T) {
	nbdkit := requireTool(t, "nbdkit", "nbdkit")
	nbdcopy := requireTool(t, "nbdcopy", "libnbd-bin")
	const size = 64 << 20
	for _, conns := range []int{1, 4} {
		for _, unix := range []bool{false, true} {
			t.Run(fmt.Sprintf("C%d/unix=%v", conns, unix), func(t *testing.T) {
				ts, path, _ := interopExports(t, size, unix)
				// sparse-random serves the same pseudo-random data
				// for a seed and refuses writes (EIO) of anything
				// else, so copying back into it verifies every byte.
				script := fmt.Sprintf(`%s -C %d --flush "$uri" '%s' && %s -C %d '%s' "$uri"`,
					nbdcopy, conns, ts.uri("disk"), nbdcopy, conns, ts.uri("disk"))
				runTool(t, nbdkit, "-U", "-", "sparse-random", fmt.Sprintf("size=%d", size), "seed=4242", "--run", script)

				// The export's file holds exactly sparse-random's data.
				want := filepath.Join(t.TempDir(), "want.img")
				runTool(t, nbdkit, "-U", "-", "sparse-random", fmt.Sprintf("size=%d", size), "seed=4242",
					"--run", fmt.Sprintf(`%s "$uri" '%s'`, nbdcopy, want))
				wantData, err := os.ReadFile(want)
				require.NoError(t, err)
				require.NotEqual(t, make([]byte, size), wantData, "sparse-random produced no data")
				disk, err := os.ReadFile(path)
				require.NoError(t, err)
				assert.True(t, bytes.Equal(wantData, disk), "export file differs from the source")
			})
		}
	}
}

func TestQemuIO(t *testing.T) {
	qemuIO := requireTool(t, "qemu-io", "qemu-utils")
	for _, unix := range []bool{false, true} {
		t.Run(fmt.Sprintf("unix=%v", unix), func(t *testing.T) {
			ts, path, _ := interopExports(t, 8<<20, unix)
			out := runTool(t, qemuIO, "-f", "raw",
				"-c", "write -P 0xab 0 1M",
				"-c", "write -f -P 0xcd 1M 64k", // FUA
				"-c", "aio_write -P 0x5a 2M 256k",
				"-c", "aio_write -P 0xa5 3M 256k",
				"-c", "aio_flush",
				"-c", "write -P 0xee 4M 1M",
				"-c", "write -z 4M 64k", // zeroes, keep allocated
				"-c", "write -z -u 4160k 64k", // zeroes, may unmap
				"-c", "discard 5M 512k",
				"-c", "flush",
				"-c", "read -P 0xab 0 1M",
				"-c", "read -P 0xcd 1M 64k",
				"-c", "read -P 0x5a 2M 256k",
				"-c", "read -P 0xa5 3M 256k",
				"-c", "read -P 0 4M 128k",
				"-c", "read -P 0xee 4224k 64k",
				ts.uri("disk"))
			assert.NotContains(t, out, "Pattern verification failed")
			assert.NotContains(t, out, "failed")
			assert.Equal(t, 7, strings.Count(out, "wrote "), out)
			assert.Equal(t, 6, strings.Count(out, "read "), out)

			disk, err := os.ReadFile(path)
			require.NoError(t, err)
			assertFilled(t, disk, 0, 1<<20, 0xab)
			assertFilled(t, disk, 1<<20, 64<<10, 0xcd)
			assertFilled(t, disk, 2<<20, 256<<10, 0x5a)
			assertFilled(t, disk, 3<<20, 256<<10, 0xa5)
			assertFilled(t, disk, 4<<20, 128<<10, 0)
			assertFilled(t, disk, 4<<20+128<<10, 1<<20-128<<10, 0xee)
			assertFilled(t, disk, 5<<20, 512<<10, 0)

			// A read-only export refuses writes; the error reaches
			// qemu-io and the data stays untouched.
			out, _ = runToolStatus(t, qemuIO, "-f", "raw", "-r", "-c", "read -P 0 0 4k", ts.uri("snap"))
			assert.Contains(t, out, "read 4096/4096")
			out, _ = runToolStatus(t, qemuIO, "-f", "raw", "-c", "write -P 1 0 4k", ts.uri("snap"))
			assert.NotContains(t, out, "wrote 4096/4096")
		})
	}
}

// assertFilled checks that data[off:off+n] is all b.
func assertFilled(t *testing.T, data []byte, off, n int, b byte) {
	t.Helper()
	assert.True(t, bytes.Equal(bytes.Repeat([]byte{b}, n), data[off:off+n]), "bytes %d..%d are not all %#x", off, off+n, b)
}

func TestQemuImgConvertCompare(t *testing.T) {
	qemuImg := requireTool(t, "qemu-img", "qemu-utils")
	const size = 16 << 20
	ts, path, _ := interopExports(t, size, false)

	src := filepath.Join(t.TempDir(), "src.img")
	data := make([]byte, size)
	_, err := rand.Read(data[:6<<20])
	require.NoError(t, err)
	_, err = rand.Read(data[10<<20 : 11<<20])
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(src, data, 0o600))

	runTool(t, qemuImg, "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", src, ts.uri("disk"))
	runTool(t, qemuImg, "compare", "-f", "raw", "-F", "raw", src, ts.uri("disk"))
	disk, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(data, disk), "export file differs from the source")

	// compare notices a difference (exit 1).
	data[12<<20] ^= 0xff
	require.NoError(t, os.WriteFile(src, data, 0o600))
	_, err = runToolStatus(t, qemuImg, "compare", "-f", "raw", "-F", "raw", src, ts.uri("disk"))
	assert.Equal(t, 1, exitCode(t, err))
}

func TestFioVerify(t *testing.T) {
	fio := requireTool(t, "fio", "fio")
	ts, _, _ := interopExports(t, 16<<20, false)
	// Four jobs, one connection each, on disjoint 4 MiB regions, with 64
	// requests in flight: the server reorders replies and fio checks
	// every block it wrote.
	out := runTool(t, fio, "--name=nbdverify", "--ioengine=nbd", "--uri="+ts.uri("disk"),
		"--rw=randwrite", "--bs=4k", "--bsrange=4k-64k", "--size=4M", "--offset_increment=4M",
		"--numjobs=4", "--iodepth=64", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
		"--group_reporting")
	assert.Contains(t, out, "nbdverify")
	assert.NotContains(t, out, "verify: bad")
	assert.Contains(t, out, "err= 0")
}

// nbdshPrelude is shared by the Python conformance probes: argv[1] is the
// URI of a writable export, argv[2] of a read-only one.
const nbdshPrelude = `
import errno, sys, nbd
uri, ro_uri = sys.argv[1], sys.argv[2]

def expect_error(fn, want_errno, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errnum == want_errno, "%s: errno %s, want %s (%s)" % (what, e.errnum, want_errno, e)
        return
    raise AssertionError("%s: no error" % what)
`

func TestNbdshConformance(t *testing.T) {
	py := libnbdPython(t)
	ts, _, _ := interopExports(t, 8<<20, false)
	probes := map[string]string{
		// STARTTLS is unsupported: with TLS allowed but not required,
		// libnbd gets ERR_UNSUP and carries on in the clear.
		"unsupported option": `
h = nbd.NBD()
msgs = []
h.set_debug_callback(lambda ctx, msg: msgs.append(msg))
h.set_debug(True)
h.set_tls(nbd.TLS_ALLOW)
h.set_export_name("disk")
host, port = uri[len("nbd://"):].split("/")[0].rsplit(":", 1)
h.connect_tcp(host, port)
assert any("server refused TLS (not supported)" in m for m in msgs), msgs
assert not h.get_tls_negotiated()
h.pwrite(b"x" * 512, 0)
assert h.pread(512, 0) == b"x" * 512
`,
		"list and missing export": `
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
names = []
h.opt_list(lambda name, desc: names.append((name, desc)))
assert sorted(names) == [("disk", "file-backed disk"), ("mem", ""), ("snap", "read-only view")], names
contexts = []
h.opt_list_meta_context(lambda ctx: contexts.append(ctx))
assert contexts == ["base:allocation"], contexts
h.set_export_name("missing")
try:
    h.opt_info()
    raise AssertionError("INFO on a missing export succeeded")
except nbd.Error:
    pass
try:
    h.opt_go()
    raise AssertionError("GO on a missing export succeeded")
except nbd.Error:
    pass
h.set_export_name("snap")
h.set_full_info(True)
h.opt_info()
assert h.get_export_description() == "read-only view"
assert h.is_read_only()
h.set_export_name("disk")
h.opt_go()
assert h.get_size() == 8 << 20
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 64 << 20
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"y" * 4096, 4096)
assert h.pread(4096, 4096) == b"y" * 4096
h.shutdown()
`,
		"abort": `
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.opt_abort()
assert h.aio_is_closed()
`,
		"simple replies only": `
h = nbd.NBD()
h.set_request_structured_replies(False)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"s" * 8192, 8192)
assert h.pread(8192, 8192) == b"s" * 8192
h.set_strict_mode(0)
expect_error(lambda: h.pread(512, 8 << 20), errno.EINVAL, "simple read past the end")
assert h.pread(512, 8192) == b"s" * 512
`,
		"export name fallback": `
for flags in (0, nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE):
    h = nbd.NBD()
    h.set_handshake_flags(flags)
    h.set_request_structured_replies(False)
    h.set_opt_mode(False)
    h.connect_uri(uri)
    assert h.get_protocol() == ("newstyle" if flags == 0 else "newstyle-fixed"), h.get_protocol()
    assert h.get_size() == 8 << 20
    h.pwrite(b"e" * 512, 512)
    assert h.pread(512, 512) == b"e" * 512
    h.shutdown()
`,
		"errors keep the connection": `
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
h.set_strict_mode(0)
size = h.get_size()
expect_error(lambda: h.pread(512, size), errno.EINVAL, "read past the end")
expect_error(lambda: h.pread(1024, size - 512), errno.EINVAL, "read across the end")
expect_error(lambda: h.pwrite(b"z" * 512, size), errno.ENOSPC, "write past the end")
expect_error(lambda: h.zero(4096, size), errno.ENOSPC, "zero past the end")
expect_error(lambda: h.trim(4096, size), errno.ENOSPC, "trim past the end")
# Requests over the server's 64 MiB maximum: libnbd refuses them itself
# (ERANGE), so the server's EINVAL is tested with a raw client
# (TestDefaultPayloadServesLargeUnnegotiatedRequests).
expect_error(lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL, "flag not valid for read")
h.zero(1 << 20, 0, nbd.CMD_FLAG_FAST_ZERO)  # a file can punch holes: fast
expect_error(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE), errno.ENOTSUP, "fast zero without holes")
assert h.pread(0, 0) == b""
h.pwrite(b"", 0)
h.pwrite(b"v" * 512, 0)
assert h.pread(512, 0) == b"v" * 512
assert h.pread(512, 0, nbd.CMD_FLAG_DF) == b"v" * 512
h.flush()
h.cache(4096, 0)
seen = []
h.block_status(4096, 0, lambda ctx, off, ents, err: seen.append((ctx, off, list(ents))))
assert seen == [("base:allocation", 0, [4096, 0])], seen

r = nbd.NBD()
r.connect_uri(ro_uri)
r.set_strict_mode(0)
assert r.is_read_only()
expect_error(lambda: r.pwrite(b"p" * 512, 0), errno.EPERM, "write to a read-only export")
expect_error(lambda: r.trim(512, 0), errno.EPERM, "trim on a read-only export")
expect_error(lambda: r.zero(512, 0), errno.EPERM, "zero on a read-only export")
assert r.pread(512, 0) == bytes(512)
`,
	}
	for name, probe := range probes {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			script := filepath.Join(dir, "probe.py")
			require.NoError(t, os.WriteFile(script, []byte(nbdshPrelude+probe), 0o600))
			cmd := exec.Command(py, script, ts.uri("disk"), ts.uri("snap"))
			cmd.Dir = dir
			out, err := cmd.CombinedOutput()
			require.NoError(t, err, "probe failed:\n%s", out)
		})
	}
}

func TestQemuIODirectDevice(t *testing.T) {
	qemuIO := requireTool(t, "qemu-io", "qemu-utils")
	path := filepath.Join(t.TempDir(), "direct.img")
	require.NoError(t, blockdev.Create(path, 4<<20))
	dev := openDirect(t, path)
	ts := startServer(t, []Export{{Name: "direct", Backend: NewDeviceBackend(dev)}}, Options{}, true)
	// qemu honours the advertised minimum block size with
	// read-modify-write for these unaligned requests.
	out := runTool(t, qemuIO, "-f", "raw",
		"-c", "write -P 0x33 100 1000",
		"-c", "write -z 300 10",
		"-c", "read -P 0x33 100 200",
		"-c", "read -P 0 300 10",
		"-c", "read -P 0x33 310 790",
		ts.uri("direct"))
	assert.NotContains(t, out, "failed")
	assert.Equal(t, 3, strings.Count(out, "read "), out)
	require.NoError(t, dev.Sync())
	disk, err := os.ReadFile(path)
	require.NoError(t, err)
	assertFilled(t, disk, 0, 100, 0)
	assertFilled(t, disk, 100, 200, 0x33)
	assertFilled(t, disk, 300, 10, 0)
	assertFilled(t, disk, 310, 790, 0x33)
	assertFilled(t, disk, 1100, 4096-1100, 0)
}

func TestNbdkitNBDClient(t *testing.T) {
	nbdkit := requireTool(t, "nbdkit", "nbdkit")
	nbdcopy := requireTool(t, "nbdcopy", "libnbd-bin")
	qemuIO := requireTool(t, "qemu-io", "qemu-utils")
	ts, _, _ := interopExports(t, 8<<20, true)
	runTool(t, qemuIO, "-f", "raw", "-c", "write -P 0x77 1M 1M", ts.uri("disk"))
	// nbdkit's nbd plugin is a third NBD client implementation; it
	// re-exports our disk and nbdcopy reads it through that proxy.
	copied := filepath.Join(t.TempDir(), "copy.img")
	runTool(t, nbdkit, "-U", "-", "nbd", "socket="+ts.socket, "export=disk",
		"--run", fmt.Sprintf(`%s "$uri" '%s'`, nbdcopy, copied))
	data, err := os.ReadFile(copied)
	require.NoError(t, err)
	require.Len(t, data, 8<<20)
	assertFilled(t, data, 0, 1<<20, 0)
	assertFilled(t, data, 1<<20, 1<<20, 0x77)
	assertFilled(t, data, 2<<20, 6<<20, 0)
}
