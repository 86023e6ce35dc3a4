package storetest

import (
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// testConditionalPrepare checks an exstore.ConditionalPreparer:
// PrepareIfUnchanged allocates only while the word has the value asked
// for, Unsettled counts the exceptions prepared (either way) until they
// are aborted, committed lazily or written by Commit, and a word changed
// while other goroutines prepare under it, followed by Unsettled, counts
// exactly the allocations admitted under the old value.
func testConditionalPrepare(t *testing.T, h Harness) {
	const c = 8
	ss := newSession(t, h, c, cowOfChunks(c, 4096))
	cp, ok := ss.s.(exstore.ConditionalPreparer)
	if !ok {
		t.Skipf("%s is no exstore.ConditionalPreparer", h.Name)
	}
	ctx := t.Context()
	var word atomic.Uint64
	word.Store(7)
	_, err := cp.PrepareIfUnchanged(ctx, 1, &word, 6)
	require.ErrorIs(t, err, exstore.ErrChanged, "%s: prepare under a stale word", h.Name)
	assert.Zero(t, cp.Unsettled(), "%s: a refused prepare is counted", h.Name)
	// Chunk 1 was not left half-prepared by the refusal.
	a, err := cp.PrepareIfUnchanged(ctx, 1, &word, 7)
	require.NoError(t, err, "%s: prepare under the current word", h.Name)
	ss.checkChunk(a, 1)
	ss.commit(a)
	assert.Zero(t, cp.Unsettled(), "%s: after a Commit returned", h.Name)
	// A Commit waiting behind earlier exceptions leaves its exception
	// unsettled until it is written. Whether the waiting Commit has been
	// called yet when the count is read cannot be seen from here, so the
	// scenario is repeated: a store that settles at the call fails most.
	for i := range 20 {
		base := exstore.Chunk(10 + 3*i)
		a := ss.prepare(base)
		b := ss.prepare(base + 1)
		d := ss.prepare(base + 2)
		require.Equal(t, 3, cp.Unsettled(), "%s: prepared, either way", h.Name)
		ss.writeData(d)
		dDone := ss.commitAsync(ctx, d)
		// Most often lets the Commit's goroutine run up to its wait; a
		// correct store passes whether it does or not.
		runtime.Gosched()
		ss.commit(a)
		ss.notReturned(dDone, "Commit of the exception behind an unsettled one")
		assert.Equal(t, 2, cp.Unsettled(), "%s: after the first Commit returned, the last one waiting", h.Name)
		require.True(t, ss.s.Abort(b))
		require.NoError(t, ss.result(dDone, "Commit of the last exception"))
		assert.Zero(t, cp.Unsettled(), "%s: after the Abort and the last Commit", h.Name)
		if t.Failed() {
			break
		}
	}
	if lazy, ok := ss.s.(exstore.LazyCommitter); ok {
		f := ss.prepare(4)
		assert.Equal(t, 1, cp.Unsettled())
		ss.writeData(f)
		require.NoError(t, lazy.CommitLazy(ctx, f))
		assert.Zero(t, cp.Unsettled(), "%s: after a lazy commit", h.Name)
	}
	assert.ErrorIs(t, ss.s.Commit(ctx, a), exstore.ErrNotPrepared)
	assert.False(t, ss.s.Abort(a))
	assert.Zero(t, cp.Unsettled(), "%s: after commits and aborts it refused", h.Name)

	// Preparers race a change of the word; the count read after the
	// change must hold every allocation admitted under the old value.
	const (
		rounds     = 40
		preparers  = 4
		perRound   = 16 // per preparer: bounds the COW used
		admitFirst = 3  // allocations admitted before the change
	)
	next := exstore.Chunk(1000)
	var nextMu sync.Mutex
	take := func() exstore.Chunk {
		nextMu.Lock()
		defer nextMu.Unlock()
		next++
		return next
	}
	for round := range rounds {
		want := word.Add(1)
		var admitted atomic.Int64
		var mu sync.Mutex
		var got []exstore.Exception
		firstIn := make(chan struct{})
		var once sync.Once
		var wg sync.WaitGroup
		for range preparers {
			wg.Go(func() {
				for range perRound {
					e, err := cp.PrepareIfUnchanged(ctx, take(), &word, want)
					if errors.Is(err, exstore.ErrChanged) {
						return
					}
					if !assert.NoError(t, err, "%s: round %d", h.Name, round) {
						return
					}
					mu.Lock()
					got = append(got, e)
					mu.Unlock()
					if admitted.Add(1) >= admitFirst {
						once.Do(func() { close(firstIn) })
					}
				}
			})
		}
		allDone := make(chan struct{})
		go func() { wg.Wait(); close(allDone) }()
		select {
		case <-firstIn:
		case <-allDone:
		}
		word.Add(1)
		counted := cp.Unsettled()
		<-allDone
		assert.EqualValues(t, admitted.Load(), counted, "%s: round %d: allocations admitted under the old word, and the count read after the change", h.Name, round)
		for _, e := range got {
			require.True(t, ss.s.Abort(e))
		}
		require.Zero(t, cp.Unsettled())
	}
}
