package storetest

import (
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// testLazyCommit checks an exstore.LazyCommitter: a lazily committed
// exception is visible at once and durable after Sync, and committing
// lazily the exception that a durable Commit or a Sync waits behind lets
// them finish.
func testLazyCommit(t *testing.T, h Harness) {
	ss := newSession(t, h, 8, cowOfChunks(8, 1024))
	lazy, ok := ss.s.(exstore.LazyCommitter)
	if !ok {
		t.Skipf("%s is no exstore.LazyCommitter", h.Name)
	}
	ctx := t.Context()
	commitLazy := func(e exstore.Exception) {
		t.Helper()
		ss.writeData(e)
		require.NoError(t, lazy.CommitLazy(ctx, e), "%s: CommitLazy(%v)", h.Name, e)
	}
	syncAsync := func() <-chan error {
		done := make(chan error, 1)
		go func() { done <- lazy.Sync(ctx) }()
		return done
	}

	// A durable Commit behind an unfinished exception.
	head := ss.prepare(1)
	second := ss.prepare(2)
	ss.writeData(second)
	done := ss.commitAsync(ctx, second)
	runtime.Gosched() // most often lets the Commit start waiting first
	ss.notReturned(done, "Commit behind an unfinished exception")
	commitLazy(head)
	require.NoError(t, ss.result(done, "Commit behind an exception then committed lazily"))
	ss.checkFound(ss.s, 1, head.New)
	ss.checkFound(ss.s, 2, second.New)

	// A Sync behind an unfinished exception, with a lazy commit after it.
	head = ss.prepare(3)
	after := ss.prepare(4)
	commitLazy(after)
	ss.checkFound(ss.s, 4, after.New)
	assert.False(t, lazy.Durable(after.New), "%s: a lazy commit behind an unfinished exception is durable already", h.Name)
	done = syncAsync()
	runtime.Gosched()
	ss.notReturned(done, "Sync behind an unfinished exception")
	commitLazy(head)
	require.NoError(t, ss.result(done, "Sync behind an exception then committed lazily"))
	assert.True(t, lazy.Durable(head.New), "%s: after Sync", h.Name)
	assert.True(t, lazy.Durable(after.New), "%s: after Sync", h.Name)
	if ss.h.Reopen != nil {
		ss.reopen()
		ss.checkFound(ss.s, 3, head.New)
		ss.checkFound(ss.s, 4, after.New)
	}
}
