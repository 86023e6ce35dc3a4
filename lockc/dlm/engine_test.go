package dlm_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/dlm"
	"github.com/clustersnap/clustersnap/lockc/dlm/dlmtest"
	"github.com/clustersnap/clustersnap/lockc/dlm/solo"
)

// open joins lockspace name as node id of c; closed at cleanup.
func open(t *testing.T, c *dlmtest.Cluster, id uint32, name string) lockc.Lockspace {
	t.Helper()
	ls, err := c.Node(id).Open(t.Context(), name)
	require.NoError(t, err)
	t.Cleanup(func() { _ = ls.Close() })
	return ls
}

// value is an LVB holding n.
func value(n uint64) lockc.LVB {
	var v lockc.LVB
	for i := range 8 {
		v[i] = byte(n >> (8 * i))
	}
	v[31] = 0x5a
	return v
}

// On a machine without the DLM, Open says so.
func TestNoDLM(t *testing.T) {
	misc, err := os.ReadFile("/proc/misc")
	require.NoError(t, err)
	if strings.Contains(string(misc), "dlm-control") {
		t.Skip("this kernel has the DLM")
	}
	_, err = dlm.New(dlm.Options{NodeID: 1}).Open(t.Context(), "x")
	assert.ErrorIs(t, err, dlm.ErrNoDLM)
}

// With the DLM loaded but no controller (no local node in configfs), Open
// fails at once with ErrNoController: the kernel's EUNATCH, or the missing
// configfs node when the id is to be read from there. It needs a kernel
// nothing has configured yet, so the guest runs it first, on its own.
func TestNoController(t *testing.T) {
	if os.Getenv(dlmtest.EnvKernel) != "1" {
		t.Skipf("needs a guest kernel (%s=1)", dlmtest.EnvKernel)
	}
	if entries, _ := os.ReadDir("/sys/kernel/config/dlm/cluster/comms"); len(entries) > 0 {
		t.Skip("a node is configured already: this test runs first in a fresh guest")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	_, err := dlm.New(dlm.Options{NodeID: 1}).Open(ctx, "nocontroller")
	assert.ErrorIs(t, err, dlm.ErrNoController, "the kernel's EUNATCH")
	assert.Contains(t, err.Error(), "dlm_controld")
	_, err = dlm.New(dlm.Options{}).Open(ctx, "nocontroller")
	assert.ErrorIs(t, err, dlm.ErrNoController, "no local node to read the id from")
}

// When the controller stops the lockspace (as for recovery, or on quorum
// loss) the kernel blocks every request; the liveness probe stalls and the
// lockspace is lost within the bound: OnLost first, then IsLost and Lost,
// and pending requests fail with ErrLost. Once the lockspace runs again the
// node can rejoin.
func TestStallLoses(t *testing.T) {
	const bound = time.Second
	c := dlmtest.NewClusterOptions(t, dlm.Options{StallBound: bound})
	const name = "stall"
	a, b := open(t, c, 1, name), open(t, c, 2, name)
	ctx := t.Context()
	held, err := a.Lock(ctx, []byte("r"), lockc.EX)
	require.NoError(t, err)
	waiting := make(chan error, 1)
	go func() {
		_, err := b.Lock(ctx, []byte("r"), lockc.PR)
		waiting <- err
	}()
	require.NoError(t, c.WaitQueueLen(ctx, name, []byte("r"), 0, 1))

	var early atomic.Bool // OnLost ran before IsLost and Lost
	a.(lockc.LostNotifier).OnLost(func() {
		select {
		case <-a.Lost():
		default:
			early.Store(!a.(lockc.LostChecker).IsLost())
		}
	})
	stopped := time.Now()
	require.NoError(t, solo.StopLockspace(name))
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			require.NoError(t, solo.ResumeLockspace(name))
		}
	}
	t.Cleanup(resume)
	converting := make(chan error, 1)
	go func() { converting <- held.Convert(ctx, lockc.NL) }() // blocks in the kernel

	for _, ls := range []lockc.Lockspace{a, b} {
		select {
		case <-ls.Lost():
		case <-time.After(3 * bound):
			t.Fatalf("node %d: not lost %v after the lockspace stopped", ls.NodeID(), 3*bound)
		}
	}
	elapsed := time.Since(stopped)
	t.Logf("lost %v after the stop (bound %v)", elapsed, bound)
	assert.Less(t, elapsed, bound+bound/3+bound/2, "the probe runs every bound/3 and stalls for bound")
	assert.True(t, early.Load(), "OnLost ran before IsLost and Lost")
	assert.True(t, a.(lockc.LostChecker).IsLost())
	assert.ErrorIs(t, a.Err(), lockc.ErrLost)
	assert.ErrorIs(t, <-converting, lockc.ErrLost, "a conversion blocked in the stopped kernel")
	assert.ErrorIs(t, <-waiting, lockc.ErrLost, "a request waiting when the lockspace stopped")
	assert.ErrorIs(t, held.Unlock(ctx), lockc.ErrUnlocked)

	resume()
	again := open(t, c, 1, name)
	l, err := again.Lock(ctx, []byte("r"), lockc.EX, lockc.NoQueue)
	require.NoError(t, err, "the lost nodes' locks are gone once the lockspace runs")
	require.NoError(t, l.Unlock(ctx))
}

