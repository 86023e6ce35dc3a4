package snapset

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

const (
	lsName   = "snapset-test"
	resource = "c1/origin"
)

// mustSet is the set of snapshots named names, each identified by its
// name.
func mustSet(t testing.TB, names ...string) Set {
	t.Helper()
	snaps := make([]Snapshot, len(names))
	for i, n := range names {
		snaps[i] = Snapshot{Name: n, Identity: []byte("cow:" + n)}
	}
	s, err := NewSet(snaps...)
	require.NoError(t, err)
	return s
}

// testCtx bounds a test's waits: a hang fails instead of stalling.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// node is one simulated node's lockspace.
func openLS(t testing.TB, engines *inproc.Cluster, id uint32) lockc.Lockspace {
	t.Helper()
	ls, err := engines.Node(id).Open(context.Background(), lsName)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ls.Close() })
	return ls
}

// join joins node id with set, and closes the member at the test's end.
func join(t testing.TB, engines *inproc.Cluster, id uint32, set Set) (*Member, error) {
	t.Helper()
	m, err := Join(testCtx(t), openLS(t, engines, id), resource, set)
	if err == nil {
		t.Cleanup(func() { _ = m.Close() })
	}
	return m, err
}

func mustJoin(t testing.TB, engines *inproc.Cluster, id uint32, set Set) *Member {
	t.Helper()
	m, err := join(t, engines, id, set)
	require.NoError(t, err)
	return m
}

// admits reports whether m's gate admits at once (an open gate does not
// look at ctx; a closed one with an ended ctx fails).
func admits(m *Member) bool {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	leave, err := m.Enter(ctx)
	if err != nil {
		return false
	}
	leave()
	return true
}

func TestThreeJoinAFourthWithASnapshotFewerIsRefused(t *testing.T) {
	engines := inproc.NewCluster()
	set := mustSet(t, "mon", "tue", "wed")
	var members []*Member
	for id := uint32(1); id <= 3; id++ {
		members = append(members, mustJoin(t, engines, id, set))
	}
	for i, m := range members {
		assert.Equal(t, set.Value(1), m.Value(), "member %d: the first node published generation 1", i+1)
		assert.True(t, admits(m), "member %d admits origin writes", i+1)
	}

	_, err := join(t, engines, 4, mustSet(t, "mon", "tue"))
	require.ErrorIs(t, err, ErrSetMismatch)
	var mm *MismatchError
	require.ErrorAs(t, err, &mm)
	assert.Equal(t, set.Value(1), mm.Cluster)
	for _, want := range []string{"mon, tue", "3 snapshots, generation 1, digest " + set.Digest().String(), "1 snapshot(s) fewer"} {
		assert.Contains(t, err.Error(), want)
	}
	_, err = join(t, engines, 5, mustSet(t, "mon", "tue", "thu"))
	assert.ErrorIs(t, err, ErrSetMismatch)
	assert.ErrorContains(t, err, "not the same COWs")

	for i, m := range members {
		assert.True(t, admits(m), "member %d still admits: the refused nodes took no EX", i+1)
		assert.Equal(t, set.Value(1), m.Value())
	}
	assert.Zero(t, engines.Stats(1).Basts+engines.Stats(2).Basts+engines.Stats(3).Basts, "nobody was asked to give way")
}

// Nodes joining a fresh resource at once: with the same set all join (one
// publishes), with different sets exactly one does; none deadlocks.
func TestConcurrentFirstJoins(t *testing.T) {
	for _, tc := range []struct {
		name string
		sets []Set
	}{
		{"same set", []Set{mustSet(t, "a"), mustSet(t, "a"), mustSet(t, "a"), mustSet(t, "a")}},
		{"different sets", []Set{mustSet(t, "a"), mustSet(t, "b"), mustSet(t, "a", "b"), mustSet(t)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			engines := inproc.NewCluster()
			errs := make([]error, len(tc.sets))
			members := make([]*Member, len(tc.sets))
			var wg sync.WaitGroup
			for i, s := range tc.sets {
				ls := openLS(t, engines, uint32(i+1))
				wg.Go(func() { members[i], errs[i] = Join(testCtx(t), ls, resource, s) })
			}
			wg.Wait()
			joined := 0
			var winner Value
			for i, err := range errs {
				if err == nil {
					joined++
					winner = members[i].Value()
					defer members[i].Close()
					continue
				}
				require.ErrorIs(t, err, ErrSetMismatch)
			}
			if tc.name == "same set" {
				assert.Equal(t, len(tc.sets), joined)
			} else {
				assert.Equal(t, 1, joined)
			}
			assert.Equal(t, uint64(1), winner.Generation, "one set was published")
		})
	}
}

// recorder keeps events in the order they happened.
type recorder struct {
	mu     sync.Mutex
	events []string
}

