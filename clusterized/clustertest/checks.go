package clustertest

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
)

// The checks below each force one race between two nodes, A (node 1) and
// B (node 2), with a hook, where CheckMultiNode's random workload meets it
// only by chance.

// twoNodes opens nodes A and B of a fresh cluster of h on one fresh COW
// device of 4 KiB chunks.
func twoNodes(tb testing.TB, h Harness, prefix string) (a, b openedNode) {
	tb.Helper()
	dev := faultdev.New("cow", 4<<20)
	formatCOW(tb, dev, 8)
	cluster := h.NewCluster(tb)
	id := newClusterID(prefix)
	return openNode(tb, h, cluster, 1, dev, id), openNode(tb, h, cluster, 2, dev, id)
}

// CheckOptimisticRead: node A's snapshot read of chunks chunks (1 or
// more) looks them up without holding its lock (the miss is optimistic)
// and reads the origin; during that read, node B copies the last chunk
// into the snapshot, commits, and overwrites the origin chunk, which it
// can since A holds nothing. A must notice that its lock moved and read
// again, from the COW: the snapshot's old data, never B's new data.
func CheckOptimisticRead(tb testing.TB, h Harness, chunks int64) {
	const chunk = 4096
	ctx := context.Background()
	originDev := faultdev.New("origin", 16*chunk)
	old := make([]byte, 16*chunk)
	for i := range old {
		old[i] = byte(i/chunk + 1)
	}
	_, err := originDev.WriteAt(old, 0)
	require.NoError(tb, err)
	cowDev := faultdev.New("cow", 64*chunk)
	formatCOW(tb, cowDev, chunk/512)
	cluster := h.NewCluster(tb)
	clusterID := newClusterID("optimistic-read")
	node := func(id uint32) (*cow.Origin, *cow.Snapshot) {
		s := openNode(tb, h, cluster, id, cowDev, clusterID).store
		o := cow.NewOrigin(originDev)
		snap, err := o.AddSnapshot("s", engineStore(h, id, s), cowDev, cow.SnapshotOptions{})
		require.NoError(tb, err)
		return o, snap
	}
	_, snapA := node(1)
	originB, _ := node(2)

	// A reads once: it takes CR and keeps it.
	got := make([]byte, chunks*chunk)
	require.NoError(tb, snapA.ReadAt(ctx, got, 0))
	require.Equal(tb, old[:len(got)], got)

	const c = 5
	var armed atomic.Bool
	armed.Store(true)
	var overwritten atomic.Bool
	originDev.SetFault(func(op faultdev.Op, off, _ int64) error {
		if op != faultdev.Read || off/chunk > c || !armed.CompareAndSwap(true, false) {
			return nil
		}
		// A is reading chunk c from the origin: B overwrites it now,
		// before the read copies the data.
		done := make(chan error, 1)
		go func() { done <- originB.WriteAt(ctx, bytes.Repeat([]byte{0xee}, chunk), c*chunk, false) }()
		err := <-done
		overwritten.Store(err == nil)
		return err
	})
	first := c - (chunks - 1)
	require.NoError(tb, snapA.ReadAt(ctx, got, first*chunk))
	originDev.SetFault(nil)
	require.True(tb, overwritten.Load(), "B overwrote chunk %d during A's read", c)
	assert.Equal(tb, old[first*chunk:(c+1)*chunk], got, "A's snapshot read returned what B wrote after the snapshot")
	// And B's exception is A's too now.
	require.NoError(tb, snapA.ReadAt(ctx, got[:chunk], c*chunk))
	assert.Equal(tb, old[c*chunk:(c+1)*chunk], got[:chunk], fmt.Sprintf("chunk %d again", c))
}

