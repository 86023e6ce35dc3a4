package dlmcluster

import (
	"context"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// crossLockspace is the lockspace of the cross-node tests. Guest 1 opens it
// first, so guest 1 masters the engines' liveness probe resource in it:
// killing or cutting off another guest then stalls no survivor's probe.
const crossLockspace = "xnode"

// xnode is the cross-node tests' view of the guests: one lockspace per
// guest, opened through agent node 1 of each.
type xnode struct {
	t     *testing.T
	ctx   context.Context
	rm    *Remote
	lc    *LockCluster
	space map[int]lockc.Lockspace // by guest
}

// newXnode opens crossLockspace on every guest, guest 1 first.
func newXnode(ctx context.Context, t *testing.T, rm *Remote) *xnode {
	x := &xnode{t: t, ctx: ctx, rm: rm, lc: rm.LockCluster(t, 3), space: map[int]lockc.Lockspace{}}
	for g := 1; g <= 3; g++ {
		x.open(g)
	}
	return x
}

// open (re)opens crossLockspace on guest g.
func (x *xnode) open(g int) lockc.Lockspace {
	x.t.Helper()
	ls, err := x.rm.Node(g, 1).Open(x.ctx, crossLockspace)
	require.NoError(x.t, err, "guest %d: open %s", g, crossLockspace)
	x.space[g] = ls
	return ls
}

// lock takes a lock on guest g that must be granted.
func (x *xnode) lock(g int, res string, m lockc.Mode) lockc.Lock {
	x.t.Helper()
	l, err := x.space[g].Lock(x.ctx, []byte(res), m)
	require.NoError(x.t, err, "guest %d: lock %q %v", g, res, m)
	return l
}

// lockAsync requests a lock on guest g in the background.
func (x *xnode) lockAsync(g int, res string, m lockc.Mode) <-chan lockResult {
	ch := make(chan lockResult, 1)
	go func() {
		l, err := x.space[g].Lock(x.ctx, []byte(res), m)
		ch <- lockResult{l, err, time.Now()}
	}()
	return ch
}

// lockResult is the outcome of lockAsync.
type lockResult struct {
	l   lockc.Lock
	err error
	at  time.Time
}

// granted waits for a background request, which must be granted.
func (x *xnode) granted(ch <-chan lockResult, what string) lockResult {
	x.t.Helper()
	select {
	case r := <-ch:
		require.NoError(x.t, r.err, what)
		return r
	case <-x.ctx.Done():
		x.t.Fatalf("%s: not granted: %v", what, x.ctx.Err())
		return lockResult{}
	}
}

// masters reports which guests say they master res (debugfs).
func (x *xnode) masters(res string) []int {
	x.t.Helper()
	var m []int
	for g := 1; g <= 3; g++ {
		r, err := x.rm.Client(g).Extension(x.ctx, "queues", crossLockspace, []byte(res))
		require.NoError(x.t, err)
		if r.Flag {
			m = append(m, g)
		}
	}
	return m
}

// value is an LVB with a recognisable content.
func value(s string) lockc.LVB {
	var v lockc.LVB
	copy(v[:], s)
	return v
}

// testRemoteMastering: guest 2 masters a resource that guests 1 and 3
// contend for; grants, waits and releases travel through guest 2.
func testRemoteMastering(x *xnode) {
	keep := x.lock(2, "mastered", lockc.NL) // first requester: guest 2 masters it
	ex := x.lock(1, "mastered", lockc.EX)
	assert.Equal(x.t, []int{2}, x.masters("mastered"), "the resource's master")
	pr := x.lockAsync(3, "mastered", lockc.PR)
	require.NoError(x.t, x.lc.WaitQueueLen(x.ctx, crossLockspace, []byte("mastered"), 0, 1), "guest 3's request queued on guest 2")
	_, err := x.space[3].Lock(x.ctx, []byte("mastered"), lockc.CR, lockc.NoQueue)
	assert.ErrorIs(x.t, err, lockc.ErrWouldBlock, "a request behind a queued one")
	require.NoError(x.t, ex.Unlock(x.ctx))
	got := x.granted(pr, "guest 3's PR after guest 1's unlock")
	assert.Equal(x.t, lockc.PR, got.l.Mode())
	assert.Equal(x.t, []int{2}, x.masters("mastered"), "the master stays")
	require.NoError(x.t, got.l.Unlock(x.ctx))
	require.NoError(x.t, keep.Unlock(x.ctx))
}

// testLVBAcrossGuests: a value published on guest 1 is read on guest 3, on
// a resource guest 2 masters; an invalidation travels too.
func testLVBAcrossGuests(x *xnode) {
	keep := x.lock(2, "lvb", lockc.NL)
	w := x.lock(1, "lvb", lockc.EX)
	w.SetLVB(value("written on guest 1"))
	require.NoError(x.t, w.Convert(x.ctx, lockc.NL), "publish")
	r := x.lock(3, "lvb", lockc.PR)
	v, st := r.LVB()
	assert.Equal(x.t, lockc.LVBValid, st)
	assert.Equal(x.t, value("written on guest 1"), v, "read on guest 3")
	require.NoError(x.t, r.Unlock(x.ctx))

	require.NoError(x.t, w.Convert(x.ctx, lockc.EX))
	w.InvalidateLVB()
	require.NoError(x.t, w.Unlock(x.ctx))
	r = x.lock(3, "lvb", lockc.PR)
	_, st = r.LVB()
	assert.Equal(x.t, lockc.LVBInvalid, st, "invalidated on guest 1, read on guest 3")
	require.NoError(x.t, r.Unlock(x.ctx))
	require.NoError(x.t, keep.Unlock(x.ctx))
}

// testBlockingAcrossGuests: a request queued on guest 3 notifies guest 1's
// incompatible holder with the requested mode, and is granted once guest 1
// lets go.
func testBlockingAcrossGuests(x *xnode) {
	pr := x.lock(1, "bast", lockc.PR)
	cr := x.lock(2, "bast", lockc.CR)
	ex := x.lockAsync(3, "bast", lockc.EX)
	select {
	case m := <-pr.Blocking():
		assert.Equal(x.t, lockc.EX, m, "guest 1's notification")
	case <-x.ctx.Done():
		x.t.Fatalf("guest 1 heard of no blocking request")
	}
	select {
	case m := <-cr.Blocking():
		assert.Equal(x.t, lockc.EX, m, "guest 2's notification")
	case <-x.ctx.Done():
		x.t.Fatalf("guest 2 heard of no blocking request")
	}
	require.NoError(x.t, pr.Unlock(x.ctx))
	require.NoError(x.t, cr.Convert(x.ctx, lockc.NL), "guest 2 gives way as a cache would")
	got := x.granted(ex, "guest 3's EX")
	require.NoError(x.t, got.l.Unlock(x.ctx))
	require.NoError(x.t, cr.Unlock(x.ctx))
}

// testKillGuest: guest 3 holds EX with a published LVB and PR elsewhere
// when its QEMU is killed. After corosync and the DLM recover, the
// survivors' waiting requests are granted and the LVB is invalid; the
// survivors keep their lockspaces. Guest 3 then boots again, rejoins and
// locks.
func testKillGuest(x *xnode) {
	keep := x.lock(1, "killed", lockc.NL)
	ex := x.lock(3, "killed", lockc.EX)
	ex.SetLVB(value("published by guest 3"))
	require.NoError(x.t, ex.Convert(x.ctx, lockc.EX), "a same-mode conversion publishes")
	x.lock(3, "killed-pr", lockc.PR)
	waitPR := x.lockAsync(1, "killed", lockc.PR)
	waitEX := x.lockAsync(2, "killed-pr", lockc.EX)
	require.NoError(x.t, x.lc.WaitQueueLen(x.ctx, crossLockspace, []byte("killed"), 0, 1))
	require.NoError(x.t, x.lc.WaitQueueLen(x.ctx, crossLockspace, []byte("killed-pr"), 0, 1))

	killed := time.Now()
	x.rm.Kill(3)
	g1 := x.granted(waitPR, "guest 1's PR after guest 3's death")
	g2 := x.granted(waitEX, "guest 2's EX after guest 3's death")
	x.t.Logf("survivors granted %v and %v after the kill", g1.at.Sub(killed).Round(100*time.Millisecond), g2.at.Sub(killed).Round(100*time.Millisecond))
	_, st := g1.l.LVB()
	assert.Equal(x.t, lockc.LVBInvalid, st, "the dead EX holder's LVB")
	for g := 1; g <= 2; g++ {
		assert.NoError(x.t, x.space[g].Err(), "guest %d's lockspace survives", g)
	}
	require.NoError(x.t, g1.l.Unlock(x.ctx))
	require.NoError(x.t, g2.l.Unlock(x.ctx))

	rebooted := time.Now()
	require.NoError(x.t, x.rm.Reboot(x.ctx, 3))
	x.open(3)
	x.t.Logf("guest 3 rejoined and opened %s %v after its boot began", crossLockspace, time.Since(rebooted).Round(100*time.Millisecond))
	// Nothing published since the death: the value must not look valid.
	// Usually it is still Invalid; a recovery that rebuilds the resource
	// from NL locks alone (a member change while guest 3 joins) may leave
	// it with no LVB at all, which reads as Unknown.
	again := x.lock(3, "killed", lockc.EX)
	_, st = again.LVB()
	assert.NotEqual(x.t, lockc.LVBValid, st, "nothing published since the EX holder died")
	x.t.Logf("the LVB after the rejoin: %v", st)
	again.SetLVB(value("published after the rejoin"))
	require.NoError(x.t, again.Unlock(x.ctx))
	r := x.lock(2, "killed", lockc.PR)
	v, st := r.LVB()
	assert.Equal(x.t, lockc.LVBValid, st)
	assert.Equal(x.t, value("published after the rejoin"), v)
	require.NoError(x.t, r.Unlock(x.ctx))
	require.NoError(x.t, keep.Unlock(x.ctx))
}

// testPartition: the hub cuts guest 2 off while it holds EX with a
// published LVB and guest 1 waits. The cut-off guest loses quorum, its
// lockspace stalls and its Lost fires (the engine's stall probe); the
// majority recovers without it and grants guest 1, with the LVB invalid.
// Without fencing nothing orders the two; both times are logged. Guest 3
// holds NL first, so it masters the resource and purges the cut-off
// holder's lock itself (with no lock left that carries the value, a new
// master would rebuild the resource without any LVB: Unknown).
func testPartition(x *xnode) {
	keep := x.lock(3, "cut", lockc.NL)
	ex := x.lock(2, "cut", lockc.EX)
	ex.SetLVB(value("published by guest 2"))
	require.NoError(x.t, ex.Convert(x.ctx, lockc.EX))
	wait := x.lockAsync(1, "cut", lockc.EX)
	require.NoError(x.t, x.lc.WaitQueueLen(x.ctx, crossLockspace, []byte("cut"), 0, 1))

	cut := time.Now()
	x.rm.Guests().Hub().Cut(2, true)
	got := x.granted(wait, "guest 1's EX after guest 2 was cut off")
	x.t.Logf("the majority granted guest 1 %v after the cut", got.at.Sub(cut).Round(100*time.Millisecond))
	_, st := got.l.LVB()
	assert.Equal(x.t, lockc.LVBInvalid, st, "the cut-off EX holder's LVB")
	select {
	case <-x.space[2].Lost():
		x.t.Logf("guest 2's lockspace lost %v after the cut: %v", time.Since(cut).Round(100*time.Millisecond), x.space[2].Err())
	case <-x.ctx.Done():
		x.t.Fatalf("guest 2's lockspace was not lost")
	}
	assert.ErrorIs(x.t, x.space[2].Err(), lockc.ErrLost)
	assert.NoError(x.t, x.space[1].Err(), "the majority keeps its lockspace")
	require.NoError(x.t, got.l.Unlock(x.ctx))
	require.NoError(x.t, keep.Unlock(x.ctx))
}
