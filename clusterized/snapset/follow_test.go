package snapset

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// follower records what a member asks of it and adopts what it is told to.
type follower struct {
	mu        sync.Mutex
	quiesced  atomic.Int64
	adopted   []Value
	serve     func(context.Context, Value) (Set, error)
	quiesceFn func() error
}

func (f *follower) Quiesced(context.Context) error {
	f.quiesced.Add(1)
	if f.quiesceFn != nil {
		return f.quiesceFn()
	}
	return nil
}

func (f *follower) Adopt(ctx context.Context, v Value) (Set, error) {
	f.mu.Lock()
	f.adopted = append(f.adopted, v)
	f.mu.Unlock()
	return f.serve(ctx, v)
}

func joinFollowing(t *testing.T, engines *inproc.Cluster, id uint32, set Set, f Follower) *Member {
	t.Helper()
	m, err := JoinFollowing(testCtx(t), openLS(t, engines, id), resource, set, f)
	require.NoError(t, err)
	t.Cleanup(func() { _ = m.Close() })
	return m
}

// enterWaits enters m's gate, waiting for it to open (as a write does
// while the member reads the set again).
func enterWaits(t *testing.T, m *Member) error {
	t.Helper()
	leave, err := m.Enter(testCtx(t))
	if err == nil {
		leave()
	}
	return err
}

// A following member adopts the set another node publishes: it is told to
// quiesce before the changer gets EX, adopts the new value, and admits
// origin writes under the new set.
func TestFollowerAdoptsAChange(t *testing.T) {
	ctx := testCtx(t)
	engines := inproc.NewCluster()
	old, next := mustSet(t, "a"), mustSet(t, "a", "b")
	f := &follower{serve: func(context.Context, Value) (Set, error) { return next, nil }}
	a := mustJoin(t, engines, 1, old)
	b := joinFollowing(t, engines, 2, old, f)
	require.NoError(t, a.Change(ctx, next, func(context.Context) error {
		assert.Equal(t, int64(1), f.quiesced.Load(), "node 2 quiesced before node 1 held EX")
		return nil
	}))
	require.NoError(t, enterWaits(t, b))
	assert.Equal(t, next.Digest(), b.Set().Digest())
	assert.Equal(t, a.Value(), b.Value())
	f.mu.Lock()
	assert.Equal(t, []Value{a.Value()}, f.adopted)
	f.mu.Unlock()
	assert.NoError(t, enterWaits(t, a))
}

// A follower that cannot adopt, or adopts another set, stops its member:
// it writes nothing under a set that is not the cluster's. A failed
// quiesce stops it too.
func TestFollowerThatCannotAdoptStops(t *testing.T) {
	old, next := mustSet(t, "a"), mustSet(t, "a", "b")
	for name, f := range map[string]*follower{
		"adopt fails":    {serve: func(context.Context, Value) (Set, error) { return Set{}, errors.New("cannot open the COW") }},
		"adopts another": {serve: func(context.Context, Value) (Set, error) { return mustSet(t, "a", "c"), nil }},
		"quiesce fails":  {serve: func(context.Context, Value) (Set, error) { return next, nil }, quiesceFn: func() error { return errors.New("flush failed") }},
	} {
		t.Run(name, func(t *testing.T) {
			ctx := testCtx(t)
			engines := inproc.NewCluster()
			a := mustJoin(t, engines, 1, old)
			b := joinFollowing(t, engines, 2, old, f)
			require.NoError(t, a.Change(ctx, next, nil))
			assert.Error(t, enterWaits(t, b))
			assert.NoError(t, enterWaits(t, a), "the changer goes on")
			_, err := join(t, engines, 3, next)
			assert.NoError(t, err, "the stopped member holds nothing that keeps others out")
		})
	}
}

// Update's callback and a follower's Adopt may change the origin (a merge
// step) through the gate while everything else waits; a set published
// again as a later generation reaches the followers' Adopt.
func TestExclusiveCallbacksPassTheGate(t *testing.T) {
	ctx := testCtx(t)
	engines := inproc.NewCluster()
	set := mustSet(t, "a")
	var adoptEntered atomic.Bool
	f := &follower{}
	a := mustJoin(t, engines, 1, set)
	b := joinFollowing(t, engines, 2, set, f)
	f.serve = func(ctx context.Context, _ Value) (Set, error) {
		leave, err := b.Enter(ctx)
		if err == nil {
			leave()
			adoptEntered.Store(true)
		}
		return set, err
	}
	require.NoError(t, a.Update(ctx, func(ctx context.Context, cur Set) (Set, error) {
		leave, err := a.Enter(ctx)
		require.NoError(t, err, "the change's own origin change passes")
		leave()
		assert.False(t, admits(a), "any other origin change of the changer waits")
		return cur, nil
	}))
	require.NoError(t, enterWaits(t, b))
	assert.True(t, adoptEntered.Load(), "Adopt ran for the same set published again, and passed the gate")
	assert.Equal(t, uint64(2), b.Value().Generation)
}
