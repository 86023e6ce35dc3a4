package volumes

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// cowLabel reads the label of the COW at path.
func cowLabel(t *testing.T, path string) exstore.Label {
	t.Helper()
	dev, err := blockdev.Open(path, blockdev.Options{ReadOnly: true})
	require.NoError(t, err)
	defer dev.Close()
	l, _, err := persistent.ReadLabel(context.Background(), dev)
	require.NoError(t, err)
	return l
}

// TestMergeResumesAtOpen starts a merge, stops it after its first run,
// closes the Set and opens it again: Open finds the COW's label saying it
// merges and puts the origin back in merge mode before anything is
// served, the snapshot is no export of its own, Status shows the
// progress, and Merge finishes the merge; then the COW is marked merged
// and refused by the next Open.
func TestMergeResumesAtOpen(t *testing.T) {
	t.Run("flags", func(t *testing.T) { testMergeResumesAtOpen(t, false) })
	t.Run("catalog", func(t *testing.T) { testMergeResumesAtOpen(t, true) })
}

// testMergeResumesAtOpen is TestMergeResumesAtOpen, with the snapshot
// listed in a catalog or not: with one, the merged snapshot leaves it.
func testMergeResumesAtOpen(t *testing.T, withCatalog bool) {
	ctx := context.Background()
	f := newFixture(t)
	config := Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}}
	if withCatalog {
		config.Catalog = filepath.Join(t.TempDir(), "catalog")
	}
	v, err := Open(ctx, config)
	require.NoError(t, err)
	// Runs of different lengths: chunks 3-5, 9, 20-21.
	view := bytes.Repeat([]byte{0x11}, originSize)
	for i, c := range []int64{3, 4, 5, 9, 20, 21} {
		require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{byte(0x30 + i)}, chunk), c*chunk, false))
	}
	require.NoError(t, v.Origin.Flush(ctx))
	s := v.Snapshots()[0]
	assert.Equal(t, exstore.NotMerging, cowLabel(t, f.cow).Merge)

	mctx, cancel := context.WithCancel(ctx)
	err = v.Merge(mctx, s, func(cow.MergeProgress) { cancel() })
	require.ErrorIs(t, err, context.Canceled)
	got, p, ok := v.Merging()
	require.True(t, ok)
	assert.Equal(t, s, got)
	assert.Equal(t, uint64(6), p.Total)
	assert.Less(t, p.Done, p.Total)
	// A write in merge mode, to a chunk the snapshot still holds.
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x77}, 512), 3*chunk+512, true))
	copy(view[3*chunk+512:], bytes.Repeat([]byte{0x77}, 512))
	require.NoError(t, v.Close())
	l := cowLabel(t, f.cow)
	assert.Equal(t, exstore.Merging, l.Merge, "the COW says it merges")
	assert.Equal(t, int64(originSize), l.Origin.Size, "into this origin")

	v = open(t, config)
	got, p, ok = v.Merging()
	require.True(t, ok, "Open resumed merge mode")
	assert.Equal(t, v.Snapshots()[0], got)
	buf := make([]byte, originSize)
	require.NoError(t, v.Origin.ReadAt(ctx, buf, 0))
	assert.True(t, bytes.Equal(view, buf), "the origin reads as the snapshot, with the write made while merging")
	ex, err := v.Exports("")
	require.NoError(t, err)
	require.Len(t, ex, 1, "the merging snapshot is no export")
	assert.Equal(t, OriginExport, ex[0].Name)
	require.ErrorIs(t, v.DeleteSnapshot(ctx, "snap"), cow.ErrMergeInProgress, "a merging snapshot cannot be deleted")
	st := v.Status()
	require.NotNil(t, st.Snapshots[0].Merge)
	assert.Equal(t, MergeStatus{Done: 0, Total: p.Total}, *st.Snapshots[0].Merge)
	assert.Contains(t, st.Snapshots[0].State, "merging")

	require.NoError(t, v.Merge(ctx, v.Snapshots()[0], nil))
	_, _, ok = v.Merging()
	assert.False(t, ok)
	require.NoError(t, v.Origin.ReadAt(ctx, buf, 0))
	assert.True(t, bytes.Equal(view, buf), "the origin after the merge")
	assert.Empty(t, v.Snapshots(), "the merged snapshot leaves the set")
	assert.Empty(t, v.Status().Snapshots)
	require.NoError(t, v.Close())
	onDisk, err := os.ReadFile(f.origin)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(view, onDisk), "the origin image after the merge")
	assert.Equal(t, exstore.Merged, cowLabel(t, f.cow).Merge)

	if withCatalog {
		// The catalog no longer lists it: the origin serves alone.
		v = open(t, Config{Origin: f.origin, Catalog: config.Catalog})
		assert.Empty(t, v.Snapshots())
		require.NoError(t, v.Close())
	}
	for _, c := range []Config{{Origin: f.origin, Snapshots: config.Snapshots}, {Origin: f.origin, Snapshots: config.Snapshots, Cluster: &Cluster{ID: "c1", Engine: inproc.New()}}} {
		_, err = Open(ctx, c)
		require.ErrorIs(t, err, ErrMergedCOW)
		assert.Contains(t, err.Error(), "merged into its origin; format it again to reuse")
	}
}

