package persistent_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// takeLazy prepares an exception for old, writes fill bytes as its data
// and commits it lazily.
func takeLazy(t *testing.T, s *persistent.Store, dev *faultdev.Device, old exstore.Chunk, fill byte) exstore.Exception {
	t.Helper()
	e := prepareWritten(t, s, dev, old, fill)
	require.NoError(t, s.CommitLazy(context.Background(), e))
	return e
}

// reopenAfterCut opens the store on a copy of what dev holds durably, as
// after a power cut that drops everything else; dev lives on.
func reopenAfterCut(t *testing.T, dev *faultdev.Device) (*persistent.Store, *faultdev.Device) {
	t.Helper()
	cut := faultdev.FromBytes("cut", dev.DurableBytes())
	return open(t, cut, 0), cut
}

func lookup(t *testing.T, s exstore.Store, old exstore.Chunk) (exstore.Chunk, bool) {
	t.Helper()
	n, found, release, err := s.Lookup(context.Background(), old)
	release()
	require.NoError(t, err)
	return n, found
}

// A lazily committed exception is visible at once, not durable until a
// Sync, and durable after it.
func TestCommitLazyVisibleAtOnceDurableAtSync(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 4*mib)
	s := open(t, dev, 8)
	e := takeLazy(t, s, dev, 7, 0x77)
	n, found := lookup(t, s, 7)
	require.True(t, found, "visible before any Sync")
	assert.Equal(t, e.New, n)
	assert.False(t, s.Durable(e.New), "durable before a Sync")

	lost, _ := reopenAfterCut(t, dev)
	_, found = lookup(t, lost, 7)
	assert.False(t, found, "a cut before Sync loses the lazy exception")

	dev.ResetStats()
	require.NoError(t, s.Sync(ctx))
	assert.True(t, s.Durable(e.New), "durable after Sync")
	assert.EqualValues(t, 1, dev.Stats().Syncs, "syncs: the batch's flush before its metadata, and no other")
	kept, cut := reopenAfterCut(t, dev)
	n, found = lookup(t, kept, 7)
	require.True(t, found, "a cut after Sync keeps the lazy exception")
	got := make([]byte, 4096)
	_, err := cut.ReadAt(got, int64(n)*4096)
	require.NoError(t, err)
	assert.Equal(t, bytes.Repeat([]byte{0x77}, 4096), got, "its data")
}

// A Sync with nothing to write still flushes the device, once.
func TestSyncWithoutLazyExceptionsFlushes(t *testing.T) {
	dev := faultdev.New("cow", 4*mib)
	s := open(t, dev, 8)
	take(t, s, dev, 1, 1)
	_, err := dev.WriteAt([]byte("a rewrite"), 100*4096)
	require.NoError(t, err)
	dev.ResetStats()
	require.NoError(t, s.Sync(context.Background()))
	assert.EqualValues(t, 1, dev.Stats().Syncs)
	_, cut := reopenAfterCut(t, dev)
	got := make([]byte, 9)
	_, err = cut.ReadAt(got, 100*4096)
	require.NoError(t, err)
	assert.Equal(t, "a rewrite", string(got), "a COW write before Sync survives the cut")
}

// A normal Commit after lazy ones (in allocation order) writes them too,
// and a lazy one prepared before a normal one is written with it.
func TestCommitWritesEarlierLazyOnes(t *testing.T) {
	dev := faultdev.New("cow", 4*mib)
	s := open(t, dev, 8)
	lazy := takeLazy(t, s, dev, 3, 3)
	normal := take(t, s, dev, 4, 4)
	assert.True(t, s.Durable(lazy.New), "the lazy exception before a committed one")
	assert.True(t, s.Durable(normal.New))
	kept, _ := reopenAfterCut(t, dev)
	for _, old := range []exstore.Chunk{3, 4} {
		_, found := lookup(t, kept, old)
		assert.True(t, found, "chunk %d after the cut", old)
	}
	later := takeLazy(t, s, dev, 5, 5)
	assert.False(t, s.Durable(later.New), "a lazy exception after the last batch")
	assert.EqualValues(t, 3, s.Usage().Exceptions)
}

// Prepare refuses a chunk that has a lazily committed exception.
func TestPrepareAfterLazyCommit(t *testing.T) {
	dev := faultdev.New("cow", 4*mib)
	s := open(t, dev, 8)
	takeLazy(t, s, dev, 9, 9)
	_, err := s.Prepare(context.Background(), 9)
	assert.ErrorIs(t, err, exstore.ErrExists)
}

// Close writes the lazily committed exceptions: a close is not a crash.
func TestCloseWritesLazyExceptions(t *testing.T) {
	dev := faultdev.New("cow", 4*mib)
	s, err := persistent.Open(context.Background(), dev, persistent.Options{ChunkSectors: 8, Logger: quietLogger()})
	require.NoError(t, err)
	for i := range 300 { // more than one area of 256
		takeLazy(t, s, dev, exstore.Chunk(1000+i), byte(i))
	}
	require.NoError(t, s.Close())
	kept, _ := reopenAfterCut(t, dev)
	assert.EqualValues(t, 300, kept.Usage().Exceptions)
}

// Sync of an invalid store fails with the reason.
func TestSyncOfInvalidStore(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 4*mib)
	s := open(t, dev, 8)
	takeLazy(t, s, dev, 2, 2)
	require.NoError(t, s.Invalidate(ctx, assert.AnError))
	assert.ErrorIs(t, s.Sync(ctx), exstore.ErrInvalid)
}
