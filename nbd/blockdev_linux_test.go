//go:build linux

package nbd

// Tests that serve a blockdev.File, which only Linux has.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// fileDevice creates a sparse temporary file of size bytes and opens it as a
// blockdev.File, closed when the test ends.
func fileDevice(t testing.TB, size int64) (*blockdev.File, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, blockdev.Create(path, size))
	dev, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { dev.Close() })
	return dev, path
}

func TestDeviceBackendZeroAndTrim(t *testing.T) {
	dev, _ := fileDevice(t, 1<<20)
	b := NewDeviceBackend(dev)
	ctx := context.Background()
	fill := bytes.Repeat([]byte{0xff}, 1<<20)
	require.NoError(t, b.WriteAt(ctx, fill, 0, true))

	require.NoError(t, b.WriteZeroes(ctx, 100, 5000, ZeroOptions{}))
	require.NoError(t, b.WriteZeroes(ctx, 8192, 100, ZeroOptions{NoHole: true, FUA: true}))
	assert.ErrorIs(t, b.WriteZeroes(ctx, 0, 4096, ZeroOptions{NoHole: true, Fast: true}), ErrZeroNotFast)
	require.NoError(t, b.Trim(ctx, 65536, 65536, false))
	require.NoError(t, b.Flush(ctx))

	got := make([]byte, 1<<20)
	require.NoError(t, b.ReadAt(ctx, got, 0))
	want := bytes.Clone(fill)
	clear(want[100:5100])
	clear(want[8192:8292])
	clear(want[65536:131072])
	assert.True(t, bytes.Equal(want, got), "device content after zeroing and trimming")
}

func TestDirectDeviceAlignment(t *testing.T) {
	path := filepath.Join(t.TempDir(), "direct.img")
	require.NoError(t, blockdev.Create(path, 1<<20))
	dev := openDirect(t, path)
	align := dev.Alignment()
	require.Greater(t, align, 1)
	srv := NewServer([]Export{{Name: "direct", Backend: NewDeviceBackend(dev)}}, Options{})
	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	rc.sendOption(optInfo, infoRequest("direct", infoBlockSize))
	var minBlock, preferred uint32
	for {
		typ, data := rc.readOptionReply(optInfo)
		if typ == repAck {
			break
		}
		if binary.BigEndian.Uint16(data) == infoBlockSize {
			minBlock = binary.BigEndian.Uint32(data[2:])
			preferred = binary.BigEndian.Uint32(data[6:])
		}
	}
	assert.Equal(t, uint32(align), minBlock)
	assert.Equal(t, uint32(max(4096, align)), preferred)
	rc.goExport("direct")

	payload := bytes.Repeat([]byte{0x42}, 2*align)
	rc.sendRequest(0, cmdWrite, 1, uint64(align), uint32(2*align), payload)
	errno, _ := rc.readSimpleReply()
	require.Equal(t, uint32(0), errno, "aligned write")
	rc.sendRequest(0, cmdRead, 2, 1, uint32(align), nil)
	errno, _ = rc.readSimpleReply()
	assert.Equal(t, errInval, errno, "misaligned offset")
	rc.sendRequest(0, cmdWrite, 3, 0, uint32(align)+1, make([]byte, align+1))
	errno, _ = rc.readSimpleReply()
	assert.Equal(t, errInval, errno, "misaligned length")
	rc.sendRequest(cmdFlagFUA, cmdWriteZeroes, 4, uint64(2*align), uint32(align), nil)
	errno, _ = rc.readSimpleReply()
	require.Equal(t, uint32(0), errno, "aligned zeroing")
	rc.sendRequest(0, cmdRead, 5, uint64(align), uint32(2*align), nil)
	errno, _ = rc.readSimpleReply()
	require.Equal(t, uint32(0), errno, "aligned read")
	got := make([]byte, 2*align)
	rc.read(got)
	want := append(bytes.Repeat([]byte{0x42}, align), make([]byte, align)...)
	assert.Equal(t, want, got)
}

func TestTLSInteropRequired(t *testing.T) {
	nbdinfo := requireTool(t, "nbdinfo", "libnbd-bin")
	py := libnbdPython(t)
	pki := newTestPKI(t)
	dev, path := fileDevice(t, 4<<20)
	ts := startServer(t, []Export{
		{Name: "disk", Backend: NewDeviceBackend(dev), MultiConn: true},
	}, Options{TLSMode: TLSRequire, TLS: pki.server}, false)

	// A client in the clear is told TLS is required.
	out, err := runToolStatus(t, nbdinfo, ts.uri("disk"))
	assert.Error(t, err)
	assert.Contains(t, out, "TLS")
	// libnbd reports ERR_TLS_REQD to LIST as "not supported".
	out, err = runToolStatus(t, nbdinfo, "--list", "nbd://"+ts.addr)
	assert.Error(t, err)
	assert.NotContains(t, out, "disk")

	out = runTool(t, nbdinfo, "--json", tlsURI(ts, pki, "disk"))
	assert.Contains(t, out, `"TLS": true`)
	assert.Contains(t, out, `"export-size": 4194304`)
	out = runTool(t, nbdinfo, "--list", tlsURI(ts, pki, ""))
	assert.Contains(t, out, "export=\"disk\"")

	// A read/write round trip through libnbd over TLS, checked on the file.
	script := `
import sys, nbd
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[2])
h.set_export_name("disk")
host, port = sys.argv[1].rsplit(":", 1)
h.connect_tcp(host, port)
assert h.get_tls_negotiated()
data = bytes(range(256)) * 64
h.pwrite(data, 65536)
h.flush()
assert h.pread(len(data), 65536) == data
h.shutdown()
print("ok")
`
	out = runTool(t, py, "-c", script, ts.addr, pki.CADir)
	assert.Contains(t, out, "ok")
	onDisk, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, bytes.Repeat(func() []byte {
		b := make([]byte, 256)
		for i := range b {
			b[i] = byte(i)
		}
		return b
	}(), 64), onDisk[65536:65536+16384])
}

// openDirect opens path with O_DIRECT. Only a file system that refuses
// O_DIRECT (EINVAL) skips the test, and not under CI=true, where the tests
// must run; any other error fails it.
func openDirect(t *testing.T, path string) *blockdev.File {
	t.Helper()
	dev, err := blockdev.Open(path, blockdev.Options{Direct: true})
	if errors.Is(err, syscall.EINVAL) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("the temporary file system refuses O_DIRECT (%v): set TMPDIR to one that takes it", err)
		}
		t.Skipf("the temporary file system refuses O_DIRECT: %v", err)
	}
	require.NoError(t, err, "open %s with O_DIRECT", path)
	t.Cleanup(func() { dev.Close() })
	return dev
}
