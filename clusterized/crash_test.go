package clusterized_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// observeLVB reads the store's LVB as a new NL lock of another node sees it.
func observeLVB(t *testing.T, engine lockc.Engine, clusterID string) (clusterized.Counter, bool, lockc.LVBState) {
	t.Helper()
	ctx := context.Background()
	ls, err := engine.Open(ctx, clusterized.DefaultLockspace)
	require.NoError(t, err)
	defer ls.Close()
	l, err := ls.Lock(ctx, clusterized.ResourceName(clusterID), lockc.NL)
	require.NoError(t, err)
	defer l.Unlock(ctx)
	b, state := l.LVB()
	c, ok := clusterized.DecodeLVB(b)
	return c, ok, state
}

// A node dies holding EX after committing exceptions it never published and
// with one more in flight. The next holder finds the LVB invalid, reloads,
// sees the dead node's commits, allocates after them and re-seeds the
// counter above every earlier value with a new epoch; the dead node writes
// nothing more.
//
// With Reopen the "full reload" opens the core again; without it (a core
// wrapped by New alone) it falls back to the core's Refresh, which reads on
// from where it stopped, and must reach the same state.
func TestCrashReseeds(t *testing.T) {
	t.Run("reopen", func(t *testing.T) { testCrashReseeds(t, true) })
	t.Run("refresh fallback", func(t *testing.T) { testCrashReseeds(t, false) })
}

func testCrashReseeds(t *testing.T, reopen bool) {
	const id = "crash"
	ctx := context.Background()
	dev := faultdev.New("cow", 16<<20)
	formatCOW(t, dev, 8)
	cluster := inproc.NewCluster()
	open := func(node uint32) *clusterized.Store {
		if reopen {
			return openClustered(t, dev, cluster.Node(node), id)
		}
		core, err := persistent.Open(ctx, dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
		require.NoError(t, err)
		s, err := clusterized.New(ctx, core, cluster.Node(node), id, clusterized.Options{})
		require.NoError(t, err)
		return s
	}
	a := open(1)
	t.Cleanup(func() { _ = a.Close() })
	b := open(2)
	t.Cleanup(func() { _ = b.Close() })
	c := open(3)
	t.Cleanup(func() { _ = c.Close() })
	observer := cluster.Node(9)

	for i := range 10 {
		add(t, a, exstore.Chunk(i))
	}
	miss(t, b, 1000) // A publishes
	before, ok, state := observeLVB(t, observer, id)
	require.True(t, ok)
	require.Equal(t, lockc.LVBValid, state)

	// A commits more under a fresh EX, then dies with one in flight.
	var unpublished []exstore.Exception
	for i := range 5 {
		unpublished = append(unpublished, add(t, a, exstore.Chunk(100+i)))
	}
	inFlight, err := a.Prepare(ctx, 200)
	require.NoError(t, err)
	st := dev.Stats()
	writesBefore := st.Writes + st.WriteSyncs + st.Syncs
	cluster.Crash(1)

	err = a.Commit(ctx, inFlight)
	require.ErrorIs(t, err, lockc.ErrLost)
	assert.ErrorContains(t, err, id)
	_, err = a.Prepare(ctx, 201)
	assert.ErrorIs(t, err, lockc.ErrLost)
	assert.ErrorIs(t, a.Invalidate(ctx, assert.AnError), lockc.ErrLost)
	_, _, release, err := a.Lookup(ctx, 202)
	release()
	assert.ErrorIs(t, err, lockc.ErrLost)
	assert.ErrorIs(t, a.Err(), lockc.ErrLost)
	st = dev.Stats()
	assert.Equal(t, writesBefore, st.Writes+st.WriteSyncs+st.Syncs, "the dead node wrote after its loss")
	require.NoError(t, a.Close())

	_, _, state = observeLVB(t, observer, id)
	require.Equal(t, lockc.LVBInvalid, state)

	// B takes EX: invalid LVB, full reload; it sees A's unpublished commits.
	reloads, invalid := b.Stats().Reloads, b.Stats().InvalidLVBs
	e := add(t, b, 300)
	assert.Greater(t, b.Stats().Reloads, reloads)
	assert.Greater(t, b.Stats().InvalidLVBs, invalid)
	for _, u := range unpublished {
		got, found, release, err := b.Lookup(ctx, u.Old)
		release()
		require.NoError(t, err)
		assert.True(t, found && got == u.New, "B sees A's commit %v", u)
		assert.NotEqual(t, u.New, e.New, "B reused a committed chunk")
	}

	// C's read makes B publish: a re-seed above the old counter, new epoch.
	miss(t, c, 1000)
	after, ok, state := observeLVB(t, observer, id)
	require.True(t, ok)
	require.Equal(t, lockc.LVBValid, state)
	assert.Greater(t, after.Value, before.Value, "the counter never goes backwards")
	assert.NotEqual(t, before.Epoch, after.Epoch, "a re-seed takes a new epoch")
	assert.Equal(t, walkMap(b), walkMap(c))
	_, found, release, err := c.Lookup(ctx, 300)
	release()
	require.NoError(t, err)
	assert.True(t, found)
}

// checkerOnly is a lockspace that tells its loss through IsLost only, and
// plainLockspace one that tells it through Lost only: hidingEngine opens
// them, so that the wrapper's checks for a loss are tested for lockspaces
// that are no lockc.LostNotifier.
type (
	checkerOnly struct {
		lockc.Lockspace
		lockc.LostChecker
	}
	plainLockspace struct{ lockc.Lockspace }
	hidingEngine   struct {
		lockc.Engine
		checker bool
	}
)

func (e hidingEngine) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	ls, err := e.Engine.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	if e.checker {
		return checkerOnly{ls, ls.(lockc.LostChecker)}, nil
	}
	return plainLockspace{ls}, nil
}

// The moment the node loses the lockspace, before its manager can have
// noticed, every call that would act on the shared metadata or vouch for
// an answer fails: whichever way the lockspace tells the loss.
func TestLossSeenAtOnce(t *testing.T) {
	for _, tc := range []struct {
		name string
		wrap func(lockc.Engine) lockc.Engine
	}{
		{"notifier", func(e lockc.Engine) lockc.Engine { return e }},
		{"checker", func(e lockc.Engine) lockc.Engine { return hidingEngine{e, true} }},
		{"channel", func(e lockc.Engine) lockc.Engine { return hidingEngine{e, false} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dev := faultdev.New("cow", 4<<20)
			formatCOW(t, dev, 8)
			cluster := inproc.NewCluster()
			a := openClustered(t, dev, tc.wrap(cluster.Node(1)), "loss")
			t.Cleanup(func() { _ = a.Close() })
			add(t, a, 1)
			inFlight, err := a.Prepare(ctx, 2)
			require.NoError(t, err)
			_, _, token, ok := a.LookupOptimistic(3)
			require.True(t, ok)
			require.NoError(t, a.Err())

			cluster.Crash(1)
			assert.ErrorIs(t, a.Err(), lockc.ErrLost)
			assert.False(t, a.Unchanged(token))
			assert.ErrorIs(t, a.Commit(ctx, inFlight), lockc.ErrLost)
			_, err = a.Prepare(ctx, 4)
			assert.ErrorIs(t, err, lockc.ErrLost)
			_, _, release, err := a.Lookup(ctx, 5)
			release()
			assert.ErrorIs(t, err, lockc.ErrLost)
		})
	}
}
