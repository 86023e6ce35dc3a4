package volumes

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/exstore/transient"
	"github.com/clustersnap/clustersnap/nbd"
)

// dirtyRanges returns the dirty [start, end) ranges of bitmap over the whole
// volume, failing the test on an error.
func dirtyRanges(t *testing.T, b nbd.DirtyBitmapper, bitmap string) [][2]int64 {
	t.Helper()
	ext, err := b.DirtyExtents(context.Background(), bitmap, 0, originSize)
	require.NoError(t, err)
	var out [][2]int64
	pos := int64(0)
	for _, e := range ext {
		require.Positive(t, e.Length)
		if e.Dirty {
			out = append(out, [2]int64{pos, pos + e.Length})
		}
		pos += e.Length
	}
	require.Equal(t, int64(originSize), pos, "the extents cover the volume")
	return out
}

// twoSnapshots opens the fixture's origin with s1 (persistent, 4 KiB
// chunks) and s2 (transient, 8 KiB chunks), both taken at open.
func twoSnapshots(t *testing.T) (*Set, map[string]nbd.DirtyBitmapper) {
	t.Helper()
	f := newFixture(t)
	v := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{
		{Name: "s1", COW: f.cow},
		{Name: "s2", COW: f.blank, Type: "N", ChunkSectors: 2 * chunk / exstore.SectorSize},
	}})
	exports, err := v.Exports("")
	require.NoError(t, err)
	backends := map[string]nbd.DirtyBitmapper{}
	for _, e := range exports {
		b, ok := e.Backend.(nbd.DirtyBitmapper)
		require.True(t, ok, "export %s offers dirty bitmaps", e.Name)
		backends[e.Name] = b
	}
	require.Len(t, backends, 3)
	return v, backends
}

// On the origin a snapshot's bitmap is its exceptions; on a snapshot X it
// is the union of the bitmap's snapshot's exceptions and X's own.
func TestDirtyBitmapsOfEveryExport(t *testing.T) {
	ctx := context.Background()
	v, backends := twoSnapshots(t)
	s1, s2 := v.Snapshots()[0], v.Snapshots()[1]
	if s1.Name() != "s1" {
		s1, s2 = s2, s1
	}
	for name, b := range backends {
		assert.Equal(t, []string{"s1", "s2"}, b.DirtyBitmaps(), name)
	}

	// The origin write copies 4 KiB chunk 3 into s1 and 8 KiB chunk 1
	// into s2; each snapshot write puts a chunk of its own in its COW.
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, 512), 3*chunk, false))
	require.NoError(t, s1.WriteAt(ctx, bytes.Repeat([]byte{0x33}, 512), 7*chunk, false))
	require.NoError(t, s2.WriteAt(ctx, bytes.Repeat([]byte{0x44}, 512), 20*chunk+512, false))

	inS1 := [][2]int64{{3 * chunk, 4 * chunk}, {7 * chunk, 8 * chunk}}
	inS2 := [][2]int64{{2 * chunk, 4 * chunk}, {20 * chunk, 22 * chunk}}
	union := [][2]int64{{2 * chunk, 4 * chunk}, {7 * chunk, 8 * chunk}, {20 * chunk, 22 * chunk}}
	assert.Equal(t, inS1, dirtyRanges(t, backends[OriginExport], "s1"))
	assert.Equal(t, inS2, dirtyRanges(t, backends[OriginExport], "s2"))
	assert.Equal(t, inS1, dirtyRanges(t, backends["s1"], "s1"))
	assert.Equal(t, inS2, dirtyRanges(t, backends["s2"], "s2"))
	assert.Equal(t, union, dirtyRanges(t, backends["s1"], "s2"))
	assert.Equal(t, union, dirtyRanges(t, backends["s2"], "s1"))

	// A range inside a chunk is answered for that range only.
	ext, err := backends["s1"].DirtyExtents(ctx, "s2", 3*chunk+100, 5*chunk)
	require.NoError(t, err)
	assert.Equal(t, []nbd.DirtyExtent{{Length: chunk - 100, Dirty: true}, {Length: 3 * chunk}, {Length: chunk, Dirty: true}, {Length: 100}}, ext)

	_, err = backends[OriginExport].DirtyExtents(ctx, "nosuch", 0, chunk)
	assert.ErrorIs(t, err, nbd.ErrNoSuchBitmap)
}

