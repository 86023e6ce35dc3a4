package locktest

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testCrash: when an EX holder's node dies, its lockspace is lost, its
// pending requests fail, the waiter is granted and the LVB is invalid; a
// dead PR holder leaves the LVB valid; the node can join again.
func testCrash(e *env) {
	cr := e.crasher()
	a, a2, b, c := e.open(1), e.open(1), e.open(2), e.open(3)
	keep := e.lock(c, "r", lockc.NL)
	ex := e.lock(a, "r", lockc.EX)
	ex.SetLVB(counter(1))
	e.convert(ex, lockc.EX)
	ex.SetLVB(counter(2)) // staged, never published
	other := e.lock(b, "other", lockc.EX)
	stuck := e.lockAsync(e.ctx, a2, "other", lockc.PR)
	waiter := e.lockAsync(e.ctx, b, "r", lockc.PR)
	e.queued("r", 0, 1)
	e.queued("other", 0, 1)

	var watches []*lossWatch
	for _, ls := range []lockc.Lockspace{a, a2} {
		assertIsLost(e, ls, false, "before the crash")
		watches = append(watches, watchLoss(ls, waiter.done))
	}
	cr.Crash(1)
	for i, ls := range []lockc.Lockspace{a, a2} {
		select {
		case <-ls.Lost():
		default:
			e.t.Errorf("Lost not closed after the crash")
		}
		assertIsLost(e, ls, true, "after the crash")
		assert.ErrorIs(e.t, ls.Err(), lockc.ErrLost)
		watches[i].check(e, ls, "crash")
	}
	_, err := e.wait(stuck)
	assert.ErrorIs(e.t, err, lockc.ErrLost, "the crashed node's pending request")
	got := e.granted(waiter, lockc.PR)
	_, st := got.LVB()
	assert.Equal(e.t, lockc.LVBInvalid, st, "the EX holder died")
	assert.True(e.t, isLost(ex.Unlock(e.ctx)), "unlock after the crash must say the lock is gone")
	assert.True(e.t, isLost(ex.Convert(e.ctx, lockc.NL)), "convert after the crash")
	_, err = a.Lock(e.ctx, []byte("x"), lockc.NL)
	assert.ErrorIs(e.t, err, lockc.ErrLost, "lock on a lost lockspace")
	e.unlock(got)

	// Publish again; a PR holder's death changes nothing.
	w := e.lock(b, "r", lockc.EX)
	w.SetLVB(counter(3))
	e.convert(w, lockc.NL)
	e.unlock(w)
	a = e.open(1) // the node restarted
	pr := e.lock(a, "r", lockc.PR)
	cr.Crash(1)
	<-a.Lost()
	e.assertLVB(keep, 3, lockc.LVBValid, "a PR holder died")
	e.unlock(keep)
	e.unlock(other)
	assert.True(e.t, isLost(pr.Unlock(e.ctx)))
	e.assertNoResources()
}

// testClose: Close releases every lock of the membership (granted or
// pending) and closes Lost; the LVB of an EX lock is published or
// invalidated, never left looking valid and stale.
func testClose(e *env) {
	a, b := e.open(1), e.open(2)
	keep := e.lock(b, "r1", lockc.NL)
	ex := e.lock(a, "r1", lockc.EX)
	ex.SetLVB(counter(4))
	pr := e.lock(a, "r2", lockc.PR)
	blocker := e.lock(b, "r3", lockc.EX)
	stuck := e.lockAsync(e.ctx, a, "r3", lockc.CW)
	e.queued("r3", 0, 1)

	assertIsLost(e, a, false, "before Close")
	watch := watchLoss(a, nil)
	require.NoError(e.t, a.Close())
	select {
	case <-a.Lost():
	default:
		e.t.Errorf("Lost not closed by Close")
	}
	assertIsLost(e, a, true, "after Close")
	watch.check(e, a, "Close")
	assert.ErrorIs(e.t, a.Err(), lockc.ErrLost)
	_, err := e.wait(stuck)
	assert.ErrorIs(e.t, err, lockc.ErrLost, "a pending request of the closed lockspace")
	e.queued("r3", 0, 0)
	for _, res := range []string{"r1", "r2", "r3"} {
		if res == "r3" {
			e.unlock(blocker)
		}
		l, err := b.Lock(e.ctx, []byte(res), lockc.EX, lockc.NoQueue)
		if assert.NoError(e.t, err, "%s is free after Close", res) {
			e.unlock(l)
		}
	}
	v, st := e.readLVB(keep)
	if st == lockc.LVBValid {
		assert.Equal(e.t, counter(4), v, "a valid LVB after Close must be the staged value")
	} else {
		assert.Equal(e.t, lockc.LVBInvalid, st)
	}
	assert.True(e.t, isLost(pr.Unlock(e.ctx)), "unlock after Close")
	e.unlock(keep)
	e.assertNoResources()
}

