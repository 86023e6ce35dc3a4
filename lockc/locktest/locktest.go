package locktest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Harness describes an engine under test.
type Harness struct {
	// Name names the engine in test output.
	Name string
	// NewCluster returns a fresh cluster whose nodes share no state with
	// any other cluster's. The harness registers its own cleanup on tb.
	NewCluster func(tb testing.TB) Cluster
	// UnwrittenInvalidIsUnknown admits LVBUnknown with a zero LVB where
	// the suite expects LVBInvalid, on a resource that has never held a
	// published value. The kernel DLM does mark such a resource invalid
	// (IVVALBLK, a dead PW or EX holder) but reports the mark only once
	// the resource holds a value: set_lvb_lock returns before reporting
	// VALNOTVALID while the resource has no LVB buffer. Both states mean
	// "re-read the truth", so users cannot tell the difference; the
	// allowance never reaches a resource that held a published value.
	UnwrittenInvalidIsUnknown bool
}

// Cluster gives the engines of the nodes of one cluster.
type Cluster interface {
	// Node returns the engine of node id (ids from 1); the same id gives
	// the same node.
	Node(id uint32) lockc.Engine
}

// Crasher is implemented by clusters that can simulate a node's death: its
// lockspaces are lost, its locks are dropped without publishing, and
// resources where it held PW or EX get an invalid LVB.
type Crasher interface {
	// Crash kills node id and returns once its lockspaces are lost
	// (Lost closed) and its locks are gone from the other nodes' view.
	// The node may open lockspaces again later.
	Crash(id uint32)
}

// QueueWaiter is implemented by clusters that can tell when requests have
// queued. Ordering sub-tests need it.
type QueueWaiter interface {
	// WaitQueueLen blocks until exactly converting conversions and
	// waiting new requests are queued on resource in lockspace, and the
	// blocking notifications that queuing them causes have been
	// delivered; or until ctx ends.
	WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error
}

// ResourceCounter is implemented by clusters that can count the resources
// they remember; leak checks need it.
type ResourceCounter interface {
	// ResourceCount returns how many resources are remembered over all
	// lockspaces: zero once no lock is held or requested anywhere.
	ResourceCount() int
}

// timeout bounds every sub-test, so that a hang fails instead of blocking
// the test binary.
const timeout = 60 * time.Second

// settleBound bounds how long a lock another node released, or a cancelled
// request left, may take to become grantable on a networked engine.
const settleBound = 5 * time.Second

// Run runs the conformance suite against h.
func Run(t *testing.T, h Harness) {
	tests := []struct {
		name string
		run  func(*env)
	}{
		{"Compatibility", testCompatibility},
		{"BadRequests", testBadRequests},
		{"FIFO", testFIFO},
		{"ConversionsBeatWaiters", testConversionsBeatWaiters},
		{"ConversionInPlace", testConversionInPlace},
		{"QueueConvert", testQueueConvert},
		{"QueuedConversionsInOrder", testQueuedConversionsInOrder},
		{"DownConvertWakesInOrder", testDownConvertWakesInOrder},
		{"NoQueue", testNoQueue},
		{"Basts", testBasts},
		{"LVBDirection", testLVBDirection},
		{"FreshUnknown", testFreshUnknown},
		{"InvalidateLVB", testInvalidateLVB},
		{"Tokens", testTokens},
		{"Crash", testCrash},
		{"Close", testClose},
		{"CancelWaiting", testCancelWaiting},
		{"CancelConverting", testCancelConverting},
		{"CancelRace", testCancelRace},
		{"Deadlock", testDeadlock},
		{"Busy", testBusy},
		{"Linearizable", testLinearizable},
		{"Isolation", testIsolation},
		{"Soak", testSoak},
	}
	for _, tc := range tests {
		t.Run(h.Name+"/"+tc.name, func(t *testing.T) {
			tc.run(newEnv(t, h))
		})
	}
}

// env is one sub-test's cluster and helpers.
type env struct {
	t   *testing.T
	h   Harness
	c   Cluster
	ctx context.Context
	ls  string // lockspace most sub-tests use
}

func newEnv(t *testing.T, h Harness) *env {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return &env{t: t, h: h, c: h.NewCluster(t), ctx: ctx, ls: "locktest"}
}

// open joins lockspace e.ls as node id; the lockspace is closed at cleanup.
func (e *env) open(id uint32) lockc.Lockspace { return e.openNamed(id, e.ls) }

// openNamed joins lockspace name as node id.
func (e *env) openNamed(id uint32, name string) lockc.Lockspace {
	e.t.Helper()
	ls, err := e.c.Node(id).Open(e.ctx, name)
	require.NoError(e.t, err, "node %d: open %s", id, name)
	e.t.Cleanup(func() { _ = ls.Close() })
	return ls
}

// lock takes a lock that must be granted.
func (e *env) lock(ls lockc.Lockspace, res string, m lockc.Mode, flags ...lockc.Flag) lockc.Lock {
	e.t.Helper()
	l, err := ls.Lock(e.ctx, []byte(res), m, flags...)
	require.NoError(e.t, err, "node %d: lock %q %v", ls.NodeID(), res, m)
	require.Equal(e.t, m, l.Mode())
	return l
}

// convert converts l, which must succeed.
func (e *env) convert(l lockc.Lock, m lockc.Mode, flags ...lockc.Flag) {
	e.t.Helper()
	require.NoError(e.t, l.Convert(e.ctx, m, flags...), "convert to %v", m)
	require.Equal(e.t, m, l.Mode())
}

// unlock releases l, which must succeed.
func (e *env) unlock(l lockc.Lock) {
	e.t.Helper()
	require.NoError(e.t, l.Unlock(e.ctx))
}

