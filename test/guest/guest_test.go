package guest

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// cpioEntry is one entry of a newc archive as readCPIO returns it.
type cpioEntry struct {
	name string
	mode uint32
	data []byte
}

// readCPIO parses a newc archive up to its trailer, checking the magic and
// the 4-byte alignment of every header and body.
func readCPIO(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var entries []cpioEntry
	off := 0
	field := func(i int) int {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
		require.NoError(t, err)
		return int(v)
	}
	for {
		require.Zero(t, off%4, "header at %d is not 4-byte aligned", off)
		require.LessOrEqual(t, off+110, len(b), "truncated archive")
		require.Equal(t, "070701", string(b[off:off+6]))
		mode, size, nameSize := field(1), field(6), field(11)
		name := string(b[off+110 : off+110+nameSize-1])
		require.Equal(t, byte(0), b[off+110+nameSize-1], "name %q is not NUL-terminated", name)
		dataOff := (off + 110 + nameSize + 3) &^ 3
		data := b[dataOff : dataOff+size]
		off = (dataOff + size + 3) &^ 3
		if name == "TRAILER!!!" {
			require.Equal(t, len(b), off, "bytes after the trailer")
			return entries
		}
		entries = append(entries, cpioEntry{name: name, mode: uint32(mode), data: data})
	}
}

func TestCPIOWriter(t *testing.T) {
	var buf bytes.Buffer
	cw := newCPIOWriter(&buf)
	cw.File("/usr/lib/x/libx.so", 0o755, []byte("abcde"))
	cw.Dir("/usr/lib", 0o700) // exists already: not added twice
	cw.Symlink("/bin/sh", "busybox")
	cw.File("/empty", 0o644, nil)
	require.NoError(t, cw.Close())

	entries := readCPIO(t, buf.Bytes())
	var names []string
	for _, e := range entries {
		names = append(names, e.name)
	}
	assert.Equal(t, []string{"usr", "usr/lib", "usr/lib/x", "usr/lib/x/libx.so", "bin", "bin/sh", "empty"}, names,
		"parents come before their children, once each")
	assert.Equal(t, uint32(modeDir|0o755), entries[1].mode)
	assert.Equal(t, uint32(modeRegular|0o755), entries[3].mode)
	assert.Equal(t, "abcde", string(entries[3].data))
	assert.Equal(t, uint32(modeSymlink|0o777), entries[5].mode)
	assert.Equal(t, "busybox", string(entries[5].data))
	assert.Empty(t, entries[6].data)
}

func TestParseLDD(t *testing.T) {
	out := "\tlinux-vdso.so.1 (0x00007ffc)\n" +
		"\tlibdevmapper.so.1.02.1 => /lib/x86_64-linux-gnu/libdevmapper.so.1.02.1 (0x00007f0a)\n" +
		"\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0b)\n" +
		"\t/lib64/ld-linux-x86-64.so.2 (0x00007f0c)\n"
	libs, err := parseLDD(out)
	require.NoError(t, err)
	assert.Equal(t, []string{
		"/lib/x86_64-linux-gnu/libdevmapper.so.1.02.1",
		"/lib/x86_64-linux-gnu/libc.so.6",
		"/lib64/ld-linux-x86-64.so.2",
	}, libs)

	_, err = parseLDD("\tlibgone.so.1 => not found\n")
	assert.ErrorContains(t, err, "libgone.so.1")
}

// fakeKernel makes a module tree with the given modules.dep and
// modules.builtin under a temporary directory.
func fakeKernel(t *testing.T, dep, builtin string) Kernel {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "modules.dep"), []byte(dep), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "modules.builtin"), []byte(builtin), 0o644))
	return Kernel{Release: "test", ModulesDir: dir}
}

