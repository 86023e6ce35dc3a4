package clusterized_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// A miss held by a reader keeps another node's EX (and so its COW of the
// chunk) waiting. A lookup another goroutine of the reader's node makes
// meanwhile, while the node drains for that EX, waits for the other node
// rather than keeping it out: it gets in once the other node had its EX,
// and sees its exception.
func TestHeldMissBlocksOtherNodesEX(t *testing.T) {
	ctx := context.Background()
	a, b, cluster := twoNodes(t, "held")

	add(t, a, 0) // A caches EX
	_, found, release1, err := a.Lookup(ctx, 1)
	require.NoError(t, err)
	require.False(t, found)

	done := make(chan error, 1)
	go func() {
		e, err := b.Prepare(ctx, 1)
		if err == nil {
			err = b.Commit(ctx, e)
		}
		done <- err
	}()
	require.Eventually(t, func() bool { return a.Stats().Drains >= 1 }, 10*time.Second, time.Millisecond, "A starts draining for B")

	type answer struct {
		found bool
		err   error
	}
	newcomer := make(chan answer, 1)
	go func() {
		_, found, release, err := a.Lookup(ctx, 1)
		release()
		newcomer <- answer{found, err}
	}()
	require.NoError(t, cluster.WaitQueueLen(ctx, "clustersnap", []byte("cow:held"), 1, 0), "B's conversion queued")
	select {
	case err := <-done:
		t.Fatalf("B allocated chunk 1 while A held its miss (err %v)", err)
	case got := <-newcomer:
		t.Fatalf("a newcomer got in while A drained for B (%+v)", got)
	default:
	}

	release1()
	require.NoError(t, <-done)
	got := <-newcomer
	require.NoError(t, got.err)
	assert.True(t, got.found, "the newcomer waited for B's exception")
}

// A lookup that waits for the lock gives up when its context ends, and
// leaves nothing behind: the node still serves and yields afterwards.
func TestWaitingLookupCancelled(t *testing.T) {
	ctx := context.Background()
	a, b, cluster := twoNodes(t, "cancel")

	e, err := b.Prepare(ctx, 5) // B holds EX until the commit
	require.NoError(t, err)
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, _, release, err := a.Lookup(cctx, 9)
		release()
		done <- err
	}()
	require.NoError(t, cluster.WaitQueueLen(ctx, "clustersnap", []byte("cow:cancel"), 1, 0), "A's conversion queued")
	cancel()
	err = <-done
	require.ErrorIs(t, err, context.Canceled)
	assert.ErrorContains(t, err, "cluster cancel")

	require.NoError(t, b.Commit(ctx, e))
	got, found, release, err := a.Lookup(ctx, 5)
	release()
	require.NoError(t, err)
	assert.True(t, found)
	assert.Equal(t, e.New, got)
	add(t, b, 6) // A gives the lock back: nothing of the cancelled wait is left inside
}

// An optimistic lookup answers as Lookup does while the node holds its
// lock, holds nothing (another node's EX does not wait for it), and its
// token stops vouching for the answer once the node gave the lock up for
// another node's allocation; with the lock given up, it declines.
func TestOptimisticLookup(t *testing.T) {
	a, b, _ := twoNodes(t, "optimistic")

	_, _, _, ok := a.LookupOptimistic(1)
	assert.False(t, ok, "A holds NL: it cannot vouch for a miss")

	e0 := add(t, a, 0) // A caches EX
	new, found, token, ok := a.LookupOptimistic(0)
	require.True(t, ok)
	assert.True(t, found)
	assert.Equal(t, e0.New, new)
	_, found, missToken, ok := a.LookupOptimistic(1)
	require.True(t, ok)
	assert.False(t, found)
	assert.Equal(t, token, missToken)
	into := make([]exstore.LookupResult, 3)
	rangeToken, ok := a.LookupRangeOptimistic(0, into)
	require.True(t, ok)
	assert.Equal(t, []exstore.LookupResult{{New: e0.New, Found: true}, {}, {}}, into)
	assert.True(t, a.Unchanged(rangeToken), "nothing happened")

	// B allocates chunk 1 without waiting for A's optimistic reader.
	e1 := add(t, b, 1)
	assert.False(t, a.Unchanged(missToken), "A gave its lock to B: the miss of chunk 1 is void")
	_, _, _, ok = a.LookupOptimistic(1)
	assert.False(t, ok, "A holds NL again")

	// A held lookup brings the lock back, and the optimistic one sees B's
	// exception.
	miss(t, a, 2)
	new, found, _, ok = a.LookupOptimistic(1)
	require.True(t, ok)
	assert.True(t, found)
	assert.Equal(t, e1.New, new)
}

// A second Commit or Abort of an exception, or a Commit of one that was
// aborted, settles it no more than once: the core refuses them, and the
// wrapper settles only what the core took. Over the persistent core the
// core counts prepared exceptions (exstore.ConditionalPreparer), over a
// plain core the gate counts them as users inside.
func TestMisusedCommitLeavesOnce(t *testing.T) {
	for _, tc := range []struct {
		name       string
		open       func(t testing.TB, dev blockdev.Device, engine lockc.Engine, id string) *clusterized.Store
		coreCounts bool
	}{
		{"persistent core", openClustered, true},
		{"plain core", openPlainClustered, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dev := faultdev.New("cow", 4<<20)
			formatCOW(t, dev, 8)
			s := tc.open(t, dev, inproc.New(), "misuse")
			t.Cleanup(func() { _ = s.Close() })
			for i, st := range []exstore.Store{s, s.Exstore()} {
				base := exstore.Chunk(10 * i)
				a, err := st.Prepare(ctx, base+1)
				require.NoError(t, err)
				b, err := st.Prepare(ctx, base+2)
				require.NoError(t, err)
				require.Equal(t, 2, s.Holders(), "two prepared exceptions")
				if tc.coreCounts {
					assert.Zero(t, s.UsersInside(), "the core counts prepared exceptions, the gate does not")
				}
				require.NoError(t, st.Commit(ctx, a))
				assert.ErrorIs(t, st.Commit(ctx, a), exstore.ErrNotPrepared)
				assert.False(t, st.Abort(a))
				assert.True(t, st.Abort(b))
				assert.False(t, st.Abort(b))
				assert.ErrorIs(t, st.Commit(ctx, b), exstore.ErrNotPrepared)
				if lazy, ok := st.(exstore.LazyCommitter); ok {
					assert.ErrorIs(t, lazy.CommitLazy(ctx, b), exstore.ErrNotPrepared)
				}
				assert.Zero(t, s.Holders(), "held after the misuse")
				miss(t, st, 1000) // and it still serves
			}
		})
	}
}

// An optimistic answer's token stops vouching for it the moment the node
// loses the lockspace, before the node's manager has noticed: the other
// nodes may take the node's place at once.
func TestOptimisticTokenVoidOnLoss(t *testing.T) {
	a, _, cluster := twoNodes(t, "optimistic-loss")
	miss(t, a, 1) // A takes CR
	_, found, token, ok := a.LookupOptimistic(1)
	require.True(t, ok)
	require.False(t, found)
	require.True(t, a.Unchanged(token))
	cluster.Crash(1)
	assert.False(t, a.Unchanged(token), "A lost the lockspace")
}
