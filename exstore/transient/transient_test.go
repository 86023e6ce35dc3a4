package transient

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/storetest"
)

// shapedDevice is a faultdev device that claims another size and I/O
// alignment: a larger alignment, as with O_DIRECT on 4Kn disks, or a size far
// beyond the memory behind it, for stores that do no I/O.
type shapedDevice struct {
	*faultdev.Device
	size  int64
	align int
}

func (d shapedDevice) Size() int64    { return d.size }
func (d shapedDevice) Alignment() int { return d.align }

// newDevice returns an in-memory device of size bytes, closed when the test
// ends.
func newDevice(t testing.TB, size int64) *faultdev.Device {
	t.Helper()
	d := faultdev.New(t.Name()+".cow", size)
	t.Cleanup(func() { assert.NoError(t, d.Close()) })
	return d
}

// harness runs the conformance suite on transient stores over file devices.
func harness() storetest.Harness {
	return storetest.Harness{
		Name: "transient",
		New: func(t *testing.T, chunkSectors uint32, cowBytes int64) (exstore.Store, blockdev.Device) {
			dev := newDevice(t, cowBytes)
			s, err := New(dev, chunkSectors)
			require.NoError(t, err)
			return s, dev
		},
		Capacity: func(chunkSectors uint32, cowBytes int64) uint64 {
			return uint64(cowBytes) / exstore.SectorSize / uint64(chunkSectors)
		},
		IsMetadata: func(uint32, exstore.Chunk) bool { return false },
		WantUsage: func(chunkSectors uint32, cowBytes int64, n uint64) exstore.Usage {
			return exstore.Usage{
				AllocatedSectors: n * uint64(chunkSectors),
				TotalSectors:     uint64(cowBytes) / exstore.SectorSize,
				Exceptions:       n,
			}
		},
	}
}

func TestConformance(t *testing.T) { storetest.Run(t, harness()) }

// TestVector17 is test vector 17 of the format spec: with C=8 the first
// exception gets COW chunk 0 (byte 0), the status goes from 0/T 0 to 8/T 0,
// and the store itself writes and flushes nothing.
func TestVector17(t *testing.T) {
	const cowBytes = 1 << 20
	const totalSectors = cowBytes / exstore.SectorSize
	dev := newDevice(t, cowBytes)
	s, err := New(dev, 8)
	require.NoError(t, err)
	assert.Equal(t, fmt.Sprintf("0/%d 0", totalSectors), s.Usage().String())

	e, err := s.Prepare(t.Context(), 5)
	require.NoError(t, err)
	assert.Equal(t, exstore.Exception{Old: 5, New: 0}, e)
	assert.Zero(t, int64(e.New)*8*exstore.SectorSize, "COW byte offset of the first exception")
	require.NoError(t, s.Commit(t.Context(), e))
	assert.Equal(t, fmt.Sprintf("8/%d 0", totalSectors), s.Usage().String())
	assert.Equal(t, exstore.Usage{AllocatedSectors: 8, TotalSectors: totalSectors, Exceptions: 1}, s.Usage())

	e2, err := s.Prepare(t.Context(), 9)
	require.NoError(t, err)
	assert.Equal(t, exstore.Chunk(1), e2.New, "second exception")
	require.NoError(t, s.Commit(t.Context(), e2))
	require.NoError(t, s.Invalidate(t.Context(), errors.New("test")))
	require.NoError(t, s.Close())

	assert.Equal(t, faultdev.Stats{}, dev.Stats(), "I/O by the transient store")
	assert.Equal(t, make([]byte, cowBytes), dev.Bytes(), "COW content after a transient store's life")
}

// TestChunkSize checks the kernel's chunk-size rules.
func TestChunkSize(t *testing.T) {
	for _, tc := range []struct {
		sectors uint32
		align   int
		err     string // "" when the size is accepted
	}{
		{0, 1, "chunk size not set"},
		{1, 1, ""},
		{1, 512, ""},
		{3, 1, "not a power of 2"},
		{24, 1, "not a power of 2"},
		{8, 1, ""},
		{MaxChunkSectors, 1, ""},
		{MaxChunkSectors * 2, 1, "larger than"},
		{1 << 31, 1, "larger than"},
		{1, 4096, "not a multiple of the device's 4096-byte blocks"},
		{4, 4096, "not a multiple of the device's 4096-byte blocks"},
		{8, 4096, ""},
		{64, 4096, ""},
	} {
		t.Run(fmt.Sprintf("%d sectors, %d-byte alignment", tc.sectors, tc.align), func(t *testing.T) {
			dev := shapedDevice{newDevice(t, 1<<16), 1 << 16, tc.align}
			s, err := New(dev, tc.sectors)
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				assert.ErrorContains(t, err, dev.Name(), "the error names the device")
				assert.Nil(t, s)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.sectors, s.ChunkSectors())
			assert.NoError(t, s.Close())
		})
	}
}

