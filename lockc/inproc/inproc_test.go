package inproc

import (
	"context"
	"errors"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/locktest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// harness runs the conformance suite against fresh clusters.
func harness() locktest.Harness {
	return locktest.Harness{
		Name:       "inproc",
		NewCluster: func(testing.TB) locktest.Cluster { return NewCluster() },
	}
}

// The conformance suite passes, and leaves no goroutine behind: the engine
// starts none, and every waiting caller returns.
func TestConformance(t *testing.T) {
	before := runtime.NumGoroutine()
	locktest.Run(t, harness())
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		runtime.Gosched() // finished sub-tests' goroutines are still exiting
	}
	assert.LessOrEqual(t, runtime.NumGoroutine(), before, "goroutines left running")
}

func BenchmarkCachedConvert(b *testing.B) { locktest.BenchmarkCachedConvert(b, harness()) }

func BenchmarkUncachedNL(b *testing.B) { locktest.BenchmarkUncached(b, harness(), lockc.NL) }

func BenchmarkUncachedEX(b *testing.B) { locktest.BenchmarkUncached(b, harness(), lockc.EX) }

func BenchmarkPingPong(b *testing.B) { locktest.BenchmarkPingPong(b, harness()) }

// open joins lockspace "ls" as node id.
func open(t *testing.T, c *Cluster, id uint32) lockc.Lockspace {
	t.Helper()
	ls, err := c.Node(id).Open(context.Background(), "ls")
	require.NoError(t, err)
	t.Cleanup(func() { _ = ls.Close() })
	return ls
}

// take locks res in mode m, which must be granted.
func take(t *testing.T, ls lockc.Lockspace, res string, m lockc.Mode) lockc.Lock {
	t.Helper()
	l, err := ls.Lock(context.Background(), []byte(res), m)
	require.NoError(t, err)
	return l
}

// state reads res's LVB state and value straight from the engine.
func state(c *Cluster, res string) (lockc.LVB, lockc.LVBState, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.spaces["ls"].resources[res]
	if r == nil {
		return lockc.LVB{}, lockc.LVBUnknown, false
	}
	return r.lvb, r.state, true
}

// A new request whose context ended just as it was granted is undone: the
// lock is released without publishing, and the caller gets ctx.Err().
func TestUndoNewGrant(t *testing.T) {
	ctx := context.Background()
	c := NewCluster()
	a, b, keep := open(t, c, 1), open(t, c, 2), open(t, c, 3)
	nl := take(t, keep, "r", lockc.NL)
	holder := take(t, a, "r", lockc.EX)
	holder.InvalidateLVB()

	waitCtx, cancel := context.WithCancel(ctx)
	l, o, err := b.(*member).request(waitCtx, []byte("r"), lockc.EX, 0)
	require.NoError(t, err)
	require.NotNil(t, o, "queued behind EX")
	require.NoError(t, holder.Unlock(ctx)) // grants the waiter
	cancel()
	err = l.wait(waitCtx, o)
	assert.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, uint64(1), c.Stats(2).Undone)
	assert.True(t, l.gone)
	_, st, _ := state(c, "r")
	assert.Equal(t, lockc.LVBInvalid, st, "the undone EX grant must not publish")
	free, err := b.Lock(ctx, []byte("r"), lockc.EX, lockc.NoQueue)
	require.NoError(t, err, "nothing left held")
	require.NoError(t, free.Unlock(ctx))
	require.NoError(t, nl.Unlock(ctx))
	assert.Zero(t, c.ResourceCount())
}

// A conversion whose context ended just as it was granted goes back to its
// old mode, LVB copy and token.
func TestUndoConversion(t *testing.T) {
	ctx := context.Background()
	c := NewCluster()
	a, b := open(t, c, 1), open(t, c, 2)
	holder := take(t, a, "r", lockc.EX)
	holder.SetLVB(lockc.LVB{7})
	require.NoError(t, holder.Convert(ctx, lockc.EX))
	pw := take(t, b, "r", lockc.NL)
	require.NoError(t, holder.Convert(ctx, lockc.PR))
	require.NoError(t, pw.Convert(ctx, lockc.CR))
	pw.SetLVB(lockc.LVB{9}) // staged in CR: no effect on the resource
	oldToken := pw.(lockc.Tokener).Token()

	waitCtx, cancel := context.WithCancel(ctx)
	l := pw.(*lock)
	o, err := l.startConvert(waitCtx, lockc.EX, 0)
	require.NoError(t, err)
	require.NotNil(t, o, "queued behind PR")
	require.NoError(t, holder.Unlock(ctx))
	cancel()
	assert.ErrorIs(t, l.wait(waitCtx, o), context.Canceled)
	assert.Equal(t, uint64(1), c.Stats(2).Undone)
	assert.Equal(t, lockc.CR, pw.Mode())
	v, st := pw.LVB()
	assert.Equal(t, lockc.LVB{9}, v, "the copy staged before the conversion")
	assert.Equal(t, lockc.LVBValid, st)
	assert.Equal(t, oldToken, pw.(lockc.Tokener).Token())
	require.NoError(t, pw.Convert(ctx, lockc.PR), "the lock is idle again")
	v, _ = pw.LVB()
	assert.Equal(t, lockc.LVB{7}, v)
	require.NoError(t, pw.Unlock(ctx))
	assert.Zero(t, c.ResourceCount())
}