func (r *recorder) add(format string, args ...any) {
	r.mu.Lock()
	r.events = append(r.events, fmt.Sprintf(format, args...))
	r.mu.Unlock()
}

func (r *recorder) index(event string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Index(r.events, event)
}

// checkChangeOrdering runs three members of set {a, b}; node 1 (with
// mutation mut) has an origin write in flight when node 2 changes the set
// to {a, b, c}. It returns what went wrong: node 2 must get EX only after
// node 1's write left, no member may admit a write while node 2 holds EX,
// and afterwards the members still on {a, b} refuse writes with
// ErrSetChanged while node 2 and a joiner with {a, b, c} go on.
func checkChangeOrdering(t testing.TB, mut mutation) []string {
	ctx := testCtx(t)
	engines := inproc.NewCluster()
	old, next := mustSet(t, "a", "b"), mustSet(t, "a", "b", "c")
	a, b, c := mustJoin(t, engines, 1, old), mustJoin(t, engines, 2, old), mustJoin(t, engines, 3, old)
	setMutation(a, mut)
	draining := make(chan struct{})
	var once sync.Once
	onDrainWait(a, func() { once.Do(func() { close(draining) }) })

	var problems []string
	var rec recorder
	leave, err := a.Enter(ctx)
	require.NoError(t, err)
	rec.add("node 1 write in")
	exGranted := make(chan struct{})
	writeDone := make(chan struct{})
	go func() {
		defer close(writeDone)
		// The write stays in until node 1 drains for node 2's EX (a
		// correct gate) or node 2 has EX (a gate that does not drain).
		select {
		case <-draining:
		case <-exGranted:
		case <-ctx.Done():
		}
		rec.add("node 1 write done")
		leave()
	}()
	err = b.Change(ctx, next, func(context.Context) error {
		rec.add("node 2 EX granted")
		for i, m := range []*Member{a, c} {
			if admits(m) {
				problems = append(problems, fmt.Sprintf("node %d admitted an origin write while node 2 held EX", []int{1, 3}[i]))
			}
		}
		close(exGranted)
		return nil
	})
	<-writeDone
	if err != nil {
		return append(problems, fmt.Sprintf("Change: %v", err))
	}
	if w, x := rec.index("node 1 write done"), rec.index("node 2 EX granted"); w < 0 || x < 0 || w > x {
		rec.mu.Lock()
		problems = append(problems, fmt.Sprintf("node 2 got EX before node 1's write in flight completed: %q", rec.events))
		rec.mu.Unlock()
	}
	if got := b.Value(); got != next.Value(2) {
		problems = append(problems, fmt.Sprintf("node 2 published %v, want %v", got, next.Value(2)))
	}
	for i, m := range []*Member{a, c} {
		leave, err := m.Enter(ctx)
		if err == nil {
			leave()
		}
		if !errors.Is(err, ErrSetChanged) {
			problems = append(problems, fmt.Sprintf("node %d on the old set: Enter: %v, want ErrSetChanged", []int{1, 3}[i], err))
		}
	}
	if leave, err := b.Enter(ctx); err != nil {
		problems = append(problems, fmt.Sprintf("node 2 after its change: Enter: %v", err))
	} else {
		leave()
	}
	if d, err := join(t, engines, 4, next); err != nil {
		problems = append(problems, fmt.Sprintf("a joiner with the new set: %v", err))
	} else if !admits(d) {
		problems = append(problems, "a joiner with the new set does not admit")
	}
	if _, err := join(t, engines, 5, old); !errors.Is(err, ErrSetMismatch) {
		problems = append(problems, fmt.Sprintf("a joiner with the old set: %v, want ErrSetMismatch", err))
	}
	return problems
}

func TestChangeDrainsWritesBeforeEX(t *testing.T) {
	assert.Empty(t, checkChangeOrdering(t, mutNone))
}

// The ordering check catches a gate that admits while closed and one that
// gives way without draining.
func TestChangeOrderingCatchesMutants(t *testing.T) {
	for _, mut := range []struct {
		name string
		m    mutation
		want string
	}{
		{"admits while closed", mutAdmitClosed, "admitted an origin write while node 2 held EX"},
		{"does not drain", mutNoDrain, "before node 1's write in flight completed"},
	} {
		t.Run(mut.name, func(t *testing.T) {
			problems := checkChangeOrdering(t, mut.m)
			require.NotEmpty(t, problems, "the mutant went unnoticed")
			assert.Contains(t, fmt.Sprint(problems), mut.want)
		})
	}
}