// TestMergeOpenRefusals: two COWs that each say they merge into the
// origin, a merging COW served with a cluster, and a merging COW with an
// origin of another size, are refused; so is a merge with a cluster.
func TestMergeOpenRefusals(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	second := filepath.Join(t.TempDir(), "cow2")
	require.NoError(t, blockdev.Create(second, cowSize))
	dev, err := blockdev.Open(second, blockdev.Options{})
	require.NoError(t, err)
	st, err := persistent.Format(ctx, dev, chunk/exstore.SectorSize, nil)
	require.NoError(t, err)
	require.NoError(t, st.Close())
	require.NoError(t, dev.Close())
	for _, path := range []string{f.cow, second} {
		dev, err := blockdev.Open(path, blockdev.Options{})
		require.NoError(t, err)
		st, err := persistent.Open(ctx, dev, persistent.Options{NoFormat: true})
		require.NoError(t, err)
		require.NoError(t, cow.LabelMarker(st, exstore.OriginIdentity{Size: originSize})(ctx, exstore.Merging))
		require.NoError(t, st.Close())
		require.NoError(t, dev.Close())
	}
	_, err = Open(ctx, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "a", COW: f.cow}, {Name: "b", COW: second}}})
	require.ErrorIs(t, err, cow.ErrMergeInProgress)
	// A clustered serve of a merging COW follows the merge: merge mode,
	// no merge run (one node runs it, when told).
	cv, err := Open(ctx, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "a", COW: f.cow}}, Cluster: &Cluster{ID: "c1", Engine: inproc.New()}})
	require.NoError(t, err)
	m, _, ok := cv.Merging()
	require.True(t, ok, "a clustered serve of a merging COW is in merge mode")
	assert.Equal(t, "a", m.Name())
	require.NoError(t, cv.Close())

	small := filepath.Join(t.TempDir(), "small")
	require.NoError(t, os.WriteFile(small, make([]byte, originSize/2), 0o600))
	_, err = Open(ctx, Config{Origin: small, Snapshots: []SnapshotSpec{{Name: "a", COW: f.cow}}})
	require.ErrorIs(t, err, ErrLabelMismatch)
	assert.False(t, errors.Is(err, ErrMergedCOW))

	g := newFixture(t)
	v := open(t, Config{Origin: g.origin, Snapshots: []SnapshotSpec{{Name: "a", COW: g.cow}}, Cluster: &Cluster{ID: "c1", Engine: inproc.New()}})
	require.ErrorIs(t, v.Merge(ctx, v.Snapshots()[0], nil), ErrClusterMerge)
	_, _, ok = v.Merging()
	assert.False(t, ok)
	assert.Equal(t, exstore.NotMerging, cowLabel(t, g.cow).Merge)
}

// TestMergeUnexportsTheSnapshot: Set.Merge stops serving the snapshot's
// export before the merge, and serves it again when the merge could not
// begin (an invalid snapshot).
func TestMergeUnexportsTheSnapshot(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	v := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}})
	x := &recordingExporter{}
	ex, err := v.Exports("")
	require.NoError(t, err)
	for _, e := range ex {
		require.NoError(t, x.AddExport(e))
	}
	v.Export(x, "")
	s := v.Snapshots()[0]
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, chunk), 0, false))

	require.NoError(t, s.Store().Invalidate(ctx, errors.New("test")))
	require.ErrorIs(t, v.Merge(ctx, s, nil), exstore.ErrInvalid)
	assert.Equal(t, []string{"snap"}, x.removed)
	assert.Equal(t, []string{OriginExport, "snap"}, x.names, "served again")

	g := newFixture(t)
	v = open(t, Config{Origin: g.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: g.cow}}})
	x = &recordingExporter{}
	ex, err = v.Exports("")
	require.NoError(t, err)
	for _, e := range ex {
		require.NoError(t, x.AddExport(e))
	}
	v.Export(x, "")
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, chunk), 0, false))
	require.NoError(t, v.Merge(ctx, v.Snapshots()[0], nil))
	assert.Equal(t, []string{OriginExport}, x.names)
	assert.Empty(t, v.Snapshots())
}
