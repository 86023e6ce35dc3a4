package cow

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/transient"
)

// snapshotWithExceptions returns a snapshot of an origin of size bytes with
// a transient store of chunkSectors holding exceptions for chunks (no data:
// Extents only looks at the exceptions).
func snapshotWithExceptions(t *testing.T, size int64, chunkSectors uint32, chunks []exstore.Chunk) *Snapshot {
	t.Helper()
	ctx := context.Background()
	o := NewOrigin(faultdev.New("origin", size))
	cow := faultdev.New("cow", size*2+int64(chunkSectors)*exstore.SectorSize*2)
	store, err := transient.New(cow, chunkSectors)
	require.NoError(t, err)
	t.Cleanup(func() { _ = store.Close() })
	for _, c := range chunks {
		e, err := store.Prepare(ctx, c)
		require.NoError(t, err)
		require.NoError(t, store.Commit(ctx, e))
	}
	snap, err := o.AddSnapshot("snap", store, cow, SnapshotOptions{})
	require.NoError(t, err)
	return snap
}

// modelExtents computes the extents of [off, off+length) byte by byte from
// a per-byte map of where the data lives.
func modelExtents(inCOW []bool, off, length int64) []Extent {
	var out []Extent
	for i := off; i < off+length; i++ {
		if n := len(out); n > 0 && out[n-1].InCOW == inCOW[i] {
			out[n-1].Length++
			continue
		}
		out = append(out, Extent{Offset: i, Length: 1, InCOW: inCOW[i]})
	}
	return out
}

// TestExtentsModel compares Extents with a byte-level model for random
// exception sets, sparse (the store is walked) and dense (chunks are looked
// up), over random ranges and the whole volume.
func TestExtentsModel(t *testing.T) {
	for seed := range uint64(12) {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			chunkSectors := []uint32{1, 8, 16}[seed%3]
			chunkBytes := int64(chunkSectors) * exstore.SectorSize
			chunks := 20 + rng.Int64N(100)
			size := chunks*chunkBytes + rng.Int64N(chunkBytes)
			density := []float64{0.02, 0.3, 0.9}[rng.IntN(3)]
			var excepted []exstore.Chunk
			inCOW := make([]bool, size)
			for _, c := range rng.Perm(int(chunks) + 1) {
				if rng.Float64() >= density || int64(c)*chunkBytes >= size {
					continue
				}
				excepted = append(excepted, exstore.Chunk(c))
				for i := int64(c) * chunkBytes; i < min(int64(c+1)*chunkBytes, size); i++ {
					inCOW[i] = true
				}
			}
			snap := snapshotWithExceptions(t, size, chunkSectors, excepted)

			got, err := snap.Extents(context.Background(), 0, size)
			require.NoError(t, err)
			assert.Equal(t, modelExtents(inCOW, 0, size), got, "whole volume")
			for range 60 {
				off := rng.Int64N(size + 1)
				length := rng.Int64N(size - off + 1)
				got, err := snap.Extents(context.Background(), off, length)
				require.NoError(t, err)
				require.Equal(t, modelExtents(inCOW, off, length), got, "%d bytes at %d", length, off)
			}
		})
	}
}

// TestExtentsCoalesce checks that adjacent chunks of the same kind make one
// extent, and that a range inside one chunk is one extent.
func TestExtentsCoalesce(t *testing.T) {
	const chunkBytes = 8 * exstore.SectorSize
	size := int64(12 * chunkBytes)
	snap := snapshotWithExceptions(t, size, 8, []exstore.Chunk{4, 2, 3, 7})
	got, err := snap.Extents(context.Background(), 0, size)
	require.NoError(t, err)
	assert.Equal(t, []Extent{
		{Offset: 0, Length: 2 * chunkBytes},
		{Offset: 2 * chunkBytes, Length: 3 * chunkBytes, InCOW: true},
		{Offset: 5 * chunkBytes, Length: 2 * chunkBytes},
		{Offset: 7 * chunkBytes, Length: chunkBytes, InCOW: true},
		{Offset: 8 * chunkBytes, Length: 4 * chunkBytes},
	}, got)

	got, err = snap.Extents(context.Background(), 3*chunkBytes+100, 50)
	require.NoError(t, err)
	assert.Equal(t, []Extent{{Offset: 3*chunkBytes + 100, Length: 50, InCOW: true}}, got)

	got, err = snap.Extents(context.Background(), 5, 0)
	require.NoError(t, err)
	assert.Empty(t, got)
}