// TestRegister checks the registry entry: names, alias, and the kernel's
// refusal of chunk size 0.
func TestRegister(t *testing.T) {
	r := exstore.NewRegistry()
	require.NoError(t, Register(r))
	assert.Error(t, Register(r), "registering twice")
	assert.Equal(t, []string{"transient"}, r.Names())

	dev := newDevice(t, 1<<16)
	for _, name := range []string{"transient", "N", "n"} {
		s, err := r.Open(t.Context(), name, dev, exstore.Args{ChunkSectors: 8})
		require.NoError(t, err, name)
		assert.IsType(t, &Store{}, s, name)
		assert.EqualValues(t, 8, s.ChunkSectors(), name)
		require.NoError(t, s.Close())
	}
	_, err := r.Open(t.Context(), "N", dev, exstore.Args{})
	assert.ErrorContains(t, err, "chunk size not set")
	_, err = r.Open(t.Context(), "N", dev, exstore.Args{ChunkSectors: 8, Params: []string{"x"}})
	assert.ErrorContains(t, err, "takes no parameters")
}

// TestNoSpace checks the kernel's end-of-device rule, next_free + C > size,
// on a device that is not a whole number of chunks.
func TestNoSpace(t *testing.T) {
	dev := newDevice(t, 11*exstore.SectorSize)
	s, err := New(dev, 4)
	require.NoError(t, err)
	defer s.Close()
	for want := range exstore.Chunk(2) {
		e, err := s.Prepare(t.Context(), 100+want)
		require.NoError(t, err)
		assert.Equal(t, want, e.New)
		require.NoError(t, s.Commit(t.Context(), e))
	}
	_, err = s.Prepare(t.Context(), 200)
	assert.ErrorIs(t, err, exstore.ErrNoSpace)
	assert.ErrorContains(t, err, dev.Name())
	assert.Equal(t, exstore.Usage{AllocatedSectors: 8, TotalSectors: 11, Exceptions: 2}, s.Usage())
}

// TestAbortedChunkStaysAllocated checks that an aborted chunk is neither
// reused nor given back in the usage, as next_free only grows in the kernel.
func TestAbortedChunkStaysAllocated(t *testing.T) {
	dev := newDevice(t, 1<<16)
	s, err := New(dev, 8)
	require.NoError(t, err)
	defer s.Close()
	a, err := s.Prepare(t.Context(), 1)
	require.NoError(t, err)
	s.Abort(a)
	s.Abort(a) // a second Abort is ignored
	assert.Equal(t, exstore.Usage{AllocatedSectors: 8, TotalSectors: 128, Exceptions: 0}, s.Usage())
	b, err := s.Prepare(t.Context(), 1)
	require.NoError(t, err)
	assert.Equal(t, exstore.Chunk(1), b.New)
	require.ErrorIs(t, s.Commit(t.Context(), a), exstore.ErrNotPrepared, "Commit after Abort")
	require.NoError(t, s.Commit(t.Context(), b))
	assert.False(t, s.Abort(b), "Abort after Commit is ignored")
	got, found, release, err := s.Lookup(t.Context(), 1)
	release()
	require.NoError(t, err)
	assert.True(t, found)
	assert.Equal(t, b.New, got)
}

// TestCommitMisuse checks that exceptions Prepare did not return are refused.
func TestCommitMisuse(t *testing.T) {
	dev := newDevice(t, 1<<16)
	s, err := New(dev, 8)
	require.NoError(t, err)
	defer s.Close()

	_, err = s.Prepare(t.Context(), exstore.MaxChunk+1)
	assert.ErrorContains(t, err, "beyond the largest chunk")

	assert.ErrorIs(t, s.Commit(t.Context(), exstore.Exception{Old: 1, New: 0}), exstore.ErrNotPrepared)
	e, err := s.Prepare(t.Context(), 1)
	require.NoError(t, err)
	assert.ErrorIs(t, s.Commit(t.Context(), exstore.Exception{Old: 2, New: e.New}), exstore.ErrNotPrepared, "wrong origin chunk")

	// A Commit queued behind an earlier exception cannot be queued twice.
	later, err := s.Prepare(t.Context(), 3)
	require.NoError(t, err)
	cancelled, cancel := context.WithCancel(t.Context())
	cancel()
	assert.ErrorIs(t, s.Commit(cancelled, later), context.Canceled)
	assert.ErrorContains(t, s.Commit(t.Context(), later), "already committed")

	require.NoError(t, s.Commit(t.Context(), e))
	assert.ErrorContains(t, s.Commit(t.Context(), e), "already completed", "second Commit")
	assert.EqualValues(t, 2, s.Usage().Exceptions)
}

