package cow

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
)

// plainDevice hides every method of a device but blockdev.Device's, so that
// it is not a blockdev.Discarder.
type plainDevice struct{ blockdev.Device }

// trimmedRange is the part of [off, off+n) a trim discards on a device
// with byte alignment: the whole 512-byte sectors inside it.
func trimmedRange(off, n int64) (start, end int64) {
	start = (off + 511) / 512 * 512
	end = (off + n) / 512 * 512
	return start, max(start, end)
}

// TestOriginTrimAndZeroesModel runs random origin writes, trims and zeroes
// and snapshot writes, zeroes and trims, and checks after each that the
// origin and every snapshot read exactly as their models say: origin trims
// and zeroes copy to the snapshots first, snapshot ones never reach the
// origin.
func TestOriginTrimAndZeroesModel(t *testing.T) {
	ctx := context.Background()
	const originSize = 64 * 4096
	rng := rand.New(rand.NewPCG(11, 12))
	dev := newOriginDev(rng, originSize)
	o := NewOrigin(dev)
	model := dev.Bytes()
	snaps := []*testSnap{
		addSnapshot(t, o, "a", 8, 2*originSize, SnapshotOptions{}, model),
		addSnapshot(t, o, "b", 32, 2*originSize, SnapshotOptions{}, model),
		addSnapshot(t, o, "ro", 16, 2*originSize, SnapshotOptions{ReadOnly: true}, model),
	}
	randomRange := func() (off, n int64) {
		off = rng.Int64N(originSize)
		n = 1 + rng.Int64N(min(originSize-off, 3*16384))
		return off, n
	}
	counts := map[string]int{}
	for step := range 400 {
		off, n := randomRange()
		var what string
		switch op := rng.IntN(7); op {
		case 0:
			what = "origin write"
			data := randomBytes(rng, int(n))
			require.NoError(t, o.WriteAt(ctx, data, off, false))
			copy(model[off:], data)
		case 1:
			what = "origin trim"
			require.NoError(t, o.Trim(ctx, off, n, rng.IntN(2) == 0))
			start, end := trimmedRange(off, n)
			clear(model[start:end])
		case 2:
			what = "origin zeroes"
			require.NoError(t, o.WriteZeroes(ctx, off, n, rng.IntN(2) == 0, rng.IntN(2) == 0))
			clear(model[off : off+n])
		case 3:
			what = "snapshot write"
			s := snaps[rng.IntN(2)]
			data := randomBytes(rng, int(n))
			require.NoError(t, s.snap.WriteAt(ctx, data, off, false))
			copy(s.model[off:], data)
		case 4, 5:
			what = "snapshot zeroes"
			s := snaps[rng.IntN(2)]
			require.NoError(t, s.snap.WriteZeroes(ctx, off, n, rng.IntN(2) == 0, rng.IntN(2) == 0))
			clear(s.model[off : off+n])
		case 6:
			what = "snapshot trim"
			require.NoError(t, snaps[rng.IntN(2)].snap.Trim(ctx, off, n, false))
		}
		counts[what]++
		requireSame(t, model, readAll(t, o), "origin after step "+what)
		requireSame(t, model, dev.Bytes(), "origin device after step "+what)
		for _, s := range snaps {
			require.NoError(t, s.snap.Err(), "step %d", step)
			requireSame(t, s.model, readAll(t, s.snap), "snapshot "+s.snap.Name()+" after step "+what)
		}
	}
	assert.Len(t, counts, 6, "every kind of step ran")
	assert.Positive(t, dev.Stats().Discards, "origin trims and zeroes discarded")
}

// TestOriginTrimCopiesTheChunksItDiscards checks which chunks an origin trim
// copies and which bytes it discards.
func TestOriginTrimCopiesTheChunksItDiscards(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	before := bytes.Clone(model)

	// Less than a whole sector: nothing is discarded, nothing copied.
	require.NoError(t, o.Trim(ctx, 5000, 100, false))
	assert.Zero(t, s.store.Usage().Exceptions)
	assert.Zero(t, dev.Stats().Discards)
	requireSame(t, before, dev.Bytes(), "origin after a sub-sector trim")

	// Bytes 100 to 3*4096+1000: sectors 1 to 24 (bytes 512 to 12800) are
	// discarded, which overlaps chunks 0 to 3.
	require.NoError(t, o.Trim(ctx, 100, 3*smallChunk+900, false))
	assert.Equal(t, uint64(4), s.store.Usage().Exceptions)
	got := dev.Bytes()
	assert.Equal(t, before[:512], got[:512], "head edge kept")
	assert.Equal(t, make([]byte, 12800-512), got[512:12800], "whole sectors discarded")
	assert.Equal(t, before[12800:], got[12800:], "tail edge and the rest kept")
	requireSame(t, before, readAll(t, s.snap), "snapshot")
}