// A change whose adopt fails publishes nothing; the members go on.
func TestChangeAdoptFails(t *testing.T) {
	ctx := testCtx(t)
	engines := inproc.NewCluster()
	set := mustSet(t, "a")
	a, b := mustJoin(t, engines, 1, set), mustJoin(t, engines, 2, set)
	boom := errors.New("boom")
	err := a.Change(ctx, mustSet(t, "a", "b"), func(context.Context) error { return boom })
	require.ErrorIs(t, err, boom)
	for _, m := range []*Member{a, b} {
		leave, err := m.Enter(ctx) // b may still be reading the set again
		require.NoError(t, err)
		leave()
		assert.Equal(t, set.Value(1), m.Value())
	}
	_, err = join(t, engines, 3, set)
	assert.NoError(t, err, "the cluster still publishes the old set")
}

// A member that missed a change cannot publish over it.
func TestChangeByAStaleMemberFails(t *testing.T) {
	ctx := testCtx(t)
	engines := inproc.NewCluster()
	set := mustSet(t, "a")
	a, b := mustJoin(t, engines, 1, set), mustJoin(t, engines, 2, set)
	require.NoError(t, b.Change(ctx, mustSet(t, "a", "b"), nil))
	err := a.Change(ctx, mustSet(t, "a", "c"), nil)
	assert.ErrorIs(t, err, ErrSetChanged)
	_, err = join(t, engines, 3, mustSet(t, "a", "b"))
	assert.NoError(t, err, "the cluster publishes node 2's set")
}

// A node that dies in EX while it changes the set leaves the LVB invalid:
// the surviving member publishes its set again and goes on, and the next
// joiner reads it. With no survivor, the next joiner publishes.
func TestCrashInEX(t *testing.T) {
	set := mustSet(t, "a", "b")
	t.Run("a survivor", func(t *testing.T) {
		ctx := testCtx(t)
		engines := inproc.NewCluster()
		a, b := mustJoin(t, engines, 1, set), mustJoin(t, engines, 2, set)
		err := a.Change(ctx, mustSet(t, "a"), func(context.Context) error {
			engines.Crash(1)
			return nil
		})
		require.ErrorIs(t, err, lockc.ErrLost)
		leave, err := b.Enter(ctx)
		require.NoError(t, err, "the survivor goes on")
		leave()
		assert.Equal(t, set.Value(2), b.Value(), "the survivor published its set again")
		c := mustJoin(t, engines, 3, set)
		assert.Equal(t, set.Value(2), c.Value())
		_, err = join(t, engines, 4, mustSet(t, "a"))
		assert.ErrorIs(t, err, ErrSetMismatch, "the dead node's change never took effect")
	})
	t.Run("no survivor", func(t *testing.T) {
		ctx := testCtx(t)
		engines := inproc.NewCluster()
		a := mustJoin(t, engines, 1, set)
		// A second membership of the resource keeps the engine from
		// forgetting it (and its invalid LVB) when node 1 dies.
		keep, err := openLS(t, engines, 9).Lock(ctx, []byte(resource), lockc.NL)
		require.NoError(t, err)
		defer keep.Unlock(ctx)
		err = a.Change(ctx, mustSet(t, "a"), func(context.Context) error {
			engines.Crash(1)
			return nil
		})
		require.ErrorIs(t, err, lockc.ErrLost)
		other := mustSet(t, "a", "b", "c")
		d := mustJoin(t, engines, 2, other)
		assert.Equal(t, other.Value(2), d.Value(), "the joiner published after the dead writer's generation")
	})
}

// After the loss of its lockspace a member admits nothing, and a write
// waiting at the closed gate is woken with the loss.
func TestLostLockspace(t *testing.T) {
	ctx := testCtx(t)
	engines := inproc.NewCluster()
	set := mustSet(t, "a")
	a, b := mustJoin(t, engines, 1, set), mustJoin(t, engines, 2, set)
	waited := make(chan error, 1)
	err := b.Change(ctx, set, func(context.Context) error {
		go func() {
			_, err := a.Enter(ctx)
			waited <- err
		}()
		// Node 1 gave way and waits for PR behind node 2's EX.
		require.NoError(t, engines.WaitQueueLen(ctx, lsName, []byte(resource), 1, 0))
		engines.Crash(1)
		return nil
	})
	require.NoError(t, err)
	assert.ErrorIs(t, <-waited, lockc.ErrLost, "the waiting write")
	_, err = a.Enter(ctx)
	assert.ErrorIs(t, err, lockc.ErrLost, "a later write")
	leave, err := b.Enter(ctx)
	require.NoError(t, err)
	leave()
}

func TestClose(t *testing.T) {
	ctx := testCtx(t)
	engines := inproc.NewCluster()
	ls := openLS(t, engines, 1)
	m, err := Join(ctx, ls, resource, mustSet(t, "a"))
	require.NoError(t, err)
	require.NoError(t, m.Close())
	_, err = m.Enter(ctx)
	assert.ErrorIs(t, err, ErrClosed)
	assert.Zero(t, engines.ResourceCount(), "the lock is released")
	require.NoError(t, m.Close(), "Close twice")
}