// TestDuplicateOrigin checks that committing a second exception for an
// origin chunk fails without stalling the commits after it.
func TestDuplicateOrigin(t *testing.T) {
	dev := newDevice(t, 1<<16)
	s, err := New(dev, 8)
	require.NoError(t, err)
	defer s.Close()
	var es []exstore.Exception
	for _, old := range []exstore.Chunk{5, 5, 6} {
		e, err := s.Prepare(t.Context(), old)
		require.NoError(t, err)
		es = append(es, e)
	}
	require.NoError(t, s.Commit(t.Context(), es[0]))
	err = s.Commit(t.Context(), es[1])
	assert.Error(t, err, "second exception for chunk 5")
	assert.ErrorContains(t, err, dev.Name())
	require.NoError(t, s.Commit(t.Context(), es[2]))
	got, found, release, err := s.Lookup(t.Context(), 5)
	release()
	require.NoError(t, err)
	assert.True(t, found)
	assert.Equal(t, es[0].New, got, "the first exception for chunk 5 stays")
	assert.EqualValues(t, 2, s.Usage().Exceptions)
}

// TestMergeUnsupported checks that the transient store, like the kernel's,
// has no merge, and that Refresh has nothing to do.
func TestMergeUnsupported(t *testing.T) {
	dev := newDevice(t, 1<<16)
	s, err := New(dev, 8)
	require.NoError(t, err)
	defer s.Close()
	_, _, err = s.PrepareMerge(t.Context())
	assert.ErrorIs(t, err, errors.ErrUnsupported)
	assert.ErrorContains(t, err, dev.Name())
	assert.ErrorIs(t, s.CommitMerge(t.Context(), 1), errors.ErrUnsupported)
	assert.NoError(t, s.Refresh(t.Context()))
}

// TestInvalidateKeepsFirstReason checks that a second Invalidate does not
// replace the reason the store went invalid for.
func TestInvalidateKeepsFirstReason(t *testing.T) {
	dev := newDevice(t, 1<<16)
	s, err := New(dev, 8)
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.Err())
	first, second := errors.New("first"), errors.New("second")
	require.NoError(t, s.Invalidate(t.Context(), first))
	require.NoError(t, s.Invalidate(t.Context(), second))
	assert.ErrorIs(t, s.Err(), first)
	assert.NotErrorIs(t, s.Err(), second)
	var invalid *exstore.InvalidError
	require.ErrorAs(t, s.Err(), &invalid)
	assert.Equal(t, dev.Name(), invalid.Device)
}

// TestClose checks that Close ends waiting Commits and later calls.
func TestClose(t *testing.T) {
	dev := newDevice(t, 1<<16)
	s, err := New(dev, 8)
	require.NoError(t, err)
	a, err := s.Prepare(t.Context(), 1)
	require.NoError(t, err)
	b, err := s.Prepare(t.Context(), 2)
	require.NoError(t, err)
	bDone := make(chan error, 1)
	go func() { bDone <- s.Commit(t.Context(), b) }()

	require.NoError(t, s.Close())
	assert.ErrorIs(t, <-bDone, exstore.ErrClosed, "a Commit waiting during Close")
	assert.ErrorIs(t, s.Commit(t.Context(), a), exstore.ErrClosed)
	_, err = s.Prepare(t.Context(), 3)
	assert.ErrorIs(t, err, exstore.ErrClosed)
	_, _, release, err := s.Lookup(t.Context(), 1)
	assert.NotNil(t, release)
	assert.ErrorIs(t, err, exstore.ErrClosed)
	assert.ErrorIs(t, s.Invalidate(t.Context(), errors.New("x")), exstore.ErrClosed)
	assert.NoError(t, s.Close(), "second Close")
}

// BenchmarkPrepareCommit measures a COW's store work from parallel
// goroutines.
func BenchmarkPrepareCommit(b *testing.B) {
	dev := shapedDevice{newDevice(b, 0), 1 << 50, 1}
	s, err := New(dev, 8)
	require.NoError(b, err)
	defer s.Close()
	var next atomic.Uint64
	ctx := context.Background()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			e, err := s.Prepare(ctx, exstore.Chunk(next.Add(1)))
			if err != nil {
				b.Error(err)
				return
			}
			if err := s.Commit(ctx, e); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkLookup measures lookups of a table of a million exceptions.
func BenchmarkLookup(b *testing.B) {
	const n = 1 << 20
	dev := shapedDevice{newDevice(b, 0), n * 4096, 1}
	s, err := New(dev, 8)
	require.NoError(b, err)
	defer s.Close()
	ctx := context.Background()
	for i := range exstore.Chunk(n) {
		e, err := s.Prepare(ctx, i*3)
		require.NoError(b, err)
		require.NoError(b, s.Commit(ctx, e))
	}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var i exstore.Chunk
		for pb.Next() {
			_, _, release, err := s.Lookup(ctx, (i*7919)%(3*n))
			release()
			if err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
}