// TestOriginTrimWithoutDiscarder checks that a trim of an origin whose
// device cannot discard changes nothing, and so copies nothing.
func TestOriginTrimWithoutDiscarder(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(3, 4))
	dev := newOriginDev(rng, 16*smallChunk)
	o := NewOrigin(plainDevice{dev})
	before := dev.Bytes()
	s := addSnapshot(t, o, "s", smallChunkSectors, 32*smallChunk, SnapshotOptions{}, before)

	require.NoError(t, o.Trim(ctx, 0, 16*smallChunk, true))
	assert.Zero(t, s.store.Usage().Exceptions)
	requireSame(t, before, dev.Bytes(), "origin")
	assert.Zero(t, dev.Stats().Writes+dev.Stats().WriteSyncs)

	// WriteZeroes still zeroes, by writing, after the copies.
	require.NoError(t, o.WriteZeroes(ctx, smallChunk, 2*smallChunk+512, false, false))
	assert.Equal(t, uint64(3), s.store.Usage().Exceptions)
	assert.Zero(t, dev.Stats().Discards)
	want := bytes.Clone(before)
	clear(want[smallChunk : 3*smallChunk+512])
	requireSame(t, want, dev.Bytes(), "origin")
	requireSame(t, before, readAll(t, s.snap), "snapshot")
}

// TestOriginWriteZeroesHoles checks that zeroes discard unless noHole is
// set, that the ragged edges are written, and that fua makes them durable.
func TestOriginWriteZeroesHoles(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	before := bytes.Clone(model)

	require.NoError(t, o.WriteZeroes(ctx, 300, 1000, true, false))
	assert.Zero(t, dev.Stats().Discards, "noHole writes")
	assert.Positive(t, dev.Stats().Writes)

	writes := dev.Stats().Writes
	require.NoError(t, o.WriteZeroes(ctx, 2*smallChunk+100, smallChunk, false, true))
	assert.Equal(t, uint64(1), dev.Stats().Discards, "the whole sectors are discarded")
	assert.Equal(t, writes+2, dev.Stats().Writes, "the two edges are written")

	clear(model[300:1300])
	clear(model[2*smallChunk+100 : 3*smallChunk+100])
	requireSame(t, model, dev.Bytes(), "origin")
	requireSame(t, model[2*smallChunk:4*smallChunk], dev.DurableBytes()[2*smallChunk:4*smallChunk], "origin durable after fua")
	requireSame(t, before, readAll(t, s.snap), "snapshot")
	assert.Equal(t, uint64(3), s.store.Usage().Exceptions, "chunks 0, 2 and 3 copied")
}

// TestLargeZeroes zeroes more than the zero buffer holds, on an origin and
// on a snapshot whose chunks are larger than the buffer.
func TestLargeZeroes(t *testing.T) {
	ctx := context.Background()
	const chunkSectors = 2 * zeroBufferBytes / 512
	const originSize = 4 * 2 * zeroBufferBytes
	rng := rand.New(rand.NewPCG(5, 6))
	dev := newOriginDev(rng, originSize)
	o := NewOrigin(dev)
	model := dev.Bytes()
	s := addSnapshot(t, o, "s", chunkSectors, 2*originSize, SnapshotOptions{}, model)

	// Chunk 1 whole and half of chunk 2, in 1 MiB pieces.
	from, to := int64(2*zeroBufferBytes), int64(5*zeroBufferBytes+4096)
	require.NoError(t, s.snap.WriteZeroes(ctx, from, to-from, false, true))
	clear(s.model[from:to])
	requireSame(t, s.model, readAll(t, s.snap), "snapshot")
	requireSame(t, model, dev.Bytes(), "origin")
	assert.Equal(t, uint64(2), s.store.Usage().Exceptions)

	require.NoError(t, o.WriteZeroes(ctx, 100, originSize-200, true, false))
	clear(model[100 : originSize-100])
	requireSame(t, model, dev.Bytes(), "origin")
	requireSame(t, s.model, readAll(t, s.snap), "snapshot")
	assert.Equal(t, uint64(4), s.store.Usage().Exceptions)
}