// CheckPrepareAdmission: node A's Prepare read its gate open in EX, and,
// before its core allocates, node B takes EX (A's drain does not wait for
// a Prepare that entered nothing) and commits an exception. A's core must
// refuse to allocate under the word it was given, which changed, so that
// A allocates only once it holds EX again, with B's exception read.
func CheckPrepareAdmission(tb testing.TB, h Harness) {
	na, nb := twoNodes(tb, h, "admission")
	a, b := na.store, nb.store
	ctx := context.Background()
	add(tb, a, 1) // A holds EX, its gate open
	var eB exstore.Exception
	hook := func() { eB = add(tb, b, 100) }
	na.hooks.beforePrepare.Store(&hook)
	eA, err := a.Prepare(ctx, 2)
	require.NoError(tb, err)
	require.Nil(tb, na.hooks.beforePrepare.Load(), "A's Prepare reached its core's PrepareIfUnchanged")
	if !assert.NotEqual(tb, eB.New, eA.New, "COW chunk allocated twice: %v by B, then %v by A", eB, eA) {
		a.Abort(eA)
		return
	}
	require.NoError(tb, a.Commit(ctx, eA))
	seen(tb, b, eA)
	seen(tb, a, eB)
}

// drainWait is how long CheckDrainWaitsForUnsettled waits for node B's
// Prepare, which must not return while node A holds a prepared
// exception. A drain that goes on regardless gives B EX within a few lock
// round trips; a correct one makes every run wait this long.
const drainWait = 500 * time.Millisecond

// CheckDrainWaitsForUnsettled: node A holds EX with an exception prepared
// (counted by its core as unsettled, no user inside); node B's Prepare
// must wait until A committed it, and then allocate another COW chunk.
func CheckDrainWaitsForUnsettled(tb testing.TB, h Harness) {
	na, nb := twoNodes(tb, h, "unsettled")
	a, b := na.store, nb.store
	ctx := context.Background()
	add(tb, a, 1) // A holds EX, its gate open
	eA, err := a.Prepare(ctx, 2)
	require.NoError(tb, err)
	if h.Inspector.UsersInside != nil {
		require.Zero(tb, h.Inspector.UsersInside(a), "A's Prepare took the core's count, not the gate's")
	}
	type result struct {
		e   exstore.Exception
		err error
	}
	bDone := make(chan result, 1)
	go func() {
		e, err := b.Prepare(ctx, 3)
		bDone <- result{e, err}
	}()
	var rB result
	select {
	case rB = <-bDone:
		tb.Errorf("B's Prepare returned %v while A held prepared %v", rB.e, eA)
	case <-time.After(drainWait):
	}
	require.NoError(tb, a.Commit(ctx, eA))
	if rB == (result{}) {
		rB = <-bDone
	}
	require.NoError(tb, rB.err)
	assert.NotEqual(tb, eA.New, rB.e.New, "COW chunk allocated twice: %v by A, %v by B", eA, rB.e)
	require.NoError(tb, b.Commit(ctx, rB.e))
}

// CheckOtherNodesExceptionsSeen: an exception node A commits is B's too
// once B takes its lock (the first time, and after a counter that moved
// on in the same epoch), and B's next allocation is another COW chunk.
func CheckOtherNodesExceptionsSeen(tb testing.TB, h Harness) {
	na, nb := twoNodes(tb, h, "seen")
	a, b := na.store, nb.store
	var byA []exstore.Exception
	for _, old := range []exstore.Chunk{1, 2} {
		e := add(tb, a, old)
		byA = append(byA, e)
		seen(tb, b, e)
	}
	eB := add(tb, b, 3)
	for _, e := range byA {
		assert.NotEqual(tb, e.New, eB.New, "A's %v and B's %v", e, eB)
	}
}

// seen checks that s's Lookup finds e.
func seen(tb testing.TB, s exstore.Store, e exstore.Exception) {
	tb.Helper()
	got, found, release, err := s.Lookup(context.Background(), e.Old)
	release()
	require.NoError(tb, err)
	assert.True(tb, found && got == e.New, "another node's exception %v seen: found %v, COW chunk %d", e, found, got)
}