// Whatever the writes, a bitmap marks every byte where the export differs
// from the bitmap's snapshot as it was taken (here all the origin's first
// content, since both snapshots were taken at open).
func TestDirtyBitmapsCoverEveryChange(t *testing.T) {
	ctx := context.Background()
	v, backends := twoSnapshots(t)
	volumes := map[string]interface {
		ReadAt(context.Context, []byte, int64) error
		WriteAt(context.Context, []byte, int64, bool) error
	}{OriginExport: v.Origin}
	for _, s := range v.Snapshots() {
		volumes[s.Name()] = s
	}
	names := []string{OriginExport, "s1", "s2"}
	rng := rand.New(rand.NewPCG(20, 20))
	for range 60 {
		name := names[rng.IntN(len(names))]
		n := 512 * (1 + rng.IntN(16))
		off := 512 * rng.Int64N((originSize-int64(n))/512)
		require.NoError(t, volumes[name].WriteAt(ctx, bytes.Repeat([]byte{byte(0x20 + rng.IntN(200))}, n), off, false))
	}
	first := bytes.Repeat([]byte{0x11}, originSize)
	for _, name := range names {
		got := make([]byte, originSize)
		require.NoError(t, volumes[name].ReadAt(ctx, got, 0))
		for _, bitmap := range []string{"s1", "s2"} {
			dirty := make([]bool, originSize/512)
			ranges := dirtyRanges(t, backends[name], bitmap)
			for _, r := range ranges {
				for b := r[0] / 512; b < r[1]/512; b++ {
					dirty[b] = true
				}
			}
			changed, missed := 0, 0
			for b := range dirty {
				if !bytes.Equal(got[b*512:(b+1)*512], first[b*512:(b+1)*512]) {
					changed++
					if !dirty[b] {
						missed++
					}
				}
			}
			assert.Positive(t, changed, "export %s changed", name)
			assert.Zero(t, missed, "export %s, bitmap %s: %d changed sectors not marked dirty", name, bitmap, missed)
			assert.Less(t, len(ranges), originSize/chunk, "export %s, bitmap %s: not all dirty", name, bitmap)
		}
	}
}

// An invalid snapshot's bitmap is an error on every export, as is every
// bitmap of an invalid snapshot's export; the other bitmaps still answer.
// A snapshot added while serving has a bitmap at once, clean until the
// origin is written.
func TestDirtyBitmapsInvalidAndAdded(t *testing.T) {
	ctx := context.Background()
	v, backends := twoSnapshots(t)
	s1 := v.Snapshots()[0]
	if s1.Name() != "s1" {
		s1 = v.Snapshots()[1]
	}
	require.NoError(t, s1.Store().Invalidate(ctx, errors.New("test invalidation")))
	for name, b := range backends {
		_, err := b.DirtyExtents(ctx, "s1", 0, chunk)
		assert.ErrorIs(t, err, exstore.ErrInvalid, "bitmap s1 on %s", name)
	}
	_, err := backends["s1"].DirtyExtents(ctx, "s2", 0, chunk)
	assert.ErrorIs(t, err, exstore.ErrInvalid, "bitmap s2 on the invalid s1")
	assert.Empty(t, dirtyRanges(t, backends[OriginExport], "s2"))
	assert.Empty(t, dirtyRanges(t, backends["s2"], "s2"))

	path := filepath.Join(t.TempDir(), "s3")
	require.NoError(t, blockdev.Create(path, cowSize))
	dev, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { dev.Close() })
	store, err := transient.New(dev, chunk/exstore.SectorSize)
	require.NoError(t, err)
	_, err = v.Origin.AddSnapshot("s3", store, dev, cow.SnapshotOptions{})
	require.NoError(t, err)
	for name, b := range backends {
		assert.Equal(t, []string{"s1", "s2", "s3"}, b.DirtyBitmaps(), name)
	}
	assert.Empty(t, dirtyRanges(t, backends[OriginExport], "s3"))
	require.NoError(t, v.Origin.WriteAt(ctx, make([]byte, 512), 9*chunk, false))
	assert.Equal(t, [][2]int64{{9 * chunk, 10 * chunk}}, dirtyRanges(t, backends[OriginExport], "s3"))
	assert.Equal(t, [][2]int64{{8 * chunk, 10 * chunk}}, dirtyRanges(t, backends["s2"], "s3"), "s2's 8 KiB chunk and s3's 4 KiB one")
}

// A snapshot deleted while serving takes its bitmap away from every export
// at once.
func TestDirtyBitmapsFollowDelete(t *testing.T) {
	ctx := context.Background()
	v, backends := twoSnapshots(t)
	require.NoError(t, v.DeleteSnapshot(ctx, "s2"))
	for _, name := range []string{OriginExport, "s1"} {
		assert.Equal(t, []string{"s1"}, backends[name].DirtyBitmaps(), name)
		_, err := backends[name].DirtyExtents(ctx, "s2", 0, chunk)
		assert.ErrorIs(t, err, nbd.ErrNoSuchBitmap, name)
	}
	_, err := backends["s2"].DirtyExtents(ctx, "s1", 0, chunk)
	assert.Error(t, err, "the deleted snapshot's own backend answers no map")
}