// A cancellation racing the grant, at random moments, of new requests and
// conversions: either the caller holds the lock, or it gets the context's
// error, holds nothing more and published nothing: the next holder reads
// the holder's value or its invalidation, or Invalid (an undone grant
// invalidates).
func TestCancelRaceLVB(t *testing.T) {
	c := dlmtest.NewCluster(t)
	const name = "cancelrace"
	a, b, w := open(t, c, 1, name), open(t, c, 2, name), open(t, c, 3, name)
	ctx := t.Context()
	res := []byte("r")
	keep, err := w.Lock(ctx, res, lockc.NL)
	require.NoError(t, err)
	conv, err := b.Lock(ctx, res, lockc.NL)
	require.NoError(t, err)
	read := func() (lockc.LVB, lockc.LVBState) {
		require.NoError(t, keep.Convert(ctx, lockc.CR))
		v, st := keep.LVB()
		require.NoError(t, keep.Convert(ctx, lockc.NL))
		return v, st
	}
	rng := rand.New(rand.NewPCG(17, 4))
	var won, cancelled int
	for i := range 200 {
		holder, err := a.Lock(ctx, res, lockc.EX)
		require.NoError(t, err)
		if i%4 == 3 {
			holder.InvalidateLVB()
		} else {
			holder.SetLVB(value(uint64(i)))
		}
		converting := i%2 == 1
		rctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		var got lockc.Lock
		if converting {
			go func() { done <- conv.Convert(rctx, lockc.PW) }()
		} else {
			go func() {
				var err error
				got, err = b.Lock(rctx, res, lockc.PW)
				done <- err
			}()
		}
		cv, wt := 0, 1
		if converting {
			cv, wt = 1, 0
		}
		require.NoError(t, c.WaitQueueLen(ctx, name, res, cv, wt))
		// The unlock (which grants) and the cancellation, each after a
		// random number of yields, from two goroutines.
		spinUnlock, spinCancel := rng.IntN(300), rng.IntN(300)
		unlocked := make(chan error, 1)
		go func() {
			for range spinUnlock {
				runtime.Gosched()
			}
			unlocked <- holder.Unlock(ctx)
		}()
		for range spinCancel {
			runtime.Gosched()
		}
		cancel()
		require.NoError(t, <-unlocked)
		err = <-done
		if err == nil {
			won++
			if i%4 == 3 {
				if converting {
					conv.InvalidateLVB()
				} else {
					got.InvalidateLVB()
				}
			}
			if converting {
				assert.Equal(t, lockc.PW, conv.Mode())
				require.NoError(t, conv.Convert(ctx, lockc.NL))
			} else {
				require.NoError(t, got.Unlock(ctx))
			}
		} else {
			cancelled++
			require.ErrorIs(t, err, context.Canceled, "round %d", i)
			if converting {
				assert.Equal(t, lockc.NL, conv.Mode(), "round %d", i)
			}
			free, err := w.Lock(ctx, res, lockc.EX, lockc.NoQueue)
			require.NoError(t, err, "round %d: the cancelled request left a lock", i)
			if v, st := free.LVB(); st != lockc.LVBInvalid {
				assert.True(t, i%4 != 3 && st == lockc.LVBValid && v == value(uint64(i)),
					"round %d: a cancelled request published %v (%v)", i, v, st)
			}
			free.InvalidateLVB()
			if i%4 != 3 {
				free.SetLVB(value(uint64(i)))
			}
			require.NoError(t, free.Unlock(ctx))
		}
		v, st := read()
		if i%4 == 3 {
			assert.Equal(t, lockc.LVBInvalid, st, "round %d: the invalidation survives", i)
		} else {
			assert.Equal(t, lockc.LVBValid, st, "round %d", i)
			assert.Equal(t, value(uint64(i)), v, "round %d", i)
		}
	}
	t.Logf("%d granted, %d cancelled", won, cancelled)
	assert.Positive(t, cancelled)
}

