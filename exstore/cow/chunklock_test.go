package cow

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
)

func TestStripeRanges(t *testing.T) {
	for _, tc := range []struct {
		first, end         exstore.Chunk
		lo1, hi1, lo2, hi2 int
	}{
		{0, 1, 0, 1, 1, 1},
		{5, 69, 5, 69, 69, 69},
		{chunkLockStripes + 3, chunkLockStripes + 5, 3, 5, 5, 5},
		{chunkLockStripes - 2, chunkLockStripes + 3, 0, 3, chunkLockStripes - 2, chunkLockStripes},
		{0, chunkLockStripes, 0, chunkLockStripes, chunkLockStripes, chunkLockStripes},
	} {
		lo1, hi1, lo2, hi2 := stripeRanges(tc.first, tc.end)
		assert.Equal(t, [4]int{tc.lo1, tc.hi1, tc.lo2, tc.hi2}, [4]int{lo1, hi1, lo2, hi2}, "chunks %d to %d", tc.first, tc.end)
		assert.Equal(t, int(tc.end-tc.first), hi1-lo1+hi2-lo2, "one stripe per chunk")
	}
}

// TestChunkLocksRange checks that a run held by lockRange holds exactly
// its chunks' stripes (also across the wrap of the stripe table), and that
// everything is released.
func TestChunkLocksRange(t *testing.T) {
	var locks chunkLocks
	assert.EqualValues(t, 64, unsafe.Sizeof(locks.stripes[0]), "a stripe fills one cache line")
	first, end := exstore.Chunk(chunkLockStripes-2), exstore.Chunk(chunkLockStripes+3)
	locks.lockRange(first, end)
	assert.Equal(t, int(end-first), locks.held())
	for c := first; c < end; c++ {
		assert.False(t, locks.stripe(c).mu.TryLock(), "chunk %d is held", c)
	}
	assert.True(t, locks.stripe(end).mu.TryLock(), "the chunk after the run is free")
	locks.stripe(end).mu.Unlock()
	locks.unlockRange(first, end)
	assert.Zero(t, locks.held())

	locks.lock(7)
	assert.Equal(t, 1, locks.held())
	locks.unlock(7)
	assert.Zero(t, locks.held())
}

// TestOverwriteAnnouncements checks that a run's sum changes exactly when a
// chunk on one of its stripes is announced.
func TestOverwriteAnnouncements(t *testing.T) {
	var locks chunkLocks
	first, end := exstore.Chunk(chunkLockStripes-2), exstore.Chunk(chunkLockStripes+3)
	before := locks.announcements(first, end)
	locks.announceOverwrite(end)
	locks.announceOverwrite(first - 1)
	assert.Equal(t, before, locks.announcements(first, end), "chunks outside the run")
	locks.announceOverwrite(chunkLockStripes + 1)
	assert.Equal(t, before+1, locks.announcements(first, end), "a chunk of the run")
	locks.announceOverwrite(1 + 3*chunkLockStripes)
	assert.Equal(t, before+2, locks.announcements(first, end), "a chunk sharing a stripe with the run")
}

// TestReadRetriesUnderOriginOverwrite lands an origin write on a chunk while
// a snapshot read of it is reading the origin: the read must not return
// the new data. The write does not wait for the read; the read notices the
// announcement and reads again, from the COW.
func TestReadRetriesUnderOriginOverwrite(t *testing.T) {
	for _, n := range []int{100, 3 * smallChunk} {
		ctx := context.Background()
		o, dev, model, s := smallSetup(t, SnapshotOptions{})
		const c = 2
		var originReads atomic.Int32
		dev.SetFault(func(op faultdev.Op, off, _ int64) error {
			if op != faultdev.Read || off/smallChunk > c || originReads.Add(1) != 1 {
				return nil
			}
			// The first origin read of the snapshot read: overwrite the
			// chunk now, before the read copies its data.
			done := make(chan error, 1)
			go func() { done <- o.WriteAt(ctx, bytes.Repeat([]byte{0xab}, smallChunk), c*smallChunk, false) }()
			return <-done
		})
		got := make([]byte, n)
		require.NoError(t, s.snap.ReadAt(ctx, got, c*smallChunk))
		dev.SetFault(nil)
		requireSame(t, model[c*smallChunk:c*smallChunk+int64(n)], got, "snapshot read under an origin overwrite")
		assert.GreaterOrEqual(t, originReads.Load(), int32(1), "the read went to the origin first")
		assert.EqualValues(t, 1, s.store.Usage().Exceptions)
	}
}

// TestReadHoldsChunksAfterDisturbances disturbs every attempt of a read:
// after optimisticReadAttempts it must hold its chunks, and then finish.
func TestReadHoldsChunksAfterDisturbances(t *testing.T) {
	ctx := context.Background()
	_, dev, model, s := smallSetup(t, SnapshotOptions{})
	var attempts, heldAttempts int
	dev.SetFault(func(op faultdev.Op, off, _ int64) error {
		if op != faultdev.Read {
			return nil
		}
		attempts++
		if !s.snap.locks.stripe(4).mu.TryLock() {
			heldAttempts++
			return nil
		}
		s.snap.locks.stripe(4).mu.Unlock()
		// Another chunk on the same stripe is being copied for an
		// origin write.
		s.snap.locks.announceOverwrite(4 + chunkLockStripes)
		return nil
	})
	got := make([]byte, 3*smallChunk)
	require.NoError(t, s.snap.ReadAt(ctx, got, 3*smallChunk))
	dev.SetFault(nil)
	requireSame(t, model[3*smallChunk:6*smallChunk], got, "snapshot read")
	assert.Equal(t, optimisticReadAttempts+1, attempts, "attempts")
	assert.Equal(t, 1, heldAttempts, "attempts holding the chunks")
	assert.Zero(t, s.snap.locks.held())
}