// TestSnapshotWriteZeroes checks that snapshot zeroes read back as zeroes,
// allocate only the chunks they cover, keep the rest of a partly zeroed
// chunk and leave the origin alone.
func TestSnapshotWriteZeroes(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	writeOrigin(t, o, model, 1, 0x55) // chunk 1 has an exception now
	originBefore := bytes.Clone(model)
	originStats := dev.Stats()

	// The end of chunk 0, all of chunk 1, the start of chunk 2.
	off, n := int64(smallChunk-700), int64(smallChunk+1400)
	require.NoError(t, s.snap.WriteZeroes(ctx, off, n, true, true))
	clear(s.model[off : off+n])
	requireSame(t, s.model, readAll(t, s.snap), "snapshot")
	assert.Equal(t, uint64(3), s.store.Usage().Exceptions)
	requireSame(t, originBefore, dev.Bytes(), "origin")
	assert.Equal(t, originStats.Writes, dev.Stats().Writes, "no origin writes")
	assert.Equal(t, originStats.Discards, dev.Stats().Discards, "no origin discards")
	assert.Positive(t, s.cow.Stats().WriteSyncs+s.cow.Stats().Syncs)

	// The zeroes outlive a power cut: they are in the COW chunks.
	cowDurable := s.cow.DurableBytes()
	for c := range exstore.Chunk(3) {
		newChunk, found, release, err := s.store.Lookup(ctx, c)
		release()
		require.NoError(t, err)
		require.True(t, found, "chunk %d", c)
		at := int64(newChunk) * smallChunk
		assert.Equal(t, s.model[int64(c)*smallChunk:int64(c+1)*smallChunk], cowDurable[at:at+smallChunk], "COW chunk of chunk %d", c)
	}

	// Zero length is a no-op.
	require.NoError(t, s.snap.WriteZeroes(ctx, 5*smallChunk, 0, false, false))
	assert.Equal(t, uint64(3), s.store.Usage().Exceptions)
}

// TestSnapshotTrimIsANoOp checks that a snapshot trim neither allocates nor
// writes anything, on chunks with and without an exception.
func TestSnapshotTrimIsANoOp(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	writeOrigin(t, o, model, 2, 0x22)
	require.NoError(t, s.snap.WriteAt(ctx, []byte("snapshot data"), 3*smallChunk+10, false))
	copy(s.model[3*smallChunk+10:], "snapshot data")
	originBefore := bytes.Clone(model)
	cowStats, originStats := s.cow.Stats(), dev.Stats()

	require.NoError(t, s.snap.Trim(ctx, 0, 16*smallChunk, true))
	require.NoError(t, s.snap.Trim(ctx, 2*smallChunk, smallChunk, false))
	assert.Equal(t, uint64(2), s.store.Usage().Exceptions)
	assert.Equal(t, cowStats, s.cow.Stats(), "COW untouched")
	assert.Equal(t, originStats, dev.Stats(), "origin untouched")
	requireSame(t, originBefore, dev.Bytes(), "origin")
	requireSame(t, s.model, readAll(t, s.snap), "snapshot")
}

func TestReadOnlySnapshotRefusesTrimAndZeroes(t *testing.T) {
	ctx := context.Background()
	_, dev, model, s := smallSetup(t, SnapshotOptions{ReadOnly: true})
	cowStats := s.cow.Stats()
	assert.ErrorIs(t, s.snap.Trim(ctx, 0, smallChunk, false), ErrReadOnly)
	assert.ErrorIs(t, s.snap.WriteZeroes(ctx, 0, smallChunk, false, false), ErrReadOnly)
	assert.Zero(t, s.store.Usage().Exceptions)
	assert.Equal(t, cowStats, s.cow.Stats(), "COW untouched")
	requireSame(t, model, dev.Bytes(), "origin")
	requireSame(t, model, readAll(t, s.snap), "snapshot")
}

