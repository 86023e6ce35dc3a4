package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/volumes"
)

// TestMergeResumesAMergeUnderWay: a merge stopped after its first run
// leaves the COW marked merging; snapd merge resumes it, and refuses the
// merged COW afterwards.
func TestMergeResumesAMergeUnderWay(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	origin := sparse(t, dir, "origin", 8<<20)
	cowPath := filepath.Join(dir, "cow")
	code, _, errOut := runCLI(t, "create", "--origin", origin, "--cow", cowPath, "--cow-size", "1MiB")
	require.Equal(t, exitOK, code, errOut)

	v, err := volumes.Open(ctx, volumes.Config{Origin: origin, Snapshots: []volumes.SnapshotSpec{{Name: "s", COW: cowPath}}})
	require.NoError(t, err)
	view := make([]byte, 8<<20) // the sparse origin's content, the snapshot's view
	for _, off := range []int64{0, 1 << 20, 3 << 20} {
		require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0xaa}, 8192), off, false))
	}
	mctx, cancel := context.WithCancel(ctx)
	require.ErrorIs(t, v.Merge(mctx, v.Snapshots()[0], func(cow.MergeProgress) { cancel() }), context.Canceled)
	require.NoError(t, v.Close())

	code, out, errOut := runCLI(t, "merge", "--origin", origin, "--cow", cowPath)
	require.Equal(t, exitOK, code, errOut)
	assert.Contains(t, out, "merged 4 exceptions")
	got, err := os.ReadFile(origin)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(view, got), "the origin is the snapshot's view")

	code, _, errOut = runCLI(t, "merge", "--origin", origin, "--cow", cowPath)
	assert.Equal(t, exitError, code)
	assert.Contains(t, errOut, "merged into its origin; format it again to reuse")
}