// If a cancelled PR→CW conversion was granted and another lock has since
// been granted PR, going back to PR is impossible: the conversion stands.
func TestUndoMiddleConversionStands(t *testing.T) {
	ctx := context.Background()
	c := NewCluster()
	a, b, d := open(t, c, 1), open(t, c, 2), open(t, c, 3)
	conv := take(t, a, "r", lockc.PR)
	blocker := take(t, b, "r", lockc.PR)
	waitCtx, cancel := context.WithCancel(ctx)
	l := conv.(*lock)
	o, err := l.startConvert(waitCtx, lockc.CW, 0)
	require.NoError(t, err)
	require.NotNil(t, o, "CW waits for the other PR")
	require.NoError(t, blocker.Unlock(ctx))
	cw := take(t, d, "r", lockc.CW) // compatible with CW, not with PR
	cancel()
	assert.NoError(t, l.wait(waitCtx, o), "the grant stands")
	assert.Equal(t, lockc.CW, conv.Mode())
	assert.Zero(t, c.Stats(1).Undone)
	require.NoError(t, cw.Unlock(ctx))
	require.NoError(t, conv.Unlock(ctx))
}

// Stats counts each node's engine operations, grants and notifications.
func TestStats(t *testing.T) {
	ctx := context.Background()
	c := NewCluster()
	a, b := open(t, c, 1), open(t, c, 2)
	l := take(t, a, "r", lockc.NL)
	require.NoError(t, l.Convert(ctx, lockc.EX))
	_, err := b.Lock(ctx, []byte("r"), lockc.PR, lockc.NoQueue)
	require.ErrorIs(t, err, lockc.ErrWouldBlock)
	require.NoError(t, l.Convert(ctx, lockc.NL))
	require.NoError(t, l.Unlock(ctx))
	_, err = b.Lock(ctx, []byte("r"), lockc.Mode(8))
	require.ErrorIs(t, err, lockc.ErrBadRequest)
	assert.Equal(t, NodeStats{Requests: 1, Converts: 2, Unlocks: 1, Grants: 3}, c.Stats(1))
	assert.Equal(t, NodeStats{Requests: 1}, c.Stats(2), "bad requests do not reach the engine")
	assert.Equal(t, NodeStats{}, c.Stats(9))

	holder := take(t, a, "r", lockc.EX)
	done := make(chan error)
	go func() {
		l, err := b.Lock(ctx, []byte("r"), lockc.PR)
		if err == nil {
			err = l.Unlock(ctx)
		}
		done <- err
	}()
	require.NoError(t, c.WaitQueueLen(ctx, "ls", []byte("r"), 0, 1))
	require.NoError(t, holder.Unlock(ctx))
	require.NoError(t, <-done)
	assert.Equal(t, uint64(1), c.Stats(1).Basts)
	assert.Equal(t, uint64(2), c.Stats(2).Requests)
	assert.Equal(t, uint64(1), c.Stats(2).Grants)
}

// Tokens keep increasing even after the resource was forgotten.
func TestTokenSurvivesForget(t *testing.T) {
	ctx := context.Background()
	c := NewCluster()
	a := open(t, c, 1)
	l := take(t, a, "r", lockc.EX)
	first := l.(lockc.Tokener).Token()
	require.NoError(t, l.Unlock(ctx))
	require.Zero(t, c.ResourceCount())
	l = take(t, a, "r", lockc.EX)
	assert.Greater(t, l.(lockc.Tokener).Token(), first)
	require.NoError(t, l.Unlock(ctx))
}