// TestTrimAndZeroesWithInvalidSnapshot fills the COW with origin trims and
// zeroes: the snapshot is invalidated as by a write, and then its trims and
// zeroes fail while the origin's skip it.
func TestTrimAndZeroesWithInvalidSnapshot(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	for c := range int64(smallCOWCapacity) {
		if c%2 == 0 {
			require.NoError(t, o.Trim(ctx, c*smallChunk, smallChunk, false))
		} else {
			require.NoError(t, o.WriteZeroes(ctx, c*smallChunk, smallChunk, false, false))
		}
		clear(model[c*smallChunk : (c+1)*smallChunk])
		require.NoError(t, s.snap.Err(), "chunk %d fits", c)
	}
	requireSame(t, s.model, readAll(t, s.snap), "snapshot while valid")

	require.NoError(t, o.Trim(ctx, smallCOWCapacity*smallChunk, smallChunk, false))
	clear(model[smallCOWCapacity*smallChunk : (smallCOWCapacity+1)*smallChunk])
	assert.ErrorIs(t, s.snap.Err(), exstore.ErrInvalid)
	assert.ErrorIs(t, s.snap.Err(), ErrCOWFull)

	assert.ErrorIs(t, s.snap.Trim(ctx, 0, smallChunk, false), exstore.ErrInvalid)
	assert.ErrorIs(t, s.snap.WriteZeroes(ctx, 0, smallChunk, false, false), exstore.ErrInvalid)

	cowStats := s.cow.Stats()
	require.NoError(t, o.WriteZeroes(ctx, 10*smallChunk, 2*smallChunk, true, false))
	require.NoError(t, o.Trim(ctx, 12*smallChunk, 2*smallChunk, false))
	clear(model[10*smallChunk : 14*smallChunk])
	assert.Equal(t, cowStats, s.cow.Stats(), "the invalid snapshot is skipped")
	requireSame(t, model, dev.Bytes(), "origin")
}

func TestTrimAndZeroesChecks(t *testing.T) {
	ctx := context.Background()
	o, _, _, s := smallSetup(t, SnapshotOptions{})
	size := o.Size()
	for _, r := range [][2]int64{{-1, 10}, {size - 5, 10}, {0, size + 1}, {10, -1}} {
		assert.ErrorIs(t, o.Trim(ctx, r[0], r[1], false), blockdev.ErrOutOfRange, "origin trim %v", r)
		assert.ErrorIs(t, o.WriteZeroes(ctx, r[0], r[1], false, false), blockdev.ErrOutOfRange, "origin zeroes %v", r)
		assert.ErrorIs(t, s.snap.Trim(ctx, r[0], r[1], false), blockdev.ErrOutOfRange, "snapshot trim %v", r)
		assert.ErrorIs(t, s.snap.WriteZeroes(ctx, r[0], r[1], false, false), blockdev.ErrOutOfRange, "snapshot zeroes %v", r)
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	assert.ErrorIs(t, o.Trim(canceled, 0, smallChunk, false), context.Canceled)
	assert.ErrorIs(t, o.WriteZeroes(canceled, 0, smallChunk, false, false), context.Canceled)
	assert.ErrorIs(t, s.snap.Trim(canceled, 0, smallChunk, false), context.Canceled)
	assert.ErrorIs(t, s.snap.WriteZeroes(canceled, 0, smallChunk, false, false), context.Canceled)
	assert.Zero(t, s.store.Usage().Exceptions)
}

// TestZeroesOverflow checks that an overflowed snapshot refuses zeroes and
// trims as it refuses writes.
func TestZeroesOverflow(t *testing.T) {
	ctx := context.Background()
	_, _, _, s := smallSetup(t, SnapshotOptions{Overflow: true})
	require.NoError(t, s.snap.WriteZeroes(ctx, 0, smallCOWCapacity*smallChunk, false, false))
	assert.ErrorIs(t, s.snap.WriteZeroes(ctx, smallCOWCapacity*smallChunk, 1, false, false), ErrOverflow)
	assert.ErrorIs(t, s.snap.Trim(ctx, 0, 1, false), ErrOverflow)
	clear(s.model[:smallCOWCapacity*smallChunk])
	requireSame(t, s.model, readAll(t, s.snap), "snapshot")
}

// TestOriginZeroesFallBackWhenDiscardFails fails every discard of the
// origin: zeroes are written instead, a trim reports the failure.
func TestOriginZeroesFallBackWhenDiscardFails(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	dev.SetFault(func(op faultdev.Op, _, _ int64) error {
		if op == faultdev.Discard {
			return blockdev.ErrReadOnly
		}
		return nil
	})
	require.NoError(t, o.WriteZeroes(ctx, 0, 2*smallChunk, false, false))
	clear(model[:2*smallChunk])
	requireSame(t, model, dev.Bytes(), "origin")
	requireSame(t, s.model, readAll(t, s.snap), "snapshot")
	assert.ErrorIs(t, o.Trim(ctx, 4*smallChunk, smallChunk, false), blockdev.ErrReadOnly, "a failed trim reports why")
}
