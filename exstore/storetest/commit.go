package storetest

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// testInOrderCommit checks that a Commit waits for every exception prepared
// before it, and that an Abort or a cancelled wait does not break the order.
func testInOrderCommit(t *testing.T, h Harness) {
	const c = 8
	cowBytes := cowOfChunks(c, 64)

	t.Run("commit", func(t *testing.T) {
		ss := newSession(t, h, c, cowBytes)
		a, b, x := ss.prepare(100), ss.prepare(200), ss.prepare(300)
		ss.writeData(a)
		ss.writeData(b)
		ss.writeData(x)
		xDone := ss.commitAsync(t.Context(), x)
		bDone := ss.commitAsync(t.Context(), b)
		ss.notReturned(bDone, "Commit(b)")
		ss.notReturned(xDone, "Commit(x)")
		require.NoError(t, ss.s.Commit(t.Context(), a), "%s: Commit(a)", h.Name)
		assert.NoError(t, ss.result(bDone, "Commit(b)"), "%s: Commit(b)", h.Name)
		assert.NoError(t, ss.result(xDone, "Commit(x)"), "%s: Commit(x)", h.Name)
		ss.checkFound(ss.s, a.Old, a.New)
		ss.checkFound(ss.s, b.Old, b.New)
		ss.checkFound(ss.s, x.Old, x.New)
	})

	t.Run("abort", func(t *testing.T) {
		ss := newSession(t, h, c, cowBytes)
		a, b := ss.prepare(100), ss.prepare(200)
		ss.writeData(b)
		bDone := ss.commitAsync(t.Context(), b)
		ss.notReturned(bDone, "Commit(b)")
		ss.s.Abort(a)
		assert.NoError(t, ss.result(bDone, "Commit(b)"), "%s: Commit(b) after Abort(a)", h.Name)
		ss.checkMissing(ss.s, a.Old, "after Abort")
		ss.checkFound(ss.s, b.Old, b.New)
		next := ss.add(300)
		assert.NotEqual(t, a.New, next.New, "%s: the chunk of an aborted exception was handed out again", h.Name)
		assert.Greater(t, next.New, b.New, "%s: chunk order after an abort", h.Name)
		assert.EqualValues(t, 2, ss.s.Usage().Exceptions, "%s: usage exception count", h.Name)
	})

	t.Run("prepare again after abort", func(t *testing.T) {
		// An aborted exception's origin chunk may be prepared again at
		// once, also while an exception prepared before it is still
		// outstanding (a store that completes in order still has the
		// aborted one queued): a COW path that gave up on a chunk, for a
		// failed copy, retries with the next write.
		ss := newSession(t, h, c, cowBytes)
		a, b := ss.prepare(100), ss.prepare(200)
		require.True(t, ss.s.Abort(b), "%s: Abort(b)", h.Name)
		again := ss.prepare(200)
		assert.NotEqual(t, b.New, again.New, "%s: the chunk of an aborted exception was handed out again", h.Name)
		ss.writeData(a)
		ss.writeData(again)
		require.NoError(t, ss.s.Commit(t.Context(), a), "%s: Commit(a)", h.Name)
		require.NoError(t, ss.s.Commit(t.Context(), again), "%s: Commit of chunk %d prepared again", h.Name, again.Old)
		ss.checkFound(ss.s, a.Old, a.New)
		ss.checkFound(ss.s, again.Old, again.New)
		ss.checkData(again)
		assert.EqualValues(t, 2, ss.s.Usage().Exceptions, "%s: usage exception count", h.Name)
	})

	t.Run("not prepared", func(t *testing.T) {
		// Commit and Abort of an exception that is not (or no longer)
		// prepared change nothing and say so: a wrapper counts on it to
		// release what the Prepare took exactly once.
		ss := newSession(t, h, c, cowBytes)
		a, b, x := ss.prepare(100), ss.prepare(200), ss.prepare(300)
		// b is aborted while a, prepared before it, is outstanding: a
		// store that completes in order still has b queued.
		assert.True(t, ss.s.Abort(b), "%s: Abort(b)", h.Name)
		assert.False(t, ss.s.Abort(b), "%s: a second Abort(b)", h.Name)
		// In the background and bounded: a store that wrongly took it
		// would wait for a, which is not committed yet.
		bDone := ss.commitAsync(t.Context(), b)
		assert.ErrorIs(t, ss.result(bDone, "Commit(b) after its Abort"), exstore.ErrNotPrepared, "%s: Commit(b) after its Abort", h.Name)
		ss.writeData(a)
		require.NoError(t, ss.s.Commit(t.Context(), a), "%s: Commit(a)", h.Name)
		assert.ErrorIs(t, ss.s.Commit(t.Context(), a), exstore.ErrNotPrepared, "%s: a second Commit(a)", h.Name)
		assert.False(t, ss.s.Abort(a), "%s: Abort(a) after its Commit", h.Name)
		never := exstore.Exception{Old: 400, New: x.New + 5}
		assert.ErrorIs(t, ss.s.Commit(t.Context(), never), exstore.ErrNotPrepared, "%s: Commit of an exception never prepared", h.Name)
		assert.False(t, ss.s.Abort(never), "%s: Abort of an exception never prepared", h.Name)
		wrongOld := exstore.Exception{Old: x.Old + 1, New: x.New}
		assert.ErrorIs(t, ss.s.Commit(t.Context(), wrongOld), exstore.ErrNotPrepared, "%s: Commit of a prepared COW chunk with another origin chunk", h.Name)
		ss.writeData(x)
		require.NoError(t, ss.s.Commit(t.Context(), x), "%s: Commit(x)", h.Name)
		ss.checkFound(ss.s, a.Old, a.New)
		ss.checkMissing(ss.s, b.Old, "after Abort")
		ss.checkFound(ss.s, x.Old, x.New)
		ss.checkMissing(ss.s, never.Old, "never committed")
		assert.EqualValues(t, 2, ss.s.Usage().Exceptions, "%s: usage exception count", h.Name)
	})

	t.Run("cancelled", func(t *testing.T) {
		// A Commit whose context has ended while an earlier exception is
		// outstanding cannot have committed; it returns ctx.Err() and its
		// exception stays queued. This needs no timing: it is deterministic.
		ss := newSession(t, h, c, cowBytes)
		a, b := ss.prepare(100), ss.prepare(200)
		ss.writeData(b)
		cancelled, cancel := context.WithCancel(t.Context())
		cancel()
		err := ss.s.Commit(cancelled, b)
		require.ErrorIs(t, err, context.Canceled, "%s: Commit(b) with a cancelled context while a is outstanding", h.Name)
		ss.checkMissing(ss.s, b.Old, "whose Commit is waiting for an earlier exception")
		ss.commit(a)
		// Commit(x) returns only once b, queued before it, is complete.
		x := ss.add(300)
		ss.checkFound(ss.s, a.Old, a.New)
		ss.checkFound(ss.s, b.Old, b.New)
		ss.checkFound(ss.s, x.Old, x.New)
	})
}
