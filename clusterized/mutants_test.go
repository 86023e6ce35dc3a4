package clusterized_test

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
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
	"github.com/clustersnap/clustersnap/persistent"
)

// failureRecorder is a testing.TB that records failures instead of
// failing the test: a checker run through it against a mutant must fail.
// FailNow ends the goroutine, as testing.T's does, so checkers run in one
// of their own (runChecker).
type failureRecorder struct {
	testing.TB
	mu     sync.Mutex
	failed bool
	msgs   []string
}

func (r *failureRecorder) record(msg string) {
	r.mu.Lock()
	r.failed = true
	if msg != "" {
		r.msgs = append(r.msgs, msg)
	}
	r.mu.Unlock()
}

func (r *failureRecorder) Error(args ...any)                 { r.record(fmt.Sprint(args...)) }
func (r *failureRecorder) Errorf(format string, args ...any) { r.record(fmt.Sprintf(format, args...)) }
func (r *failureRecorder) Fail()                             { r.record("") }
func (r *failureRecorder) FailNow()                          { r.record(""); runtime.Goexit() }
func (r *failureRecorder) Fatal(args ...any)                 { r.Error(args...); runtime.Goexit() }
func (r *failureRecorder) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	runtime.Goexit()
}

func (r *failureRecorder) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

// summary is the failures recorded, their testify messages (or first
// lines) only.
func (r *failureRecorder) summary() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, msg := range r.msgs {
		line, _, _ := strings.Cut(strings.TrimSpace(msg), "\n")
		for l := range strings.Lines(msg) {
			if _, m, ok := strings.Cut(l, "Messages:"); ok {
				line = m
			}
		}
		out = append(out, strings.TrimSpace(line))
	}
	return strings.Join(out, "; ")
}

// runChecker runs check through a failureRecorder over t and returns it.
func runChecker(t *testing.T, check func(testing.TB)) *failureRecorder {
	r := &failureRecorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		check(r)
	}()
	<-done
	return r
}

// coreMutant names a deliberate bug of a node's core, "" for none.
type coreMutant string

const (
	// ignoresWord: PrepareIfUnchanged allocates whatever the word says.
	ignoresWord coreMutant = "conditional prepare ignores its word"
	// ignoresUnsettled: Unsettled is always 0, so a drain does not wait
	// for prepared exceptions.
	ignoresUnsettled coreMutant = "drain ignores unsettled exceptions"
	// skipsRefresh: Refresh does nothing, so a node keeps a stale view
	// of the metadata after another node's EX.
	skipsRefresh coreMutant = "skips the refresh"
)

// mutation is what the cores of one node share across reloads: the mutant
// and a hook run once at the start of the next PrepareIfUnchanged.
type mutation struct {
	mutant        coreMutant
	beforePrepare atomic.Pointer[func()]
}

// mutatedCore is a persistent core with the mutation's bug, and every
// capability of the persistent store.
type mutatedCore struct {
	*persistent.Store
	m *mutation
}

func (c mutatedCore) PrepareIfUnchanged(ctx context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	if hook := c.m.beforePrepare.Swap(nil); hook != nil {
		(*hook)()
	}
	if c.m.mutant == ignoresWord {
		var own atomic.Uint64
		own.Store(want)
		word = &own
	}
	return c.Store.PrepareIfUnchanged(ctx, old, word, want)
}

func (c mutatedCore) Unsettled() int {
	if c.m.mutant == ignoresUnsettled {
		return 0
	}
	return c.Store.Unsettled()
}

func (c mutatedCore) Refresh(ctx context.Context) error {
	if c.m.mutant == skipsRefresh {
		return nil
	}
	return c.Store.Refresh(ctx)
}