// On device ABI 6.0.1 an NL→EX conversion goes through PR (NL→EX may not
// return the latest LVB there); it still reads the latest value, and when
// EX cannot be had the lock is back at NL.
func TestABI601(t *testing.T) {
	c := dlmtest.NewCluster(t)
	dlm.SetABI(c.Engine(1), [3]uint32{6, 0, 1})
	const name = "abi601"
	a, b := open(t, c, 1, name), open(t, c, 2, name)
	ctx := t.Context()
	res := []byte("r")
	nl, err := a.Lock(ctx, res, lockc.NL)
	require.NoError(t, err)
	w, err := b.Lock(ctx, res, lockc.EX)
	require.NoError(t, err)
	w.SetLVB(value(7))
	require.NoError(t, w.Convert(ctx, lockc.CR))

	err = nl.Convert(ctx, lockc.EX, lockc.NoQueue)
	assert.ErrorIs(t, err, lockc.ErrWouldBlock, "CR held elsewhere: PR is granted, EX is not")
	assert.Equal(t, lockc.NL, nl.Mode(), "back at NL")
	cv, wt, err := 0, 0, c.WaitQueueLen(ctx, name, res, 0, 0)
	require.NoError(t, err, "nothing queued (%d, %d)", cv, wt)

	require.NoError(t, w.Unlock(ctx))
	require.NoError(t, nl.Convert(ctx, lockc.EX))
	v, st := nl.LVB()
	assert.Equal(t, lockc.LVBValid, st)
	assert.Equal(t, value(7), v)
	nl.SetLVB(value(8))
	require.NoError(t, nl.Convert(ctx, lockc.NL))
	r, err := b.Lock(ctx, res, lockc.PR)
	require.NoError(t, err)
	v, _ = r.LVB()
	assert.Equal(t, value(8), v)
	require.NoError(t, r.Unlock(ctx))
	require.NoError(t, nl.Unlock(ctx))
}

// Close publishes what a PW or EX lock staged (it unlocks, as Unlock
// would), where a crash invalidates.
func TestClosePublishes(t *testing.T) {
	c := dlmtest.NewCluster(t)
	const name = "closepub"
	a, b := open(t, c, 1, name), open(t, c, 2, name)
	ctx := t.Context()
	keep, err := b.Lock(ctx, []byte("r"), lockc.NL)
	require.NoError(t, err)
	ex, err := a.Lock(ctx, []byte("r"), lockc.EX)
	require.NoError(t, err)
	ex.SetLVB(value(3))
	require.NoError(t, a.Close())
	require.NoError(t, keep.Convert(ctx, lockc.PR))
	v, st := keep.LVB()
	assert.Equal(t, lockc.LVBValid, st)
	assert.Equal(t, value(3), v)
	require.NoError(t, keep.Convert(ctx, lockc.NL))

	a = open(t, c, 1, name)
	ex, err = a.Lock(ctx, []byte("r"), lockc.EX)
	require.NoError(t, err)
	ex.SetLVB(value(4))
	c.Crash(1)
	require.NoError(t, keep.Convert(ctx, lockc.PR))
	_, st = keep.LVB()
	assert.Equal(t, lockc.LVBInvalid, st, "a crashed EX holder")
	assert.True(t, errors.Is(ex.Unlock(ctx), lockc.ErrUnlocked))
}

// The kernel moves no LVB on PR→CW (its table has -1 there): neither the
// value PR read nor one staged on it reaches the resource, and CW keeps
// the copy PR read.
func TestPRToCWMovesNothing(t *testing.T) {
	c := dlmtest.NewCluster(t)
	const name = "prcw"
	a, b := open(t, c, 1, name), open(t, c, 2, name)
	ctx := t.Context()
	keep, err := b.Lock(ctx, []byte("r"), lockc.NL)
	require.NoError(t, err)
	w, err := a.Lock(ctx, []byte("r"), lockc.EX)
	require.NoError(t, err)
	w.SetLVB(value(5))
	require.NoError(t, w.Convert(ctx, lockc.PR))
	w.SetLVB(value(6))
	require.NoError(t, w.Convert(ctx, lockc.CW))
	v, st := w.LVB()
	assert.Equal(t, lockc.LVBValid, st)
	assert.Equal(t, value(6), v, "the staged value shows until a write or read")
	require.NoError(t, w.Unlock(ctx))
	require.NoError(t, keep.Convert(ctx, lockc.CR))
	v, st = keep.LVB()
	assert.Equal(t, lockc.LVBValid, st)
	assert.Equal(t, value(5), v, "PR→CW and CW unlock published nothing")
	require.NoError(t, keep.Unlock(ctx))
}