// pending is a request or conversion running in its own goroutine.
type pending struct {
	done chan struct{}
	lock lockc.Lock
	err  error
}

// lockAsync starts ls.Lock in a goroutine.
func (e *env) lockAsync(ctx context.Context, ls lockc.Lockspace, res string, m lockc.Mode, flags ...lockc.Flag) *pending {
	p := &pending{done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.lock, p.err = ls.Lock(ctx, []byte(res), m, flags...)
	}()
	return p
}

// convertAsync starts l.Convert in a goroutine.
func (e *env) convertAsync(ctx context.Context, l lockc.Lock, m lockc.Mode, flags ...lockc.Flag) *pending {
	p := &pending{done: make(chan struct{}), lock: l}
	go func() {
		defer close(p.done)
		p.err = l.Convert(ctx, m, flags...)
	}()
	return p
}

// finished reports whether p has completed.
func (p *pending) finished() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits for p to complete and returns its outcome.
func (e *env) wait(p *pending) (lockc.Lock, error) {
	e.t.Helper()
	select {
	case <-p.done:
		return p.lock, p.err
	case <-e.ctx.Done():
		e.t.Fatalf("request still pending at the sub-test's deadline")
		return nil, nil
	}
}

// granted waits for p and requires success.
func (e *env) granted(p *pending, m lockc.Mode) lockc.Lock {
	e.t.Helper()
	l, err := e.wait(p)
	require.NoError(e.t, err)
	require.Equal(e.t, m, l.Mode())
	return l
}

// queueWaiter returns the cluster's QueueWaiter or skips the sub-test.
func (e *env) queueWaiter() QueueWaiter {
	e.t.Helper()
	qw, ok := e.c.(QueueWaiter)
	if !ok {
		e.t.Skip("cluster cannot report queue lengths (QueueWaiter)")
	}
	return qw
}

// queued waits until res in e.ls has exactly converting and waiting queued
// requests.
func (e *env) queued(res string, converting, waiting int) {
	e.t.Helper()
	require.NoError(e.t, e.queueWaiter().WaitQueueLen(e.ctx, e.ls, []byte(res), converting, waiting))
}

// crasher returns the cluster's Crasher or skips the sub-test.
func (e *env) crasher() Crasher {
	e.t.Helper()
	cr, ok := e.c.(Crasher)
	if !ok {
		e.t.Skip("cluster cannot simulate crashes (Crasher)")
	}
	return cr
}

// assertNoResources checks, if the cluster can count them, that no resource
// is remembered.
func (e *env) assertNoResources() {
	e.t.Helper()
	if rc, ok := e.c.(ResourceCounter); ok {
		assert.Zero(e.t, rc.ResourceCount(), "resources left behind")
	}
}

// expectBast waits for a blocking notification on l and checks its mode.
func (e *env) expectBast(l lockc.Lock, m lockc.Mode) {
	e.t.Helper()
	select {
	case got := <-l.Blocking():
		assert.Equal(e.t, m, got, "blocking notification")
	case <-e.ctx.Done():
		e.t.Fatalf("no blocking notification (want %v)", m)
	}
}

// noBast checks that no blocking notification is waiting on l.
func (e *env) noBast(l lockc.Lock, why string) {
	e.t.Helper()
	select {
	case got := <-l.Blocking():
		e.t.Errorf("unexpected blocking notification %v: %s", got, why)
	default:
	}
}

// counter encodes n as an LVB (little-endian in the first 8 bytes, a marker
// after it so that a zero LVB never decodes as valid).
func counter(n uint64) lockc.LVB {
	var v lockc.LVB
	for i := range 8 {
		v[i] = byte(n >> (8 * i))
	}
	copy(v[8:], "locktest")
	return v
}

// decode returns the counter in v, or false if v holds none.
func decode(v lockc.LVB) (uint64, bool) {
	if string(v[8:16]) != "locktest" {
		return 0, false
	}
	var n uint64
	for i := range 8 {
		n |= uint64(v[i]) << (8 * i)
	}
	return n, true
}

// readLVB reads the resource's LVB through l, which must hold NL: an
// up-conversion to CR reads it, and the way back to NL writes nothing.
func (e *env) readLVB(l lockc.Lock) (lockc.LVB, lockc.LVBState) {
	e.t.Helper()
	e.convert(l, lockc.CR)
	v, st := l.LVB()
	e.convert(l, lockc.NL)
	return v, st
}

// assertLVB checks that the resource's LVB, read through l (held in NL), is
// counter n in state st.
func (e *env) assertLVB(l lockc.Lock, n uint64, st lockc.LVBState, msg string) {
	e.t.Helper()
	v, got := e.readLVB(l)
	assert.Equal(e.t, st, got, "LVB state: %s", msg)
	if st == lockc.LVBValid {
		dec, ok := decode(v)
		assert.True(e.t, ok, "LVB %x holds no counter: %s", v, msg)
		assert.Equal(e.t, n, dec, "LVB value: %s", msg)
	}
}

// assertInvalid checks that an LVB read from a resource that a PW or EX
// holder invalidated is invalid; published says whether the resource has
// held a published value (see Harness.UnwrittenInvalidIsUnknown).
func (e *env) assertInvalid(v lockc.LVB, st lockc.LVBState, published bool, msg string) {
	e.t.Helper()
	if !published && e.h.UnwrittenInvalidIsUnknown && st == lockc.LVBUnknown {
		assert.Equal(e.t, lockc.LVB{}, v, "an Unknown LVB reads as zeros: %s", msg)
		return
	}
	assert.Equal(e.t, lockc.LVBInvalid, st, msg)
}

// isLost reports whether err says the node lost the lockspace or the lock.
func isLost(err error) bool {
	return errors.Is(err, lockc.ErrLost) || errors.Is(err, lockc.ErrUnlocked)
}