// testCancelWaiting: a cancelled request leaves nothing behind, and a
// cancelled head of the queue lets the next waiter in.
func testCancelWaiting(e *env) {
	a, b, c := e.open(1), e.open(2), e.open(3)
	holder := e.lock(a, "r", lockc.PR)
	ctx, cancel := context.WithCancel(e.ctx)
	ex := e.lockAsync(ctx, b, "r", lockc.EX)
	e.queued("r", 0, 1)
	pr := e.lockAsync(e.ctx, c, "r", lockc.PR)
	e.queued("r", 0, 2)
	e.expectBast(holder, lockc.EX)
	cancel()
	l, err := e.wait(ex)
	assert.ErrorIs(e.t, err, context.Canceled)
	assert.Nil(e.t, l)
	e.unlock(e.granted(pr, lockc.PR))
	e.queued("r", 0, 0)
	e.unlock(holder)
	e.assertNoResources()
	free := e.lock(c, "r", lockc.EX, lockc.NoQueue)
	e.unlock(free)

	// A context that has already ended grants nothing.
	done, stop := context.WithCancel(e.ctx)
	stop()
	_, err = a.Lock(done, []byte("r"), lockc.NL)
	assert.ErrorIs(e.t, err, context.Canceled)
	e.assertNoResources()
}

// testCancelConverting: a cancelled conversion leaves the lock at its old
// mode with nothing queued.
func testCancelConverting(e *env) {
	a, b := e.open(1), e.open(2)
	first := e.lock(a, "r", lockc.PR)
	second := e.lock(b, "r", lockc.PR)
	ctx, cancel := context.WithCancel(e.ctx)
	up := e.convertAsync(ctx, second, lockc.EX)
	e.queued("r", 1, 0)
	cancel()
	_, err := e.wait(up)
	assert.ErrorIs(e.t, err, context.Canceled)
	assert.Equal(e.t, lockc.PR, second.Mode())
	e.queued("r", 0, 0)
	// Nothing of the cancelled conversion remains: the first lock can
	// convert without a deadlock, and gets EX once the second unlocks.
	conv := e.convertAsync(e.ctx, first, lockc.EX)
	e.queued("r", 1, 0)
	e.unlock(second)
	_, err = e.wait(conv)
	require.NoError(e.t, err)
	assert.Equal(e.t, lockc.EX, first.Mode())
	e.unlock(first)
	e.assertNoResources()
}

// testCancelRace: cancel a waiting request or conversion at the moment it
// is granted, many times. Either it succeeds and holds the lock, or it
// returns the context's error and nothing is held or published.
func testCancelRace(e *env) {
	a, b, c := e.open(1), e.open(2), e.open(3)
	watch := e.lock(c, "r", lockc.NL)
	conv := e.lock(b, "r", lockc.NL)
	const rounds = 300
	var won, cancelled, settling int
	published := false // a won round has published a value
	for i := range rounds {
		converting := i%2 == 1
		holder := e.lock(a, "r", lockc.EX)
		holder.InvalidateLVB()
		ctx, cancel := context.WithCancel(e.ctx)
		var p *pending
		if converting {
			p = e.convertAsync(ctx, conv, lockc.EX)
		} else {
			p = e.lockAsync(ctx, b, "r", lockc.EX)
		}
		if qw, ok := e.c.(QueueWaiter); ok {
			cv, w := 0, 1
			if converting {
				cv, w = 1, 0
			}
			require.NoError(e.t, qw.WaitQueueLen(e.ctx, e.ls, []byte("r"), cv, w))
		}
		switch i % 3 {
		case 0: // the waiter wakes for the cancellation as the grant arrives
			cancel()
			require.NoError(e.t, holder.Unlock(e.ctx))
		case 1: // the grant arrives first
			require.NoError(e.t, holder.Unlock(e.ctx))
			cancel()
		default:
			start := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(2)
			go func() { defer wg.Done(); <-start; _ = holder.Unlock(e.ctx) }()
			go func() { defer wg.Done(); <-start; cancel() }()
			close(start)
			wg.Wait()
		}
		l, err := e.wait(p)
		if err == nil {
			won++
			if converting {
				l = conv
			}
			require.Equal(e.t, lockc.EX, l.Mode())
			v, st := l.LVB()
			e.assertInvalid(v, st, published, fmt.Sprintf("round %d: the grant read the invalidated LVB", i))
			l.SetLVB(counter(uint64(i)))
			published = true
			if converting {
				e.convert(conv, lockc.NL)
			} else {
				e.unlock(l)
			}
			e.assertLVB(watch, uint64(i), lockc.LVBValid, "after a granted round")
			continue
		}
		cancelled++
		require.ErrorIs(e.t, err, context.Canceled, "round %d", i)
		if converting {
			require.Equal(e.t, lockc.NL, conv.Mode(), "round %d: a cancelled conversion keeps its mode", i)
		} else {
			require.Nil(e.t, l)
		}
		// Nothing held: EX is free for another node. On a networked
		// engine the master may still be settling the messages of the
		// race when the cancelled call returns (seen on the kernel DLM
		// across guests: a NoQueue request refused, the next one granted),
		// so a refused NoQueue waits for a grant, bounded: a lock left
		// held would never be granted. Nothing published: still invalid.
		free, err := c.Lock(e.ctx, []byte("r"), lockc.EX, lockc.NoQueue)
		if errors.Is(err, lockc.ErrWouldBlock) {
			settling++
			ctx, cancel := context.WithTimeout(e.ctx, settleBound)
			free, err = c.Lock(ctx, []byte("r"), lockc.EX)
			cancel()
		}
		require.NoError(e.t, err, "round %d: a cancelled request left something held", i)
		v, st := free.LVB()
		e.assertInvalid(v, st, published, fmt.Sprintf("round %d: a cancelled grant published the LVB", i))
		free.InvalidateLVB()
		e.unlock(free)
	}
	e.t.Logf("%d rounds granted, %d cancelled (%d of them still settling at return)", won, cancelled, settling)
	e.unlock(conv)
	e.unlock(watch)
	e.assertNoResources()
}

