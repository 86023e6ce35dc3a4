//go:build linux

package blockdev_test

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// newFile creates a sparse file of size bytes in a temp dir and returns its path.
func newFile(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	require.NoError(t, blockdev.Create(path, size))
	return path
}

func open(t *testing.T, path string, opts blockdev.Options) *blockdev.File {
	t.Helper()
	f, err := blockdev.Open(path, opts)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

// openDirect opens path with O_DIRECT. Only a file system that refuses
// O_DIRECT (EINVAL) skips the test, and not under CI=true, where the tests
// must run; any other error fails it.
func openDirect(t *testing.T, path string, opts blockdev.Options) *blockdev.File {
	t.Helper()
	opts.Direct = true
	f, err := blockdev.Open(path, opts)
	if errors.Is(err, syscall.EINVAL) {
		if os.Getenv("CI") == "true" {
			t.Fatalf("the temporary file system refuses O_DIRECT (%v): set TMPDIR to one that takes it", err)
		}
		t.Skipf("temp filesystem refuses O_DIRECT: %v", err)
	}
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func allocatedBytes(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Stat(path, &st))
	return st.Blocks * 512
}

func TestCreateMakesSparseFileOfExactSize(t *testing.T) {
	const size = 64<<20 + 3
	path := newFile(t, size)

	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.True(t, info.Mode().IsRegular())
	assert.Equal(t, int64(size), info.Size())
	assert.Less(t, allocatedBytes(t, path), int64(64<<10), "a fresh device file must be sparse")

	f := open(t, path, blockdev.Options{})
	assert.Equal(t, int64(size), f.Size())
	assert.Equal(t, path, f.Name())
	assert.Equal(t, 1, f.Alignment())
}

func TestCreateRefusesExistingPath(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	require.NoError(t, os.WriteFile(path, []byte("precious"), 0o600))

	err := blockdev.Create(path, 1<<20)
	require.Error(t, err)
	assert.ErrorIs(t, err, fs.ErrExist)
	assert.Contains(t, err.Error(), path)
	assert.Contains(t, err.Error(), "existing")

	content, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "precious", string(content), "Create must not touch an existing file")
}

func TestCreateRejectsNegativeSize(t *testing.T) {
	path := filepath.Join(t.TempDir(), "dev")
	assert.Error(t, blockdev.Create(path, -1))
	_, err := os.Stat(path)
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestOpenRejectsOtherFileTypes(t *testing.T) {
	_, err := blockdev.Open(t.TempDir(), blockdev.Options{ReadOnly: true})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not a regular file or block device")

	_, err = blockdev.Open("/dev/null", blockdev.Options{ReadOnly: true})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not a regular file or block device")

	_, err = blockdev.Open(filepath.Join(t.TempDir(), "missing"), blockdev.Options{})
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestRoundTrip(t *testing.T) {
	const size = 4 << 20
	path := newFile(t, size)
	f := open(t, path, blockdev.Options{})
	rng := rand.New(rand.NewPCG(1, 2))

	want := make([]byte, size)
	for range 200 {
		off := rng.Int64N(size)
		n := min(rng.IntN(20000)+1, int(size-off))
		data := randomBytes(rng, n)
		written, err := f.WriteAt(data, off)
		require.NoError(t, err)
		require.Equal(t, n, written)
		copy(want[off:], data)

		got := make([]byte, n)
		read, err := f.ReadAt(got, off)
		require.NoError(t, err)
		require.Equal(t, n, read)
		require.Equal(t, data, got)
	}
	require.NoError(t, f.Sync())

	got := make([]byte, size)
	n, err := f.ReadAt(got, 0)
	require.NoError(t, err)
	assert.Equal(t, size, n)
	assert.True(t, bytes.Equal(want, got), "whole-device read differs from what was written")

	onDisk, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(want, onDisk), "file content differs from what was written")
}

func TestReadAtEndReturnsEOF(t *testing.T) {
	const size = 10000
	path := newFile(t, size)
	f := open(t, path, blockdev.Options{})
	_, err := f.WriteAt([]byte("tail"), size-4)
	require.NoError(t, err)

	buf := make([]byte, 100)
	n, err := f.ReadAt(buf, size-4)
	assert.Equal(t, 4, n)
	assert.Equal(t, io.EOF, err, "a read crossing the end returns the bytes there and io.EOF")
	assert.Equal(t, "tail", string(buf[:n]))

	n, err = f.ReadAt(buf, size)
	assert.Equal(t, 0, n)
	assert.Equal(t, io.EOF, err)

	n, err = f.ReadAt(buf[:4], size-4)
	assert.Equal(t, 4, n)
	assert.NoError(t, err, "a read ending exactly at the end is complete")

	_, err = f.ReadAt(buf, -1)
	assert.ErrorIs(t, err, syscall.EINVAL)
}

func TestWritesMustFitInDevice(t *testing.T) {
	const size = 8192
	path := newFile(t, size)
	f := open(t, path, blockdev.Options{})

	for _, off := range []int64{size - 10, size, -1} {
		n, err := f.WriteAt(make([]byte, 20), off)
		assert.Equal(t, 0, n)
		assert.ErrorIs(t, err, blockdev.ErrOutOfRange, "offset %d", off)
		assert.Contains(t, err.Error(), path)
		assert.Contains(t, err.Error(), strconv.FormatInt(off, 10))

		_, err = f.WriteAtSync(make([]byte, 20), off)
		assert.ErrorIs(t, err, blockdev.ErrOutOfRange, "offset %d", off)
	}
	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, int64(size), info.Size(), "a rejected write must not grow the file")
}