// openMutated opens a node of cluster id on dev whose cores (the first and
// every reload's) carry m's bug.
func openMutated(t testing.TB, dev blockdev.Device, engine lockc.Engine, id string, m *mutation) *clusterized.Store {
	t.Helper()
	open := func(ctx context.Context, dev blockdev.Device) (exstore.Store, error) {
		core, err := persistent.Open(ctx, dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
		if err != nil {
			return nil, err
		}
		return mutatedCore{core, m}, nil
	}
	s, err := clusterized.Open(context.Background(), dev, open, engine, id, clusterized.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// twoMutatedNodes opens nodes A and B of a fresh cluster, with a's and b's
// bugs, on one fresh COW device of 4 KiB chunks.
func twoMutatedNodes(t testing.TB, id string, a, b *mutation) (*clusterized.Store, *clusterized.Store) {
	dev := faultdev.New("cow", 4<<20)
	formatCOW(t, dev, 8)
	cluster := inproc.NewCluster()
	return openMutated(t, dev, cluster.Node(1), id, a), openMutated(t, dev, cluster.Node(2), id, b)
}

// checkOtherNodesExceptionsSeen: an exception node A commits is B's too
// once B takes its lock (the first time, and after a counter that moved
// on in the same epoch), and B's next allocation is another COW chunk.
func checkOtherNodesExceptionsSeen(t testing.TB, mutant coreMutant) {
	a, b := twoMutatedNodes(t, "seen", &mutation{mutant: mutant}, &mutation{mutant: mutant})
	var byA []exstore.Exception
	for _, old := range []exstore.Chunk{1, 2} {
		e := add(t, a, old)
		byA = append(byA, e)
		seen(t, b, e)
	}
	eB := add(t, b, 3)
	for _, e := range byA {
		assert.NotEqual(t, e.New, eB.New, "A's %v and B's %v", e, eB)
	}
}

// seen checks that s's Lookup finds e.
func seen(t testing.TB, s exstore.Store, e exstore.Exception) {
	t.Helper()
	got, found, release, err := s.Lookup(context.Background(), e.Old)
	release()
	require.NoError(t, err)
	assert.True(t, found && got == e.New, "another node's exception %v seen: found %v, COW chunk %d", e, found, got)
}

// checkPrepareAdmission: node A's Prepare read its gate open in EX, and,
// before its core allocates, node B takes EX (A's drain does not wait for
// a Prepare that entered nothing) and commits an exception. A's core must
// refuse to allocate under the word it was given, which changed, so that
// A allocates only once it holds EX again, with B's exception read.
func checkPrepareAdmission(t testing.TB, mutant coreMutant) {
	ma := &mutation{mutant: mutant}
	a, b := twoMutatedNodes(t, "admission", ma, &mutation{})
	ctx := context.Background()
	add(t, a, 1) // A holds EX, its gate open
	var eB exstore.Exception
	hook := func() { eB = add(t, b, 100) }
	ma.beforePrepare.Store(&hook)
	eA, err := a.Prepare(ctx, 2)
	require.NoError(t, err)
	require.Nil(t, ma.beforePrepare.Load(), "A's Prepare reached its core's PrepareIfUnchanged")
	if !assert.NotEqual(t, eB.New, eA.New, "COW chunk allocated twice: %v by B, then %v by A", eB, eA) {
		a.Abort(eA)
		return
	}
	require.NoError(t, a.Commit(ctx, eA))
	seen(t, b, eA)
	seen(t, a, eB)
}

// drainWait is how long checkDrainWaitsForUnsettled waits for node B's
// Prepare, which must not return while node A holds a prepared
// exception. A drain that goes on regardless gives B EX within
// milliseconds; a correct one makes every run wait this long.
const drainWait = 500 * time.Millisecond

// checkDrainWaitsForUnsettled: node A holds EX with an exception prepared
// (counted by its core as unsettled, no user inside); node B's Prepare
// must wait until A committed it, and then allocate another COW chunk.
func checkDrainWaitsForUnsettled(t testing.TB, mutant coreMutant) {
	a, b := twoMutatedNodes(t, "unsettled", &mutation{mutant: mutant}, &mutation{})
	ctx := context.Background()
	add(t, a, 1) // A holds EX, its gate open
	eA, err := a.Prepare(ctx, 2)
	require.NoError(t, err)
	require.Zero(t, a.UsersInside(), "A's Prepare took the core's count, not the gate's")
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
		t.Errorf("B's Prepare returned %v while A held prepared %v", rB.e, eA)
	case <-time.After(drainWait):
	}
	require.NoError(t, a.Commit(ctx, eA))
	if rB == (result{}) {
		rB = <-bDone
	}
	require.NoError(t, rB.err)
	assert.NotEqual(t, eA.New, rB.e.New, "COW chunk allocated twice: %v by A, %v by B", eA, rB.e)
	require.NoError(t, b.Commit(ctx, rB.e))
}

// staleTokenStore is a clustered store that accepts every optimistic
// token: it never tells a reader that another node may have changed its
// answers.
type staleTokenStore struct{ *clusterized.LazyStore }

func (staleTokenStore) Unchanged(uint64) bool { return true }

var _ exstore.OptimisticLookuper = staleTokenStore{}

// TestMultiNodeCheckerCatchesMutants runs the checkers of the clusterized
// store, each with the race it is after forced by a hook, against the
// store as it is (which must pass) and against deliberately broken
// variants (each of which must fail the checker that applies).
func TestMultiNodeCheckerCatchesMutants(t *testing.T) {
	acceptsStaleTokens := func(s exstore.Store) exstore.Store { return staleTokenStore{s.(*clusterized.LazyStore)} }
	for _, tc := range []struct {
		name   string
		check  func(testing.TB) // the checker with the store as it is
		mutant func(testing.TB) // the checker with the mutant
	}{
		{
			"accepts stale tokens (one chunk)",
			func(t testing.TB) { checkOptimisticRead(t, 1, nil) },
			func(t testing.TB) { checkOptimisticRead(t, 1, acceptsStaleTokens) },
		},
		{
			"accepts stale tokens (window)",
			func(t testing.TB) { checkOptimisticRead(t, 3, nil) },
			func(t testing.TB) { checkOptimisticRead(t, 3, acceptsStaleTokens) },
		},
		{
			string(ignoresWord),
			func(t testing.TB) { checkPrepareAdmission(t, "") },
			func(t testing.TB) { checkPrepareAdmission(t, ignoresWord) },
		},
		{
			string(ignoresUnsettled),
			func(t testing.TB) { checkDrainWaitsForUnsettled(t, "") },
			func(t testing.TB) { checkDrainWaitsForUnsettled(t, ignoresUnsettled) },
		},
		{
			string(skipsRefresh),
			func(t testing.TB) { checkOtherNodesExceptionsSeen(t, "") },
			func(t testing.TB) { checkOtherNodesExceptionsSeen(t, skipsRefresh) },
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Run("store as it is", func(t *testing.T) { tc.check(t) })
			t.Run("mutant", func(t *testing.T) {
				r := runChecker(t, tc.mutant)
				require.True(t, r.Failed(), "the checker passed the mutant")
				t.Logf("the checker failed the mutant: %s", r.summary())
			})
		})
	}
}
