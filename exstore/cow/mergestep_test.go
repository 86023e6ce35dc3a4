package cow

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
)

// MergeStep merges about its budget at a time, reports progress, and ends
// the merge when nothing is left: the result is Merge's.
func TestMergeStep(t *testing.T) {
	ctx := context.Background()
	const size, chunk = 256 << 10, 4096
	o := NewOrigin(faultdev.New("origin", size))
	snap := addSnapshot(t, o, "s", chunk/512, 2*size, SnapshotOptions{}, make([]byte, size))
	for c := 0; c < size/chunk; c += 2 { // runs of one exception
		require.NoError(t, o.WriteAt(ctx, bytes.Repeat([]byte{0x7e}, chunk), int64(c*chunk), false))
	}
	steps, last := 0, MergeProgress{}
	for more := true; more; steps++ {
		var err error
		more, err = o.MergeStep(ctx, snap.snap, 5*chunk, func(p MergeProgress) { last = p })
		require.NoError(t, err)
		require.Less(t, steps, size/chunk, "the merge ends")
		if more {
			_, p, ok := o.Merging()
			require.True(t, ok, "the origin stays in merge mode between steps")
			assert.LessOrEqual(t, p.Done, uint64(5*(steps+1)))
		}
	}
	assert.Equal(t, size/chunk/2/5+1, steps, "five runs of one chunk a step, and the step that ends it")
	assert.Equal(t, last.Total, last.Done)
	_, _, merging := o.Merging()
	assert.False(t, merging)
	assert.Empty(t, o.Snapshots())
	requireSame(t, make([]byte, size), readAll(t, o), "the merged origin")
	assert.ErrorIs(t, snap.snap.Err(), ErrMerged)
}
