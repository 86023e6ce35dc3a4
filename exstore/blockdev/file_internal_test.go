//go:build linux

package blockdev

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func openTemp(t *testing.T, size int64) *File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "dev")
	require.NoError(t, Create(path, size))
	f, err := Open(path, Options{})
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

// The discard fallback for filesystems that cannot punch holes cannot be
// reached through Discard on this host's filesystems, so it is tested
// directly, with a range longer than its buffer.
func TestWriteZeroesFallback(t *testing.T) {
	const size = 3 << 20
	f := openTemp(t, size)
	full := bytes.Repeat([]byte{0x5A}, size)
	_, err := f.WriteAt(full, 0)
	require.NoError(t, err)

	const off, length = 100, zeroWriteChunk + 777
	require.NoError(t, f.writeZeroes(off, length))

	got := make([]byte, size)
	_, err = f.ReadAt(got, 0)
	require.NoError(t, err)
	want := bytes.Clone(full)
	clear(want[off : off+length])
	assert.Equal(t, want, got)
}

func TestWriteAtSyncUsesDsyncWhenSupported(t *testing.T) {
	f := openTemp(t, 1<<20)
	_, err := f.WriteAtSync([]byte("hello"), 10)
	require.NoError(t, err)
	assert.False(t, f.dsyncUnsupported.Load(), "this kernel supports RWF_DSYNC; no fallback expected")
}

func TestWriteAtSyncFallbackWrites(t *testing.T) {
	f := openTemp(t, 1<<20)
	f.dsyncUnsupported.Store(true)
	n, err := f.WriteAtSync([]byte("fallback"), 4096)
	require.NoError(t, err)
	assert.Equal(t, 8, n)

	got := make([]byte, 8)
	_, err = f.ReadAt(got, 4096)
	require.NoError(t, err)
	assert.Equal(t, "fallback", string(got))
}

func TestDsyncUnsupportedClassification(t *testing.T) {
	for _, err := range []error{unix.ENOSYS, unix.EOPNOTSUPP, unix.EINVAL, fmt.Errorf("wrapped: %w", unix.ENOSYS)} {
		assert.True(t, dsyncUnsupported(err), "%v", err)
	}
	for _, err := range []error{unix.EIO, unix.ENOSPC, errors.New("other")} {
		assert.False(t, dsyncUnsupported(err), "%v", err)
	}
}
