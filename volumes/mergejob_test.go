package volumes

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestStartMergeRunsInTheBackground: StartMerge unexports the snapshot and
// switches the origin to merge mode before it returns, so the origin
// already reads as the snapshot; the merge runs on, and the job reports
// its end. Refusals come back at once and change nothing.
func TestStartMergeRunsInTheBackground(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	v, x := serving(t, f)
	_, err := v.CreateSnapshot(ctx, CreateRequest{Name: "snap", COW: f.blank, Force: true})
	require.NoError(t, err)
	changed := bytes.Repeat([]byte{0x22}, 64*chunk)
	require.NoError(t, v.Origin.WriteAt(ctx, changed, 0, false))

	_, err = v.StartMerge(ctx, "nope")
	assert.ErrorIs(t, err, ErrNoSuchSnapshot)
	_, err = v.StartMerge(ctx, "")
	assert.Error(t, err, "no merge under way to resume")
	assert.Equal(t, MergeJobStatus{}, v.MergeJob())

	st, err := v.StartMerge(ctx, "snap")
	require.NoError(t, err)
	assert.Equal(t, "snap", st.Snapshot)
	assert.Contains(t, x.removed, "snap", "unexported before the merge")
	got := make([]byte, len(changed))
	require.NoError(t, v.Origin.ReadAt(ctx, got, 0))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, len(changed)), got, "the origin reads as the snapshot from the start")

	end, err := v.WaitMerge(ctx)
	require.NoError(t, err)
	assert.Equal(t, MergeDone, end.State, end.Error)
	assert.Equal(t, uint64(64), end.Total)
	assert.Equal(t, end.Total, end.Done)
	assert.Empty(t, v.Snapshots())
	require.NotNil(t, v.Status().MergeJob)
	assert.Equal(t, MergeDone, v.Status().MergeJob.State)
	require.NoError(t, v.Origin.ReadAt(ctx, got, 0))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, len(changed)), got)
}
