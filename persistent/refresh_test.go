package persistent_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
)

// Two stores on one device stand for two nodes sharing the COW; the
// clusterizer serialises them with locks, the test does it by hand.

func TestRefreshIsIncremental(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 64*mib)
	a := open(t, dev, 8) // E = 256
	for i := 0; i < 3000; i++ {
		take(t, a, dev, exstore.Chunk(i*2), byte(i))
	}
	b := open(t, dev, 0)
	require.Equal(t, uint64(3000), b.Usage().Exceptions)

	// Nothing changed: one header read and one read of the last record.
	dev.ResetStats()
	require.NoError(t, b.Refresh(ctx))
	assert.LessOrEqual(t, dev.Stats().Reads, uint64(3))

	// k new exceptions: on the order of k/E area reads, not the whole metadata.
	const k = 600
	for i := 0; i < k; i++ {
		take(t, a, dev, exstore.Chunk(100000+i), byte(i))
	}
	dev.ResetStats()
	require.NoError(t, b.Refresh(ctx))
	reads := dev.Stats().Reads
	assert.LessOrEqual(t, reads, uint64(2+k/256+2), "refresh after %d new exceptions", k)
	assert.Equal(t, walk(a), walk(b))
	assert.Equal(t, a.Usage(), b.Usage())

	// B continues where A left off: no chunk handed out twice.
	e := take(t, b, dev, 999999, 1)
	for old, nw := range walk(a) {
		assert.NotEqual(t, nw, e.New, "chunk of %d reused", old)
	}
	require.NoError(t, a.Refresh(ctx))
	assert.Equal(t, walk(a), walk(b))
}

func TestRefreshAfterMergeReloads(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 16*mib)
	a := open(t, dev, 8)
	for i := 0; i < 300; i++ {
		take(t, a, dev, exstore.Chunk(i), byte(i))
	}
	b := open(t, dev, 0)
	_, n, err := a.PrepareMerge(ctx)
	require.NoError(t, err)
	require.Equal(t, 44, n, "300 in-order records: the last area holds a run of 44")
	require.NoError(t, a.CommitMerge(ctx, n))
	// A appends again, so the shrink is not visible from the record count alone.
	take(t, a, dev, 5000, 1)

	require.NoError(t, b.Refresh(ctx))
	assert.Equal(t, walk(a), walk(b))
	assert.Equal(t, a.Usage(), b.Usage())
	_, ok, release, err := b.Lookup(ctx, 299)
	require.NoError(t, err)
	release()
	assert.False(t, ok, "merged exception gone on the other node")
}

func TestRefreshSeesInvalidation(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 4*mib)
	a := open(t, dev, 8)
	b := open(t, dev, 0)
	require.NoError(t, a.Invalidate(ctx, assert.AnError))
	require.NoError(t, b.Err())
	require.NoError(t, b.Refresh(ctx))
	assert.ErrorIs(t, b.Err(), exstore.ErrInvalid)
}

// A full reload must not show concurrent lookups a half-loaded table: a
// miss would send a snapshot read to the origin for a chunk whose old data
// lives in the COW.
func TestLookupsDuringFullReloadNeverMiss(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 64*mib)
	a := open(t, dev, 8)
	const kept = 3000
	for i := 0; i < kept; i++ {
		take(t, a, dev, exstore.Chunk(i), byte(i))
	}
	for i := 0; i < 50; i++ { // merged away one by one below
		take(t, a, dev, exstore.Chunk(1_000_000+i*2), byte(i))
	}
	b := open(t, dev, 0)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var misses atomic.Int64
	for r := 0; r < 2; r++ {
		wg.Add(1)
		go func(r int) {
			defer wg.Done()
			for i := r; ; i = (i + 7) % kept {
				select {
				case <-stop:
					return
				default:
				}
				_, ok, release, err := b.Lookup(ctx, exstore.Chunk(i))
				release()
				if err != nil || !ok {
					misses.Add(1)
				}
			}
		}(r)
	}
	for round := 0; round < 20; round++ {
		_, n, err := a.PrepareMerge(ctx)
		require.NoError(t, err)
		require.Equal(t, 1, n)
		require.NoError(t, a.CommitMerge(ctx, 1))
		require.NoError(t, b.Refresh(ctx)) // the last record changed: a full reload
	}
	close(stop)
	wg.Wait()
	assert.Zero(t, misses.Load(), "lookups of kept exceptions that missed during reloads")
	assert.Equal(t, walk(a), walk(b))
}

// A Refresh right after an Abort does not fail: the aborted exception
// leaves the queue with it rather than with the committer's next batch.
func TestRefreshAfterAbort(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 4*mib)
	s := open(t, dev, 8)
	for i := range 50 {
		e, err := s.Prepare(ctx, exstore.Chunk(i))
		require.NoError(t, err)
		s.Abort(e)
		require.NoError(t, s.Refresh(ctx), "refresh after abort %d", i)
	}
	e, err := s.Prepare(ctx, 1000)
	require.NoError(t, err)
	assert.Error(t, s.Refresh(ctx), "refresh with a prepared exception in flight")
	s.Abort(e)
}