// The default engine is a one-node cluster; lockspaces and nodes are
// forgotten when empty; node 0 is refused; crashing an unknown node and
// closing twice are harmless.
func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	ls, err := New().Open(ctx, "default")
	require.NoError(t, err)
	assert.Equal(t, uint32(1), ls.NodeID())
	assert.Equal(t, "default", ls.Name())
	assert.Nil(t, ls.Err())
	require.NoError(t, ls.Close())
	require.NoError(t, ls.Close())
	assert.ErrorIs(t, ls.Err(), lockc.ErrLost)
	assert.Contains(t, ls.Err().Error(), "closed")

	c := NewCluster()
	assert.Same(t, c.Node(3), c.Node(3))
	assert.Panics(t, func() { c.Node(0) })
	c.Crash(42)
	a := open(t, c, 1)
	take(t, a, "r", lockc.PR)
	c.Crash(1)
	assert.Contains(t, a.Err().Error(), "node 1 crashed")
	c.mu.Lock()
	assert.Empty(t, c.spaces, "the lockspace is forgotten with its last member")
	c.mu.Unlock()
	_, err = c.Node(1).Open(ctx, "")
	assert.ErrorIs(t, err, lockc.ErrBadRequest)
	done, cancel := context.WithCancel(ctx)
	cancel()
	_, err = c.Node(1).Open(done, "ls")
	assert.ErrorIs(t, err, context.Canceled)
}

// WaitQueueLen gives up with ctx.
func TestWaitQueueLenCancelled(t *testing.T) {
	c := NewCluster()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := c.WaitQueueLen(ctx, "ls", []byte("r"), 1, 0)
	assert.ErrorIs(t, err, context.Canceled)
	cv, w := c.QueueLen("ls", []byte("r"))
	assert.Zero(t, cv+w)
}

// checkInvariants checks the engine's tables: every remembered resource has
// a lock; each lock is on exactly one queue of its resource and in its
// member's set; locks on the granted and convert queues hold pairwise
// compatible modes; queued locks have an unfinished operation of the right
// kind.
func checkInvariants(t *testing.T, c *Cluster) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	onQueue := map[*lock]bool{}
	for name, sp := range c.spaces {
		require.Same(t, sp, c.spaces[name])
		for key, r := range sp.resources {
			require.Positive(t, len(r.granted)+len(r.converting)+len(r.waiting), "empty resource %q remembered", key)
			var holders []*lock
			add := func(l *lock) {
				require.False(t, onQueue[l], "lock on two queues of %q", key)
				onQueue[l] = true
				require.Same(t, r, l.res)
				require.False(t, l.gone)
				require.Nil(t, l.m.err, "a lost member's lock remains")
				_, ok := l.m.locks[l]
				require.True(t, ok, "lock missing from its member")
			}
			for _, l := range r.granted {
				add(l)
				require.True(t, l.held)
				require.True(t, l.op == nil || l.op.finished, "granted lock with a queued operation")
				holders = append(holders, l)
			}
			for _, l := range r.converting {
				add(l)
				require.True(t, l.held)
				require.True(t, l.op != nil && !l.op.finished && !l.op.isNew && lockc.IsUpConversion(l.gr, l.op.rq))
				holders = append(holders, l)
			}
			for _, l := range r.waiting {
				add(l)
				require.False(t, l.held)
				require.True(t, l.op != nil && !l.op.finished && l.op.isNew)
			}
			for _, x := range holders {
				for _, y := range holders {
					if x != y {
						require.True(t, lockc.Compatible(x.gr, y.gr), "%q: %v granted with %v", key, x.gr, y.gr)
					}
				}
			}
		}
	}
	for _, n := range c.nodes {
		for m := range n.members {
			require.Same(t, n, m.n)
			require.Nil(t, m.err, "a lost member is still joined")
			_, joined := m.sp.members[m]
			require.True(t, joined)
			require.Same(t, m.sp, c.spaces[m.sp.name], "member of a forgotten lockspace")
			for l := range m.locks {
				require.True(t, onQueue[l], "member lock on no queue")
			}
		}
	}
}

