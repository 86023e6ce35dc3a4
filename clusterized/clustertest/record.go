package clustertest

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// recorder notes every exception the nodes' stores handed out and
// committed.
type recorder struct {
	mu        sync.Mutex
	prepared  []recorded
	committed []recorded
	// durable is, by node, how many of committed were recorded before a
	// Sync of that node that succeeded began: that node's lazy commits
	// among them are on disk.
	durable map[int]int
}

type recorded struct {
	node int
	e    exstore.Exception
	lazy bool
}

// recordingStore passes everything to the node's store (a LazyStore) and
// records Prepare's, Commit's, CommitLazy's and Sync's successes; synced
// is the test clock before the node's latest successful Sync began. It is
// a LazyCommitter only; the COW engine gets it through forRecording, which
// adds exactly the other capabilities the node's store has, so that the
// engine takes the paths it takes in production (optimistic lookups
// above all).
type recordingStore struct {
	exstore.Store
	lazy   exstore.LazyCommitter
	node   int
	rec    *recorder
	clock  *atomic.Uint64
	synced atomic.Uint64
	// optimistic counts the optimistic lookups the engine made through
	// the wrapper, unchanged the Unchanged calls.
	optimistic, unchanged atomic.Int64
}

// The wrappers of a recordingStore by the capabilities the COW engine looks
// for (exstore/cow: LazyCommitter, RangeLookuper, OptimisticLookuper,
// AbsenceChecker), each claiming only what it forwards.
type (
	recordingRanges struct {
		*recordingStore
		ranges exstore.RangeLookuper
	}
	recordingOptimistic struct {
		recordingRanges
		opt exstore.OptimisticLookuper
	}
	recordingAbsence struct {
		recordingOptimistic
		absence exstore.AbsenceChecker
	}
)

var (
	_ exstore.LazyCommitter      = (*recordingStore)(nil)
	_ exstore.RangeLookuper      = recordingRanges{}
	_ exstore.LazyCommitter      = recordingRanges{}
	_ exstore.OptimisticLookuper = recordingOptimistic{}
	_ exstore.RangeLookuper      = recordingOptimistic{}
	_ exstore.LazyCommitter      = recordingOptimistic{}
	_ exstore.AbsenceChecker     = recordingAbsence{}
	_ exstore.OptimisticLookuper = recordingAbsence{}
	_ exstore.RangeLookuper      = recordingAbsence{}
	_ exstore.LazyCommitter      = recordingAbsence{}
)

func newRecordingStore(s exstore.Store, node int, rec *recorder, clock *atomic.Uint64) *recordingStore {
	r := &recordingStore{Store: s, node: node, rec: rec, clock: clock}
	r.lazy, _ = s.(exstore.LazyCommitter)
	return r
}

// forRecording returns r as the COW engine is to see it: with every
// capability of the store r wraps that the engine looks for, and no other.
// The stores of these tests are LazyCommitters; one that is an
// OptimisticLookuper or AbsenceChecker is also a RangeLookuper, and an
// AbsenceChecker also an OptimisticLookuper: other combinations have no
// wrapper, and fail the test.
func forRecording(tb testing.TB, r *recordingStore) exstore.Store {
	tb.Helper()
	require.NotNil(tb, r.lazy, "the store commits lazily")
	ranges, isRanges := r.Store.(exstore.RangeLookuper)
	opt, isOpt := r.Store.(exstore.OptimisticLookuper)
	absence, isAbsence := r.Store.(exstore.AbsenceChecker)
	switch {
	case isAbsence && isOpt && isRanges:
		return recordingAbsence{recordingOptimistic{recordingRanges{r, ranges}, opt}, absence}
	case isAbsence:
		require.FailNow(tb, "no recording wrapper for an AbsenceChecker that is no OptimisticLookuper and RangeLookuper")
	case isOpt && isRanges:
		return recordingOptimistic{recordingRanges{r, ranges}, opt}
	case isOpt:
		require.FailNow(tb, "no recording wrapper for an OptimisticLookuper that is no RangeLookuper")
	case isRanges:
		return recordingRanges{r, ranges}
	}
	return r
}

func (r recordingRanges) LookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	return r.ranges.LookupRange(ctx, first, into)
}

func (r recordingOptimistic) LookupOptimistic(old exstore.Chunk) (exstore.Chunk, bool, uint64, bool) {
	r.optimistic.Add(1)
	return r.opt.LookupOptimistic(old)
}

func (r recordingOptimistic) LookupRangeOptimistic(first exstore.Chunk, into []exstore.LookupResult) (uint64, bool) {
	r.optimistic.Add(1)
	return r.opt.LookupRangeOptimistic(first, into)
}

func (r recordingOptimistic) Unchanged(token uint64) bool {
	r.unchanged.Add(1)
	return r.opt.Unchanged(token)
}

func (r recordingAbsence) NoExceptions(first exstore.Chunk, n uint64) bool {
	return r.absence.NoExceptions(first, n)
}

func (r *recordingStore) CommitLazy(ctx context.Context, e exstore.Exception) error {
	err := r.lazy.CommitLazy(ctx, e)
	r.recordCommit(e, true, err)
	return err
}

// recordCommit records the commit of e if it succeeded (err nil).
func (r *recordingStore) recordCommit(e exstore.Exception, lazy bool, err error) {
	if err == nil {
		r.rec.mu.Lock()
		r.rec.committed = append(r.rec.committed, recorded{r.node, e, lazy})
		r.rec.mu.Unlock()
	}
}

func (r *recordingStore) Durable(new exstore.Chunk) bool { return r.lazy.Durable(new) }

func (r *recordingStore) Sync(ctx context.Context) error {
	start := r.clock.Add(1)
	r.rec.mu.Lock()
	n := len(r.rec.committed)
	r.rec.mu.Unlock()
	err := r.lazy.Sync(ctx)
	if err == nil {
		r.rec.mu.Lock()
		r.rec.durable[r.node] = max(r.rec.durable[r.node], n)
		r.rec.mu.Unlock()
		for {
			s := r.synced.Load()
			if s >= start || r.synced.CompareAndSwap(s, start) {
				break
			}
		}
	}
	return err
}

func (r *recordingStore) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	e, err := r.Store.Prepare(ctx, old)
	if err == nil {
		r.rec.mu.Lock()
		r.rec.prepared = append(r.rec.prepared, recorded{r.node, e, false})
		r.rec.mu.Unlock()
	}
	return e, err
}

func (r *recordingStore) Commit(ctx context.Context, e exstore.Exception) error {
	err := r.Store.Commit(ctx, e)
	r.recordCommit(e, false, err)
	return err
}