func TestReadOnly(t *testing.T) {
	path := newFile(t, 8192)
	require.NoError(t, os.WriteFile(path, bytes.Repeat([]byte{7}, 8192), 0o600))
	f := open(t, path, blockdev.Options{ReadOnly: true})

	_, err := f.WriteAt([]byte{1}, 0)
	assert.ErrorIs(t, err, blockdev.ErrReadOnly)
	_, err = f.WriteAtSync([]byte{1}, 0)
	assert.ErrorIs(t, err, blockdev.ErrReadOnly)
	assert.ErrorIs(t, f.Discard(0, 4096), blockdev.ErrReadOnly)

	buf := make([]byte, 8192)
	_, err = f.ReadAt(buf, 0)
	require.NoError(t, err)
	assert.Equal(t, bytes.Repeat([]byte{7}, 8192), buf)
}

func TestWriteAtSync(t *testing.T) {
	path := newFile(t, 1<<20)
	f := open(t, path, blockdev.Options{})
	data := randomBytes(rand.New(rand.NewPCG(3, 4)), 12345)

	n, err := f.WriteAtSync(data, 4000)
	require.NoError(t, err)
	assert.Equal(t, len(data), n)

	got := make([]byte, len(data))
	_, err = f.ReadAt(got, 4000)
	require.NoError(t, err)
	assert.Equal(t, data, got)

	onDisk, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, data, onDisk[4000:4000+len(data)])
}

func TestDiscardPunchesHole(t *testing.T) {
	const size = 4 << 20
	path := newFile(t, size)
	f := open(t, path, blockdev.Options{})
	data := randomBytes(rand.New(rand.NewPCG(5, 6)), size)
	_, err := f.WriteAt(data, 0)
	require.NoError(t, err)
	require.NoError(t, f.Sync())
	before := allocatedBytes(t, path)
	require.GreaterOrEqual(t, before, int64(size), "written data must be allocated")

	const holeOff, holeLen = 1 << 20, 2 << 20
	require.NoError(t, f.Discard(holeOff, holeLen))

	got := make([]byte, size)
	_, err = f.ReadAt(got, 0)
	require.NoError(t, err)
	assert.Equal(t, data[:holeOff], got[:holeOff])
	assert.Equal(t, make([]byte, holeLen), got[holeOff:holeOff+holeLen])
	assert.Equal(t, data[holeOff+holeLen:], got[holeOff+holeLen:])
	assert.LessOrEqual(t, allocatedBytes(t, path), before-holeLen, "punching must free the blocks")

	info, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, int64(size), info.Size(), "discard keeps the size")
}

