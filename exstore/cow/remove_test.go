package cow

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
)

// TestRemoveSnapshot takes a snapshot out of its origin: origin writes stop
// copying into it, every use of it fails with ErrRemoved, and the other
// snapshots go on.
func TestRemoveSnapshot(t *testing.T) {
	ctx := context.Background()
	const size = 64 << 10
	o := NewOrigin(faultdev.New("origin", size))
	gone := addSnapshot(t, o, "gone", 8, 2*size, SnapshotOptions{}, make([]byte, size))
	kept := addSnapshot(t, o, "kept", 8, 2*size, SnapshotOptions{}, make([]byte, size))
	data := bytes.Repeat([]byte{7}, 4096)
	require.NoError(t, o.WriteAt(ctx, data, 0, false))
	require.NoError(t, o.RemoveSnapshot(gone.snap))

	require.NoError(t, o.WriteAt(ctx, data, 8192, false))
	assert.Equal(t, uint64(1), gone.store.Usage().Exceptions, "no copy after the removal")
	assert.Equal(t, uint64(2), kept.store.Usage().Exceptions)
	assert.Equal(t, []*Snapshot{kept.snap}, o.Snapshots())
	requireSame(t, kept.model, readAll(t, kept.snap), "the kept snapshot")

	buf := make([]byte, 512)
	assert.ErrorIs(t, gone.snap.ReadAt(ctx, buf, 0), ErrRemoved)
	assert.ErrorIs(t, gone.snap.WriteAt(ctx, buf, 0, false), ErrRemoved)
	assert.ErrorIs(t, gone.snap.Err(), ErrRemoved)
	assert.Error(t, o.RemoveSnapshot(gone.snap), "removed twice")
}