// TestExtentsPartialLastChunk checks that the last, partial chunk of an
// origin whose size is not a multiple of the chunk size is clipped.
func TestExtentsPartialLastChunk(t *testing.T) {
	const chunkBytes = 16 * exstore.SectorSize
	size := int64(5*chunkBytes + 1536)
	snap := snapshotWithExceptions(t, size, 16, []exstore.Chunk{5, 4})
	got, err := snap.Extents(context.Background(), 0, size)
	require.NoError(t, err)
	assert.Equal(t, []Extent{
		{Offset: 0, Length: 4 * chunkBytes},
		{Offset: 4 * chunkBytes, Length: chunkBytes + 1536, InCOW: true},
	}, got)

	got, err = snap.Extents(context.Background(), size-10, 10)
	require.NoError(t, err)
	assert.Equal(t, []Extent{{Offset: size - 10, Length: 10, InCOW: true}}, got)
}

// TestExtentsFollowWrites checks the extents of a snapshot after origin and
// snapshot writes: exactly the chunks written are COW-backed, and the
// origin-backed ranges read the same from the origin and the snapshot.
func TestExtentsFollowWrites(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(5, 5))
	const chunkBytes = 8 * exstore.SectorSize
	size := int64(40*chunkBytes + 512)
	originDev := newOriginDev(rng, int(size))
	o := NewOrigin(originDev)
	ts := addSnapshot(t, o, "s", 8, 2*size+64<<10, SnapshotOptions{}, originDev.Bytes())
	inCOW := make([]bool, size)
	for i := range 30 {
		var v volume = o
		if i%2 == 1 {
			v = ts.snap
		}
		off := rng.Int64N(size)
		n := min(1+rng.Int64N(3*chunkBytes), size-off)
		require.NoError(t, v.WriteAt(ctx, randomBytes(rng, int(n)), off, false))
		for b := off / chunkBytes * chunkBytes; b < min((off+n+chunkBytes-1)/chunkBytes*chunkBytes, size); b++ {
			inCOW[b] = true
		}
	}
	got, err := ts.snap.Extents(ctx, 0, size)
	require.NoError(t, err)
	require.Equal(t, modelExtents(inCOW, 0, size), got)
	for _, e := range got {
		if e.InCOW {
			continue
		}
		fromSnap := make([]byte, e.Length)
		require.NoError(t, ts.snap.ReadAt(ctx, fromSnap, e.Offset))
		fromOrigin := make([]byte, e.Length)
		require.NoError(t, o.ReadAt(ctx, fromOrigin, e.Offset))
		requireSame(t, fromOrigin, fromSnap, fmt.Sprintf("origin-backed extent at %d", e.Offset))
	}
}

// TestExtentsErrors checks out-of-range requests and invalid or merged
// snapshots.
func TestExtentsErrors(t *testing.T) {
	ctx := context.Background()
	const chunkBytes = 8 * exstore.SectorSize
	size := int64(10 * chunkBytes)
	snap := snapshotWithExceptions(t, size, 8, []exstore.Chunk{1})
	for _, r := range [][2]int64{{-1, 10}, {0, size + 1}, {size, 1}, {10, -1}} {
		_, err := snap.Extents(ctx, r[0], r[1])
		assert.ErrorIs(t, err, blockdev.ErrOutOfRange, "%d bytes at %d", r[1], r[0])
	}
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	_, err := snap.Extents(canceled, 0, size)
	assert.ErrorIs(t, err, context.Canceled)

	require.NoError(t, snap.Store().Invalidate(ctx, errors.New("test")))
	_, err = snap.Extents(ctx, 0, size)
	assert.ErrorIs(t, err, exstore.ErrInvalid)

	o := NewOrigin(faultdev.New("origin2", size))
	merged := addSnapshot(t, o, "merged", 8, 2*size+64<<10, SnapshotOptions{}, nil)
	require.NoError(t, o.Merge(ctx, merged.snap, nil))
	_, err = merged.snap.Extents(ctx, 0, size)
	assert.ErrorIs(t, err, ErrMerged)
}
