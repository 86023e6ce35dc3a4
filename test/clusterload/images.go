package clusterload

import (
	"bytes"
	"context"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// FormatCOW formats the COW image at path with chunks of chunkBytes, as
// snapd create does.
func FormatCOW(tb testing.TB, path string, chunkBytes int) {
	tb.Helper()
	dev, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(tb, err)
	s, err := persistent.Format(context.Background(), dev, uint32(chunkBytes/exstore.SectorSize), nil)
	require.NoError(tb, err)
	require.NoError(tb, s.Close())
	require.NoError(tb, dev.Close())
}

// FinalImages checks the quiescent COW at cowPath with persistent.Check
// (a failed check fails tb but the images are still returned) and returns
// the origin image at originPath and the snapshot view the COW holds over
// it, and whether the check was clean.
func FinalImages(ctx context.Context, tb testing.TB, originPath, cowPath string) (origin, view []byte, clean bool) {
	tb.Helper()
	dev, err := blockdev.Open(cowPath, blockdev.Options{ReadOnly: true})
	require.NoError(tb, err)
	defer dev.Close()
	report, err := persistent.Check(ctx, dev, nil)
	require.NoError(tb, err)
	clean = assert.True(tb, report.OK(), "snapd check: %+v", report)
	store, err := persistent.Open(ctx, dev, persistent.Options{})
	require.NoError(tb, err)
	defer store.Close()
	origin, err = os.ReadFile(originPath)
	require.NoError(tb, err)
	return origin, SnapshotView(ctx, tb, store, dev, origin), clean
}

// CheckImages checks the final origin image and snapshot view against h
// (CheckFinal), fails tb on every problem and logs what was checked. It
// returns how many problems it found.
func CheckImages(tb testing.TB, h *History, origin, view []byte) int {
	tb.Helper()
	problems := 0
	for _, d := range []struct {
		t   Target
		img []byte
	}{{ToOrigin, origin}, {ToSnapshot, view}} {
		rep := h.CheckFinal(d.t, d.img)
		tb.Logf("%v: %d blocks checked, %d written, %d with a flushed write", d.t, rep.Blocks, rep.Written, rep.Flushed)
		assert.Empty(tb, rep.Problems, "%v", d.t)
		problems += len(rep.Problems)
	}
	return problems
}

// SnapshotView is the snapshot as store and its cow device hold it over
// origin: the COW's chunk where the store has an exception.
func SnapshotView(ctx context.Context, tb testing.TB, store *persistent.Store, cow blockdev.Device, origin []byte) []byte {
	tb.Helper()
	chunk := int64(store.ChunkSectors()) * 512
	view := bytes.Clone(origin)
	for c := int64(0); c*chunk < int64(len(view)); c++ {
		newChunk, found, release, err := store.Lookup(ctx, exstore.Chunk(c))
		if err == nil && found {
			_, err = cow.ReadAt(view[c*chunk:min((c+1)*chunk, int64(len(view)))], int64(newChunk)*chunk)
		}
		release()
		require.NoError(tb, err, "chunk %d", c)
	}
	return view
}