func TestDiscardUnalignedRangeReadsZero(t *testing.T) {
	const size = 64 << 10
	path := newFile(t, size)
	f := open(t, path, blockdev.Options{})
	data := bytes.Repeat([]byte{0xAB}, size)
	_, err := f.WriteAt(data, 0)
	require.NoError(t, err)

	require.NoError(t, f.Discard(1000, 10000))

	got := make([]byte, size)
	_, err = f.ReadAt(got, 0)
	require.NoError(t, err)
	want := bytes.Clone(data)
	clear(want[1000:11000])
	assert.Equal(t, want, got)
}

func TestDiscardRangeChecks(t *testing.T) {
	const size = 64 << 10
	path := newFile(t, size)
	f := open(t, path, blockdev.Options{})
	data := bytes.Repeat([]byte{0xCD}, size)
	_, err := f.WriteAt(data, 0)
	require.NoError(t, err)

	for _, r := range [][2]int64{{size - 4096, 8192}, {size, 1}, {-4096, 4096}, {0, -1}} {
		err := f.Discard(r[0], r[1])
		assert.ErrorIs(t, err, blockdev.ErrOutOfRange, "range %v", r)
	}
	assert.NoError(t, f.Discard(size, 0), "an empty discard at the end is allowed")

	got := make([]byte, size)
	_, err = f.ReadAt(got, 0)
	require.NoError(t, err)
	assert.Equal(t, data, got, "rejected discards must not change anything")
}

func TestDirectRoundTrip(t *testing.T) {
	const size = 1 << 20
	path := newFile(t, size)
	f := openDirect(t, path, blockdev.Options{})
	align := f.Alignment()
	require.GreaterOrEqual(t, align, 512)
	require.Zero(t, align&(align-1), "alignment %d must be a power of two", align)

	buf := blockdev.AlignedBuffer(4*align, align)
	copy(buf, randomBytes(rand.New(rand.NewPCG(7, 8)), len(buf)))
	off := int64(3 * align)
	n, err := f.WriteAt(buf, off)
	require.NoError(t, err)
	assert.Equal(t, len(buf), n)

	got := blockdev.AlignedBuffer(len(buf), align)
	n, err = f.ReadAt(got, off)
	require.NoError(t, err)
	assert.Equal(t, len(buf), n)
	assert.Equal(t, buf, got)

	synced := blockdev.AlignedBuffer(align, align)
	copy(synced, "durable")
	_, err = f.WriteAtSync(synced, 0)
	require.NoError(t, err)
	require.NoError(t, f.Sync())

	onDisk, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, buf, onDisk[off:off+int64(len(buf))], "direct writes are visible through the page cache")
	assert.Equal(t, synced, onDisk[:align])

	require.NoError(t, f.Discard(off, int64(align)))
	n, err = f.ReadAt(got, off)
	require.NoError(t, err)
	assert.Equal(t, len(got), n)
	assert.Equal(t, make([]byte, align), got[:align])
	assert.Equal(t, buf[align:], got[align:])
}

func TestDirectRejectsMisalignedRequests(t *testing.T) {
	const size = 1 << 20
	path := newFile(t, size)
	f := openDirect(t, path, blockdev.Options{})
	align := f.Alignment()
	aligned := blockdev.AlignedBuffer(2*align, align)
	misplaced := blockdev.AlignedBuffer(2*align+1, align)[1 : 1+align]

	cases := []struct {
		name string
		buf  []byte
		off  int64
	}{
		{"offset", aligned[:align], 100},
		{"length", aligned[:align-1], 0},
		{"memory", misplaced, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := f.ReadAt(c.buf, c.off)
			assert.ErrorIs(t, err, syscall.EINVAL)
			require.Error(t, err)
			assert.Contains(t, err.Error(), path)
			assert.Contains(t, err.Error(), "offset "+strconv.FormatInt(c.off, 10))
			assert.Contains(t, err.Error(), "length "+strconv.Itoa(len(c.buf)))

			_, err = f.WriteAt(c.buf, c.off)
			assert.ErrorIs(t, err, syscall.EINVAL)
			_, err = f.WriteAtSync(c.buf, c.off)
			assert.ErrorIs(t, err, syscall.EINVAL)
		})
	}
	assert.ErrorIs(t, f.Discard(100, int64(align)), syscall.EINVAL)
	assert.ErrorIs(t, f.Discard(0, int64(align)+1), syscall.EINVAL)
}