func TestModuleFiles(t *testing.T) {
	k := fakeKernel(t, ""+
		"kernel/md/dm-snapshot.ko: kernel/md/dm-bufio.ko kernel/md/dm-mod.ko\n"+
		"kernel/md/dm-bufio.ko: kernel/md/dm-mod.ko\n"+
		"kernel/md/dm-mod.ko:\n"+
		"kernel/block/virtio_blk.ko.xz: kernel/virtio/virtio_ring.ko.xz\n"+
		"kernel/virtio/virtio_ring.ko.xz:\n"+
		"kernel/loop/a.ko: kernel/loop/b.ko\n"+
		"kernel/loop/b.ko: kernel/loop/a.ko\n",
		"kernel/virtio/virtio.ko\n")

	files, err := k.ModuleFiles("dm_snapshot", "virtio", "virtio-blk", "dm-mod")
	require.NoError(t, err)
	rel := func(f string) string { return strings.TrimPrefix(f, k.ModulesDir+"/") }
	var got []string
	for _, f := range files {
		got = append(got, rel(f))
	}
	assert.Equal(t, []string{
		"kernel/md/dm-mod.ko", "kernel/md/dm-bufio.ko", "kernel/md/dm-snapshot.ko",
		"kernel/virtio/virtio_ring.ko.xz", "kernel/block/virtio_blk.ko.xz",
	}, got, "dependencies first, each once, built-in modules left out, '-' and '_' alike")

	_, err = k.ModuleFiles("a")
	assert.ErrorContains(t, err, "cycle")
	_, err = k.ModuleFiles("nbd")
	assert.ErrorContains(t, err, "nbd")
}

func TestFindKernel(t *testing.T) {
	boot, modules := t.TempDir(), t.TempDir()
	for _, release := range []string{"6.9.0-1-amd64", "6.10.0-1-amd64", "7.0.0-1-amd64"} {
		require.NoError(t, os.WriteFile(filepath.Join(boot, "vmlinuz-"+release), nil, 0o644))
	}
	_, err := findKernel(boot, modules)
	require.ErrorIs(t, err, ErrNoKernel, "no module trees yet")
	for _, release := range []string{"6.9.0-1-amd64", "6.10.0-1-amd64"} { // 7.0 has no modules
		require.NoError(t, os.MkdirAll(filepath.Join(modules, release), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(modules, release, "modules.dep"), nil, 0o644))
	}
	k, err := findKernel(boot, modules)
	require.NoError(t, err)
	assert.Equal(t, Kernel{
		Release:    "6.10.0-1-amd64",
		Image:      filepath.Join(boot, "vmlinuz-6.10.0-1-amd64"),
		ModulesDir: filepath.Join(modules, "6.10.0-1-amd64"),
	}, k)
}

func TestReadModule(t *testing.T) {
	dir := t.TempDir()
	want := bytes.Repeat([]byte("\x7fELF module body "), 100)
	plain := filepath.Join(dir, "m.ko")
	require.NoError(t, os.WriteFile(plain, want, 0o644))

	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	_, err := zw.Write(want)
	require.NoError(t, err)
	require.NoError(t, zw.Close())
	require.NoError(t, os.WriteFile(plain+".gz", gz.Bytes(), 0o644))

	xz := filepath.Join(dir, "x.ko")
	require.NoError(t, os.WriteFile(xz, want, 0o644))
	out, err := exec.Command("xz", "-k", xz).CombinedOutput()
	require.NoError(t, err, "xz (package xz-utils): %s", out)

	for _, path := range []string{plain, plain + ".gz", xz + ".xz"} {
		got, err := readModule(t.Context(), path)
		require.NoError(t, err, path)
		assert.Equal(t, want, got, path)
	}
	_, err = readModule(t.Context(), filepath.Join(dir, "m.txt"))
	assert.Error(t, err)
}

func TestScriptOutput(t *testing.T) {
	console := "SeaBIOS\n@@guest-begin abc@@\nline 1\nline 2\n@@guest-end abc status=3@@\n[ 1.0] dmesg\n"
	out, status, ok := scriptOutput(console, "abc")
	require.True(t, ok)
	assert.Equal(t, "line 1\nline 2\n", out)
	assert.Equal(t, 3, status)

	_, _, ok = scriptOutput(console, "abd")
	assert.False(t, ok, "another boot's token")
	_, _, ok = scriptOutput("@@guest-begin abc@@\nline 1\n", "abc")
	assert.False(t, ok, "no end marker")
}

func TestDiskArgs(t *testing.T) {
	args := diskArgs([]Disk{{Path: "/a,b.img"}, {Path: "/c.img", ReadOnly: true}, {Path: "/d.img", Shared: true}})
	assert.Equal(t, []string{
		"-drive", "file=/a,,b.img,format=raw,if=none,id=disk0,cache=none", "-device", "virtio-blk-pci,drive=disk0",
		"-drive", "file=/c.img,format=raw,if=none,id=disk1,cache=none,readonly=on", "-device", "virtio-blk-pci,drive=disk1",
		"-drive", "file=/d.img,format=raw,if=none,id=disk2,cache=none,file.locking=off", "-device", "virtio-blk-pci,drive=disk2,share-rw=on",
	}, args)
}