// testDeadlock: two PR holders converting to EX: the second gets
// ErrDeadlock and keeps PR; the first is granted once it unlocks.
func testDeadlock(e *env) {
	a, b := e.open(1), e.open(2)
	first := e.lock(a, "r", lockc.PR)
	second := e.lock(b, "r", lockc.PR)
	up := e.convertAsync(e.ctx, first, lockc.EX)
	e.queued("r", 1, 0)
	err := second.Convert(e.ctx, lockc.EX)
	assert.ErrorIs(e.t, err, lockc.ErrDeadlock)
	assert.Equal(e.t, lockc.PR, second.Mode())
	e.queued("r", 1, 0)
	e.unlock(second)
	_, err = e.wait(up)
	require.NoError(e.t, err)
	assert.Equal(e.t, lockc.EX, first.Mode())
	e.unlock(first)
	e.assertNoResources()
}

// testBusy: a second operation on a lock while a conversion waits gets
// ErrBusy and changes nothing.
func testBusy(e *env) {
	a, b := e.open(1), e.open(2)
	holder := e.lock(a, "r", lockc.EX)
	l := e.lock(b, "r", lockc.NL)
	up := e.convertAsync(e.ctx, l, lockc.PR)
	e.queued("r", 1, 0)
	assert.ErrorIs(e.t, l.Convert(e.ctx, lockc.CR), lockc.ErrBusy)
	assert.ErrorIs(e.t, l.Unlock(e.ctx), lockc.ErrBusy)
	e.queued("r", 1, 0)
	e.unlock(holder)
	_, err := e.wait(up)
	require.NoError(e.t, err)
	assert.Equal(e.t, lockc.PR, l.Mode(), "the first conversion completes as asked")
	e.unlock(l)
	e.assertNoResources()
}

// lossWatch records, for a lockspace that is a lockc.LostNotifier, the
// calls of an OnLost function and what it saw of the loss when called.
type lossWatch struct {
	mu      sync.Mutex
	calls   int
	early   bool // called while Lost was still open and IsLost false
	granted bool // another node's waiter was done when it was called
}

// watchLoss registers a lossWatch with ls if it is a lockc.LostNotifier
// (nil otherwise); waiter, if not nil, is closed once another node's
// request that waits for a lock of ls's node is answered.
func watchLoss(ls lockc.Lockspace, waiter <-chan struct{}) *lossWatch {
	ln, ok := ls.(lockc.LostNotifier)
	if !ok {
		return nil
	}
	w := &lossWatch{}
	ln.OnLost(func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.calls++
		w.early = true
		select {
		case <-ls.Lost():
			w.early = false
		default:
		}
		if lc, ok := ls.(lockc.LostChecker); ok && lc.IsLost() {
			w.early = false
		}
		if waiter != nil {
			select {
			case <-waiter:
				w.granted = true
			default:
			}
		}
	})
	return w
}

// check asserts, after ls was lost through how, that the function ran
// once, before the loss could be seen and before another node was
// granted, and that one registered now runs at once.
func (w *lossWatch) check(e *env, ls lockc.Lockspace, how string) {
	if w == nil {
		return
	}
	w.mu.Lock()
	assert.Equal(e.t, 1, w.calls, "OnLost function calls after the %s", how)
	assert.True(e.t, w.early, "the OnLost function ran before Lost was closed and IsLost turned true (%s)", how)
	assert.False(e.t, w.granted, "the OnLost function ran after another node was granted (%s)", how)
	w.mu.Unlock()
	late := false
	ls.(lockc.LostNotifier).OnLost(func() { late = true })
	assert.True(e.t, late, "OnLost on a lost lockspace calls the function before it returns (%s)", how)
}

// assertIsLost checks, for a lockspace that is a lockc.LostChecker, that
// IsLost says want.
func assertIsLost(e *env, ls lockc.Lockspace, want bool, when string) {
	if lc, ok := ls.(lockc.LostChecker); ok {
		assert.Equal(e.t, want, lc.IsLost(), "IsLost %s", when)
	}
}