func TestExclusiveLockConflicts(t *testing.T) {
	path := newFile(t, 1<<20)
	first, err := blockdev.Open(path, blockdev.Options{Exclusive: true})
	require.NoError(t, err)

	_, err = blockdev.Open(path, blockdev.Options{Exclusive: true})
	require.Error(t, err)
	assert.ErrorIs(t, err, blockdev.ErrInUse)
	assert.Contains(t, err.Error(), "in use by another process")
	assert.Contains(t, err.Error(), path)

	_, err = blockdev.Open(path, blockdev.Options{Exclusive: true, ReadOnly: true})
	assert.ErrorIs(t, err, blockdev.ErrInUse, "a read-only exclusive open conflicts too")

	shared := open(t, path, blockdev.Options{})
	assert.Equal(t, int64(1<<20), shared.Size(), "a non-exclusive open is not blocked")

	require.NoError(t, first.Close())
	second, err := blockdev.Open(path, blockdev.Options{Exclusive: true})
	require.NoError(t, err, "closing the holder releases the lock")
	require.NoError(t, second.Close())
}

func TestClosedFileFails(t *testing.T) {
	path := newFile(t, 1<<20)
	f, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(t, err)
	require.NoError(t, f.Close())

	_, err = f.ReadAt(make([]byte, 10), 0)
	assert.ErrorIs(t, err, fs.ErrClosed)
	_, err = f.WriteAt(make([]byte, 10), 0)
	assert.ErrorIs(t, err, fs.ErrClosed)
	_, err = f.WriteAtSync(make([]byte, 10), 0)
	assert.ErrorIs(t, err, fs.ErrClosed)
	assert.ErrorIs(t, f.Sync(), fs.ErrClosed)
	assert.ErrorIs(t, f.Discard(0, 10), fs.ErrClosed)
	assert.Error(t, f.Close())
}

func TestConcurrentIO(t *testing.T) {
	const workers, span = 8, 64 << 10
	path := newFile(t, workers*span)
	f := open(t, path, blockdev.Options{})

	var wg sync.WaitGroup
	errs := make([]error, workers)
	for w := range workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			base := int64(w * span)
			for range 50 {
				off := base + rng.Int64N(span-512)
				data := randomBytes(rng, 512)
				var err error
				if rng.IntN(4) == 0 {
					_, err = f.WriteAtSync(data, off)
				} else {
					_, err = f.WriteAt(data, off)
				}
				if err != nil {
					errs[w] = err
					return
				}
				got := make([]byte, len(data))
				if _, err := f.ReadAt(got, off); err != nil {
					errs[w] = err
					return
				}
				if !bytes.Equal(data, got) {
					errs[w] = errors.New("read back differs at offset " + strconv.FormatInt(off, 10))
					return
				}
			}
		})
	}
	wg.Wait()
	for w, err := range errs {
		assert.NoError(t, err, "worker %d", w)
	}
}

func TestAlignedBuffer(t *testing.T) {
	for _, align := range []int{1, 2, 512, 4096, 65536} {
		for _, size := range []int{0, 1, 511, 4096, 100000} {
			buf := blockdev.AlignedBuffer(size, align)
			require.Len(t, buf, size)
			assert.Equal(t, size, cap(buf), "appending must not run into the padding silently")
			if size > 0 {
				addr := uintptr(unsafe.Pointer(&buf[0]))
				assert.Zero(t, addr%uintptr(align), "size %d align %d", size, align)
			}
			assert.Equal(t, make([]byte, size), buf)
		}
	}
	assert.Panics(t, func() { blockdev.AlignedBuffer(10, 3) })
	assert.Panics(t, func() { blockdev.AlignedBuffer(10, 0) })
	assert.Panics(t, func() { blockdev.AlignedBuffer(-1, 512) })
}

// Reads and writes sit under every NBD request: they must not allocate.
func TestReadWriteDoNotAllocate(t *testing.T) {
	path := newFile(t, 1<<20)
	f, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Close() })
	buf := make([]byte, 4096)
	allocs := testing.AllocsPerRun(100, func() {
		_, err := f.WriteAt(buf, 8192)
		require.NoError(t, err)
		_, err = f.ReadAt(buf, 8192)
		require.NoError(t, err)
	})
	assert.Zero(t, allocs, "allocations per write and read")
}