// TestReadAcrossWindows reads random ranges, many of them longer than a
// read window, of a snapshot whose exceptions are scattered, some in runs
// of consecutive COW chunks and some not, and compares them with the model.
func TestReadAcrossWindows(t *testing.T) {
	ctx := context.Background()
	const chunks = 3*maxReadRunChunks + 17
	rng := rand.New(rand.NewPCG(21, 22))
	dev := newOriginDev(rng, chunks*smallChunk)
	o := NewOrigin(dev)
	model := dev.Bytes()
	s := addSnapshot(t, o, "s", smallChunkSectors, 2*chunks*smallChunk, SnapshotOptions{}, model)
	// A sequential run of origin writes (consecutive COW chunks), then
	// writes in random order (scattered COW chunks), then snapshot writes.
	seq := randomBytes(rng, 20*smallChunk)
	require.NoError(t, o.WriteAt(ctx, seq, 30*smallChunk, false))
	copy(model[30*smallChunk:], seq)
	for _, c := range rng.Perm(chunks)[:chunks/3] {
		data := randomBytes(rng, 100)
		require.NoError(t, o.WriteAt(ctx, data, int64(c)*smallChunk+50, false))
		copy(model[int64(c)*smallChunk+50:], data)
	}
	for range 20 {
		off := rng.Int64N(chunks*smallChunk - 600)
		data := randomBytes(rng, 1+rng.IntN(500))
		require.NoError(t, s.snap.WriteAt(ctx, data, off, false))
		copy(s.model[off:], data)
	}
	require.Positive(t, s.store.Usage().Exceptions)
	requireSame(t, model, readAll(t, o), "origin")
	requireSame(t, s.model, readAll(t, s.snap), "whole snapshot")
	for range 200 {
		off := rng.Int64N(chunks * smallChunk)
		n := 1 + rng.Int64N(min(chunks*smallChunk-off, 2*maxReadRunChunks*smallChunk))
		got := make([]byte, n)
		require.NoError(t, s.snap.ReadAt(ctx, got, off))
		requireSame(t, s.model[off:off+n], got, "snapshot read")
	}
	assert.Zero(t, s.snap.locks.held())
}

// TestReadOfInvalidSnapshot checks that reads report the snapshot's
// invalidity rather than the I/O error that came with it, and the I/O
// error while the snapshot is valid.
func TestReadOfInvalidSnapshot(t *testing.T) {
	ctx := context.Background()
	o, _, model, s := smallSetup(t, SnapshotOptions{})
	writeOrigin(t, o, model, 0, 0x42)
	writeOrigin(t, o, model, 1, 0x43)
	readFault := errors.New("injected COW read error")
	s.cow.SetFault(func(op faultdev.Op, _, _ int64) error {
		if op == faultdev.Read {
			return readFault
		}
		return nil
	})
	for _, n := range []int{100, 3 * smallChunk} {
		err := s.snap.ReadAt(ctx, make([]byte, n), 0)
		assert.ErrorIs(t, err, readFault, "%d bytes while valid", n)
		assert.NotErrorIs(t, err, exstore.ErrInvalid)
	}
	s.snap.invalidate(ctx, errors.New("test"))
	for _, n := range []int{0, 100, 3 * smallChunk} {
		err := s.snap.ReadAt(ctx, make([]byte, n), 0)
		assert.ErrorIs(t, err, exstore.ErrInvalid, "%d bytes once invalid", n)
	}
	s.cow.SetFault(nil)
	assert.ErrorIs(t, s.snap.ReadAt(ctx, make([]byte, smallChunk), 5*smallChunk), exstore.ErrInvalid, "an origin chunk")
}

// TestReadRetriesUnderSnapshotAllocation: while a snapshot read of a chunk
// without an exception reads the origin, a snapshot write allocates the
// chunk and then an origin write (which needs no copy any more) overwrites
// it. The read may return the old data or the snapshot write's, never the
// origin's new data.
func TestReadRetriesUnderSnapshotAllocation(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	const c = 5
	snapData := bytes.Repeat([]byte{0x5a}, 64)
	var originReads atomic.Int32
	dev.SetFault(func(op faultdev.Op, off, _ int64) error {
		if op != faultdev.Read || off/smallChunk != c || originReads.Add(1) != 1 {
			return nil
		}
		done := make(chan error, 2)
		go func() {
			done <- s.snap.WriteAt(ctx, snapData, c*smallChunk, false)
			done <- o.WriteAt(ctx, bytes.Repeat([]byte{0xab}, smallChunk), c*smallChunk, false)
		}()
		if err := <-done; err != nil {
			return err
		}
		return <-done
	})
	got := make([]byte, smallChunk)
	require.NoError(t, s.snap.ReadAt(ctx, got, c*smallChunk))
	dev.SetFault(nil)
	old := model[c*smallChunk : (c+1)*smallChunk]
	written := append(bytes.Clone(snapData), old[len(snapData):]...)
	if !bytes.Equal(got, old) {
		requireSame(t, written, got, "snapshot read under a snapshot allocation and an origin overwrite")
	}
}