// A long random walk of requests, conversions (queued, refused, deadlocked,
// cancelled), unlocks, closes and crashes on a few resources, driven from
// one goroutine through the engine's non-waiting halves, keeps the tables
// consistent at every step and leaves nothing behind.
func TestRandomWalkInvariants(t *testing.T) {
	type pend struct {
		l      *lock
		o      *op
		ctx    context.Context
		cancel context.CancelFunc
	}
	rng := rand.New(rand.NewPCG(3, 4))
	modes := []lockc.Mode{lockc.NL, lockc.CR, lockc.CW, lockc.PR, lockc.PW, lockc.EX}
	c := NewCluster()
	const nodes = 3
	members := make([]*member, nodes)
	join := func(i int) {
		ls, err := c.Node(uint32(i+1)).Open(context.Background(), "ls")
		require.NoError(t, err)
		members[i] = ls.(*member)
	}
	for i := range members {
		join(i)
	}
	var idle []*lock
	var pending []pend
	resources := [][]byte{[]byte("a"), []byte("b"), []byte("c")}
	flagsFor := func(choices ...lockc.Flag) lockc.Flag {
		var f lockc.Flag
		for _, x := range choices {
			if rng.IntN(4) == 0 {
				f |= x
			}
		}
		return f
	}
	outcomes := map[string]int{}
	finish := func(i int, cancel bool) {
		p := pending[i]
		if cancel {
			p.cancel()
		} else if !p.o.finished {
			return
		}
		pending = slices.Delete(pending, i, i+1)
		err := p.l.wait(p.ctx, p.o)
		p.cancel()
		switch {
		case err == nil:
			outcomes["granted"]++
			idle = append(idle, p.l)
		case errors.Is(err, context.Canceled):
			outcomes["cancelled"]++
			if !p.o.isNew {
				idle = append(idle, p.l)
			}
		default:
			require.ErrorIs(t, err, lockc.ErrLost)
			outcomes["lost"]++
		}
	}
	for step := range 6000 {
		switch x := rng.IntN(20); {
		case x < 6:
			m := members[rng.IntN(nodes)]
			mode := modes[rng.IntN(len(modes))]
			f := flagsFor(lockc.NoQueue, lockc.NoOrder)
			if mode == lockc.NL {
				f |= flagsFor(lockc.Expedite)
			}
			ctx, cancel := context.WithCancel(context.Background())
			l, o, err := m.request(ctx, resources[rng.IntN(len(resources))], mode, f)
			switch {
			case err != nil:
				cancel()
				require.ErrorIs(t, err, lockc.ErrWouldBlock)
				outcomes["would block"]++
			case o == nil:
				cancel()
				idle = append(idle, l)
			default:
				pending = append(pending, pend{l, o, ctx, cancel})
			}
		case x < 12 && len(idle) > 0:
			i := rng.IntN(len(idle))
			l := idle[i]
			ctx, cancel := context.WithCancel(context.Background())
			o, err := l.startConvert(ctx, modes[rng.IntN(len(modes))], flagsFor(lockc.NoQueue, lockc.NoOrder, lockc.QueueConvert))
			switch {
			case errors.Is(err, lockc.ErrUnlocked):
				cancel()
				idle = slices.Delete(idle, i, i+1)
			case err != nil:
				cancel()
				if errors.Is(err, lockc.ErrDeadlock) {
					outcomes["deadlock"]++
				} else if !errors.Is(err, lockc.ErrBadRequest) {
					require.ErrorIs(t, err, lockc.ErrWouldBlock)
				}
			case o == nil:
				cancel()
			default:
				idle = slices.Delete(idle, i, i+1)
				pending = append(pending, pend{l, o, ctx, cancel})
			}
		case x < 15 && len(idle) > 0:
			i := rng.IntN(len(idle))
			if err := idle[i].Unlock(context.Background()); err != nil {
				require.ErrorIs(t, err, lockc.ErrUnlocked)
			}
			idle = slices.Delete(idle, i, i+1)
		case x < 17 && len(pending) > 0:
			finish(rng.IntN(len(pending)), false)
		case x < 18 && len(pending) > 0:
			finish(rng.IntN(len(pending)), true)
		case x == 19 && rng.IntN(10) == 0:
			i := rng.IntN(nodes)
			if rng.IntN(2) == 0 {
				c.Crash(uint32(i + 1))
				outcomes["crash"]++
			} else {
				require.NoError(t, members[i].Close())
				outcomes["close"]++
			}
			join(i)
		}
		checkInvariants(t, c)
		if t.Failed() {
			t.Fatalf("step %d", step)
		}
	}
	t.Logf("outcomes: %v", outcomes)
	for _, k := range []string{"granted", "cancelled", "lost", "would block", "deadlock", "crash", "close"} {
		assert.Positive(t, outcomes[k], "the walk never reached %q", k)
	}
	for len(pending) > 0 {
		finish(0, true)
	}
	for _, l := range idle {
		_ = l.Unlock(context.Background())
	}
	for _, m := range members {
		require.NoError(t, m.Close())
	}
	checkInvariants(t, c)
	assert.Zero(t, c.ResourceCount())
	assert.Empty(t, c.spaces)
}
