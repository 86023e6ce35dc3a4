package clusterized_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// A merge step fails if another node changed the metadata between its
// PrepareMerge and CommitMerge; a merge that succeeds makes the other
// nodes reload at their next grant (a new epoch), and they stop seeing the
// merged exceptions.
func TestMergeAcrossNodes(t *testing.T) {
	ctx := context.Background()
	a, b, _ := twoNodes(t, "merge")

	for i := range 20 {
		add(t, a, exstore.Chunk(i))
	}
	last, n, err := a.PrepareMerge(ctx)
	require.NoError(t, err)
	require.Equal(t, 20, n)
	require.Equal(t, exstore.Chunk(19), last.Old)

	add(t, b, 500) // B appends between A's prepare and commit
	err = a.CommitMerge(ctx, n)
	require.ErrorIs(t, err, exstore.ErrMerge)
	require.Equal(t, walkMap(b), walkMap(a), "nothing was removed")

	last, n, err = a.PrepareMerge(ctx)
	require.NoError(t, err)
	require.Equal(t, 1, n, "B's exception is the last run now")
	require.Equal(t, exstore.Chunk(500), last.Old)
	require.NoError(t, a.CommitMerge(ctx, n))

	// Hits take no lock (merging is offline: the other nodes do not use the
	// snapshot meanwhile); B's next grant brings it up to date.
	reloads := b.Stats().Reloads
	miss(t, b, 9999)
	_, found, release, err := b.Lookup(ctx, 500)
	release()
	require.NoError(t, err)
	assert.False(t, found, "B no longer sees the merged exception")
	assert.Greater(t, b.Stats().Reloads, reloads, "a merge makes the others reload")
	assert.Equal(t, walkMap(a), walkMap(b))
}
