package clusterized_test

import (
	"bytes"
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// openLazy opens a node's store on dev and returns it as the COW engine
// gets it, which must be a LazyStore.
func openLazy(t *testing.T, dev *faultdev.Device, engine lockc.Engine, id string) *clusterized.LazyStore {
	t.Helper()
	s := openClustered(t, dev, engine, id)
	t.Cleanup(func() { _ = s.Close() })
	lazy, ok := s.Exstore().(*clusterized.LazyStore)
	require.True(t, ok, "a persistent core commits lazily")
	return lazy
}

// addLazy prepares and lazily commits an exception for old.
func addLazy(t *testing.T, s *clusterized.LazyStore, old exstore.Chunk) exstore.Exception {
	t.Helper()
	ctx := context.Background()
	e, err := s.Prepare(ctx, old)
	require.NoError(t, err, "prepare %d", old)
	require.NoError(t, s.CommitLazy(ctx, e), "commit %v lazily", e)
	return e
}

// onDisk opens the COW device afresh and returns its exceptions.
func onDisk(t *testing.T, dev *faultdev.Device) map[exstore.Chunk]exstore.Chunk {
	t.Helper()
	disk, err := persistent.Open(context.Background(), dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
	require.NoError(t, err)
	defer disk.Close()
	return walkMap(disk)
}

// A lazily committed exception is written when the node gives EX up, before
// the other node is granted: the other node's refresh sees it, and so does
// a fresh open of the device. Until then it waits only under EX.
func TestGiveUpWritesLazyCommits(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 4<<20)
	formatCOW(t, dev, 8)
	cluster := inproc.NewCluster()
	a := openLazy(t, dev, cluster.Node(1), "giveup")
	b := openLazy(t, dev, cluster.Node(2), "giveup")

	e := addLazy(t, a, 7)
	got, found, release, err := a.Lookup(ctx, 7)
	release()
	require.NoError(t, err)
	require.True(t, found, "visible at once on its node")
	require.Equal(t, e.New, got)
	require.False(t, a.Durable(e.New), "not written yet")
	require.NotContains(t, onDisk(t, dev), e.Old, "not written yet")
	require.False(t, a.LazyWaitingOutsideEX(), "A holds EX while its commit waits")
	require.True(t, a.LazyWaiting(), "the core has A's lazy commit waiting")

	f := addLazy(t, b, 8) // B needs EX: A gives it up
	assert.False(t, a.LazyWaitingOutsideEX(), "A gave EX up with a lazy commit waiting")
	assert.True(t, a.Durable(e.New), "A wrote its lazy commit as it gave EX up")
	got, found, release, err = b.Lookup(ctx, 7)
	release()
	require.NoError(t, err)
	assert.True(t, found, "B's refresh sees A's lazy commit")
	assert.Equal(t, e.New, got)
	assert.NotEqual(t, e.New, f.New, "B allocated A's COW chunk")
	assert.Equal(t, map[exstore.Chunk]exstore.Chunk{7: e.New}, onDisk(t, dev), "A's exception is on disk, B's still waits")

	// Close writes B's too, while B still holds EX.
	require.NoError(t, b.Close())
	assert.Equal(t, map[exstore.Chunk]exstore.Chunk{7: e.New, 8: f.New}, onDisk(t, dev))
}

// A lazy commit changes the metadata: giving EX up publishes the counter
// one higher, and the next holder refreshes.
func TestLazyCommitMovesCounter(t *testing.T) {
	const id = "lazycounter"
	dev := faultdev.New("cow", 4<<20)
	formatCOW(t, dev, 8)
	cluster := inproc.NewCluster()
	a := openLazy(t, dev, cluster.Node(1), id)
	b := openLazy(t, dev, cluster.Node(2), id)
	observer := cluster.Node(9)

	add(t, a, 1)
	miss(t, b, 100) // A publishes
	before, ok, _ := observeLVB(t, observer, id)
	require.True(t, ok)

	addLazy(t, a, 2)
	refreshes := b.Stats().Refreshes
	_, found, release, err := b.Lookup(context.Background(), 2)
	release()
	require.NoError(t, err)
	assert.True(t, found)
	after, ok, _ := observeLVB(t, observer, id)
	require.True(t, ok)
	assert.Equal(t, before.Value+1, after.Value, "a lazy commit moves the counter")
	assert.Equal(t, before.Epoch, after.Epoch)
	assert.Equal(t, refreshes+1, b.Stats().Refreshes, "B refreshed for it")
}

// A node that dies with lazy commits not yet written loses them: its Sync
// fails with the loss, it writes nothing more (not even as it closes), and
// the survivor neither sees them nor finds their COW chunks taken.
func TestCrashLosesUnsyncedLazyCommits(t *testing.T) {
	const id = "lazycrash"
	ctx := context.Background()
	dev := faultdev.New("cow", 4<<20)
	formatCOW(t, dev, 8)
	cluster := inproc.NewCluster()
	a := openLazy(t, dev, cluster.Node(1), id)
	b := openLazy(t, dev, cluster.Node(2), id)

	durable := addLazy(t, a, 1)
	require.NoError(t, a.Sync(ctx))
	require.True(t, a.Durable(durable.New))
	lost := addLazy(t, a, 2)
	require.False(t, a.Durable(lost.New))

	st := dev.Stats()
	writesBefore := st.Writes + st.WriteSyncs
	cluster.Crash(1)
	err := a.Sync(ctx)
	require.ErrorIs(t, err, lockc.ErrLost)
	assert.ErrorContains(t, err, id)
	require.NoError(t, a.Close())
	st = dev.Stats()
	assert.Equal(t, writesBefore, st.Writes+st.WriteSyncs, "the dead node wrote after its loss")

	e := addLazy(t, b, 3)
	_, found, release, err := b.Lookup(ctx, 2)
	release()
	require.NoError(t, err)
	assert.False(t, found, "the survivor sees a lazy commit never written")
	got, found, release, err := b.Lookup(ctx, 1)
	release()
	require.NoError(t, err)
	assert.True(t, found && got == durable.New, "the survivor sees the synced one")
	assert.NotEqual(t, durable.New, e.New, "the survivor took a written exception's COW chunk")
	require.NoError(t, b.Sync(ctx))
	assert.Equal(t, map[exstore.Chunk]exstore.Chunk{1: durable.New, 3: e.New}, onDisk(t, dev))
}

// Through the COW engine: a snapshot write that a completed Flush covers
// survives its node's crash, for the other node (after its next grant) and
// on disk; one that no flush covered may be lost, and then reads as the
// snapshot's original data, never as anything else.
func TestFlushedSnapshotWriteSurvivesCrash(t *testing.T) {
	const id = "lazyflush"
	const chunk = 8 * exstore.SectorSize
	ctx := context.Background()
	originDev := faultdev.New("origin", 16*chunk)
	original := bytes.Repeat([]byte{0xAA}, 16*chunk)
	_, err := originDev.WriteAt(original, 0)
	require.NoError(t, err)
	dev := faultdev.New("cow", 4<<20)
	formatCOW(t, dev, 8)
	cluster := inproc.NewCluster()
	snapshot := func(s *clusterized.LazyStore) *cow.Snapshot {
		snap, err := cow.NewOrigin(originDev).AddSnapshot("snap", s, dev, cow.SnapshotOptions{})
		require.NoError(t, err)
		return snap
	}
	a := openLazy(t, dev, cluster.Node(1), id)
	b := openLazy(t, dev, cluster.Node(2), id)
	snapA, snapB := snapshot(a), snapshot(b)

	flushed := bytes.Repeat([]byte{1}, chunk)
	unflushed := bytes.Repeat([]byte{2}, chunk)
	require.NoError(t, snapA.WriteAt(ctx, flushed, 3*chunk, false))
	require.NoError(t, snapA.Flush(ctx))
	require.NoError(t, snapA.WriteAt(ctx, unflushed, 5*chunk, false))
	unflushedNew, found, release, err := a.Lookup(ctx, 5)
	release()
	require.NoError(t, err)
	require.True(t, found)
	require.False(t, a.Durable(unflushedNew), "snapshot writes commit lazily")
	cluster.Crash(1)
	require.NoError(t, a.Close())

	p := make([]byte, chunk)
	require.NoError(t, snapB.ReadAt(ctx, p, 3*chunk))
	assert.Equal(t, flushed, p, "B reads the flushed snapshot write")
	require.NoError(t, snapB.ReadAt(ctx, p, 5*chunk))
	assert.Equal(t, original[:chunk], p, "B reads the original data where the write was lost")
	disk := onDisk(t, dev)
	assert.Contains(t, disk, exstore.Chunk(3), "the flushed write's exception is on disk")
	assert.NotContains(t, disk, exstore.Chunk(5), "the dead node wrote its unflushed exception")
}

// A node that invalidates the store with lazy commits waiting cannot write
// them, and still gives EX up: the other node is not kept waiting, and
// finds the store invalid.
func TestInvalidateWithLazyCommitsGivesUp(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 4<<20)
	formatCOW(t, dev, 8)
	cluster := inproc.NewCluster()
	a := openLazy(t, dev, cluster.Node(1), "lazyinvalid")
	b := openLazy(t, dev, cluster.Node(2), "lazyinvalid")

	addLazy(t, a, 1)
	require.NoError(t, a.Invalidate(ctx, assert.AnError))
	_, err := b.Prepare(ctx, 2)
	assert.ErrorIs(t, err, exstore.ErrInvalid, "B finds the store invalid")
	assert.False(t, a.LazyWaitingOutsideEX())
}
