package clusterized_test

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// TestOptimisticReadRetriesUnderOtherNodesOverwrite: node A's snapshot
// read of a chunk looks it up without holding its lock (the miss is
// optimistic) and reads the origin; during that read, node B copies the
// chunk into the snapshot, commits, and overwrites the origin chunk, which
// it can since A holds nothing. A must notice that its lock moved and read
// again, from the COW: the snapshot's old data, never B's new data. Both
// the one-chunk read and a read of a window of chunks are checked.
func TestOptimisticReadRetriesUnderOtherNodesOverwrite(t *testing.T) {
	for _, tc := range []struct {
		name   string
		chunks int64
	}{{"one chunk", 1}, {"window", 3}} {
		t.Run(tc.name, func(t *testing.T) { checkOptimisticRead(t, tc.chunks, nil) })
	}
}

// checkOptimisticRead is the check of
// TestOptimisticReadRetriesUnderOtherNodesOverwrite for a read of chunks
// chunks, with node A's COW engine over wrap(A's store) (nil: the store).
func checkOptimisticRead(t testing.TB, chunks int64, wrap func(exstore.Store) exstore.Store) {
	const chunk = 4096
	ctx := context.Background()
	originDev := faultdev.New("origin", 16*chunk)
	old := make([]byte, 16*chunk)
	for i := range old {
		old[i] = byte(i/chunk + 1)
	}
	_, err := originDev.WriteAt(old, 0)
	require.NoError(t, err)
	cowDev := faultdev.New("cow", 64*chunk)
	formatCOW(t, cowDev, chunk/512)
	cluster := inproc.NewCluster()
	node := func(id uint32, wrap func(exstore.Store) exstore.Store) (*cow.Origin, *cow.Snapshot) {
		s := openClustered(t, cowDev, cluster.Node(id), "optimistic-read")
		t.Cleanup(func() { _ = s.Close() })
		o := cow.NewOrigin(originDev)
		store := s.Exstore()
		if wrap != nil {
			store = wrap(store)
		}
		snap, err := o.AddSnapshot("s", store, cowDev, cow.SnapshotOptions{})
		require.NoError(t, err)
		return o, snap
	}
	_, snapA := node(1, wrap)
	originB, _ := node(2, nil)

	// A reads once: it takes CR and keeps it.
	got := make([]byte, chunks*chunk)
	require.NoError(t, snapA.ReadAt(ctx, got, 0))
	require.Equal(t, old[:len(got)], got)

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
	require.NoError(t, snapA.ReadAt(ctx, got, first*chunk))
	originDev.SetFault(nil)
	require.True(t, overwritten.Load(), "B overwrote chunk %d during A's read", c)
	assert.Equal(t, old[first*chunk:(c+1)*chunk], got, "A's snapshot read returned what B wrote after the snapshot")
	// And B's exception is A's too now.
	require.NoError(t, snapA.ReadAt(ctx, got[:chunk], c*chunk))
	assert.Equal(t, old[c*chunk:(c+1)*chunk], got[:chunk], fmt.Sprintf("chunk %d again", c))
}