// TestBoot boots a real guest: disks in order, a read-only disk, a host
// binary with its libraries (dmsetup), a module with dependencies (dm-mod
// via dm-snapshot), an extra file, the script's output and exit status, and writes
// that reach the host's image.
func TestBoot(t *testing.T) {
	r := Setup(t, Config{
		Modules:  []string{"virtio_pci", "virtio_blk", "dm-snapshot"},
		Binaries: []string{"dmsetup"},
		Files:    map[string][]byte{"/etc/greeting": []byte("hello from the host\n")},
	})
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(3, 4))
	content := make([]byte, 1<<20)
	for i := range content {
		content[i] = byte(rng.Uint32())
	}
	sum := sha256.Sum256(content)
	input, output := filepath.Join(dir, "in.img"), filepath.Join(dir, "out.img")
	require.NoError(t, os.WriteFile(input, content, 0o600))
	require.NoError(t, os.WriteFile(output, make([]byte, 1<<20), 0o600))

	script := `
cat /etc/greeting
echo "in $(sha256sum /dev/vda | cut -d' ' -f1) ro=$(blockdev --getro /dev/vda)"
printf 'written by the guest' | dd of=/dev/vdb bs=512 seek=3 conv=sync,notrunc oflag=direct status=none
dmsetup create lin --table "0 $(blockdev --getsz /dev/vda) linear /dev/vda 0"
dmsetup mknodes
echo "linear $(sha256sum /dev/mapper/lin | cut -d' ' -f1)"
dmsetup remove lin
grep -q '^dm_snapshot ' /proc/modules && echo "dm_snapshot loaded"
echo "to stderr" >&2
exit 7
`
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	res, err := r.Run(ctx, Options{Script: script, Disks: []Disk{{Path: input, ReadOnly: true}, {Path: output}}})
	require.NoError(t, err)
	t.Logf("boot took %v", res.Elapsed)
	assert.Equal(t, 7, res.Status)
	want := hex.EncodeToString(sum[:])
	assert.Equal(t, "hello from the host\nin "+want+" ro=1\nlinear "+want+"\ndm_snapshot loaded\nto stderr\n", res.Output)

	written, err := os.ReadFile(output)
	require.NoError(t, err)
	assert.Equal(t, "written by the guest", string(written[3*512:3*512+20]))
	assert.Equal(t, make([]byte, 512-20), written[3*512+20:4*512], "dd padded the sector with zeros")
}

// TestRunTimeout checks that the context stops a guest that does not finish.
func TestRunTimeout(t *testing.T) {
	r := Setup(t, Config{})
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Second)
	defer cancel()
	start := time.Now()
	_, err := r.Run(ctx, Options{Script: "sleep 1000\n"})
	require.Error(t, err)
	assert.True(t, errors.Is(err, context.DeadlineExceeded), "error %v", err)
	assert.ErrorIs(t, err, ErrNoEndMarker)
	assert.Less(t, time.Since(start), time.Minute, "the guest was killed")
}

// recordingTB records Skipf and Fatalf instead of stopping the test.
type recordingTB struct {
	testing.TB
	skipped, failed string
}

func (r *recordingTB) Helper()                           {}
func (r *recordingTB) Skipf(format string, args ...any)  { r.skipped = fmt.Sprintf(format, args...) }
func (r *recordingTB) Fatalf(format string, args ...any) { r.failed = fmt.Sprintf(format, args...) }

func TestMissingSkipsOutsideCIAndFailsInCI(t *testing.T) {
	err := fmt.Errorf("program %s: %w", QEMU, ErrMissingProgram)

	t.Setenv("CI", "")
	rec := &recordingTB{TB: t}
	missing(rec, "%v: apt-get install %s", err, debianPackage(QEMU))
	assert.Contains(t, rec.skipped, "apt-get install qemu-system-x86")
	assert.Empty(t, rec.failed)

	t.Setenv("CI", "true")
	rec = &recordingTB{TB: t}
	missing(rec, "%v: apt-get install %s", err, debianPackage("/usr/sbin/dmsetup"))
	assert.Contains(t, rec.failed, "apt-get install dmsetup")
	assert.Empty(t, rec.skipped)
}
