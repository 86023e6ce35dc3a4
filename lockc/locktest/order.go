package locktest

import (
	"fmt"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// modes lists the six modes.
var modes = []lockc.Mode{lockc.NL, lockc.CR, lockc.CW, lockc.PR, lockc.PW, lockc.EX}

// testCompatibility: for all 36 pairs, a NoQueue request (and a NoQueue
// conversion from NL) succeeds exactly when the matrix allows it.
func testCompatibility(e *env) {
	a, b := e.open(1), e.open(2)
	for _, gr := range modes {
		for _, rq := range modes {
			res := fmt.Sprintf("compat-%v-%v", gr, rq)
			held := e.lock(a, res, gr)
			l, err := b.Lock(e.ctx, []byte(res), rq, lockc.NoQueue)
			if lockc.Compatible(gr, rq) {
				if assert.NoError(e.t, err, "%v granted, new %v", gr, rq) {
					assert.Equal(e.t, rq, l.Mode())
					e.unlock(l)
				}
			} else {
				assert.ErrorIs(e.t, err, lockc.ErrWouldBlock, "%v granted, new %v", gr, rq)
				assert.Nil(e.t, l)
			}

			nl := e.lock(b, res, lockc.NL)
			err = nl.Convert(e.ctx, rq, lockc.NoQueue)
			if lockc.Compatible(gr, rq) {
				assert.NoError(e.t, err, "%v granted, NL→%v", gr, rq)
				assert.Equal(e.t, rq, nl.Mode())
			} else {
				assert.ErrorIs(e.t, err, lockc.ErrWouldBlock, "%v granted, NL→%v", gr, rq)
				assert.Equal(e.t, lockc.NL, nl.Mode(), "a refused conversion keeps its mode")
			}
			e.unlock(nl)
			e.unlock(held)
		}
	}
	e.assertNoResources()
}

// testBadRequests: invalid modes, names and flag combinations are refused
// with ErrBadRequest.
func testBadRequests(e *env) {
	a := e.open(1)
	_, err := a.Lock(e.ctx, []byte("r"), lockc.Mode(6))
	assert.ErrorIs(e.t, err, lockc.ErrBadRequest, "mode 6")
	_, err = a.Lock(e.ctx, nil, lockc.NL)
	assert.ErrorIs(e.t, err, lockc.ErrBadRequest, "empty name")
	_, err = a.Lock(e.ctx, make([]byte, lockc.MaxResourceName+1), lockc.NL)
	assert.ErrorIs(e.t, err, lockc.ErrBadRequest, "65-byte name")
	_, err = a.Lock(e.ctx, []byte("r"), lockc.EX, lockc.Expedite)
	assert.ErrorIs(e.t, err, lockc.ErrBadRequest, "Expedite on EX")
	_, err = a.Lock(e.ctx, []byte("r"), lockc.PR, lockc.QueueConvert)
	assert.ErrorIs(e.t, err, lockc.ErrBadRequest, "QueueConvert on a new request")

	l := e.lock(a, "r", lockc.PR)
	assert.ErrorIs(e.t, l.Convert(e.ctx, lockc.Mode(9)), lockc.ErrBadRequest, "convert to mode 9")
	assert.ErrorIs(e.t, l.Convert(e.ctx, lockc.NL, lockc.QueueConvert), lockc.ErrBadRequest, "QueueConvert down")
	assert.Equal(e.t, lockc.PR, l.Mode())
	e.unlock(l)
	assert.ErrorIs(e.t, l.Unlock(e.ctx), lockc.ErrUnlocked, "second unlock")
	assert.ErrorIs(e.t, l.Convert(e.ctx, lockc.EX), lockc.ErrUnlocked, "convert after unlock")
	e.assertNoResources()
}

// testFIFO: a compatible newcomer waits behind an incompatible waiter;
// waiters are granted in order; NoOrder and Expedite jump the queue.
func testFIFO(e *env) {
	a, b, c := e.open(1), e.open(2), e.open(3)
	holder := e.lock(a, "r", lockc.PR)
	exWaiter := e.lockAsync(e.ctx, b, "r", lockc.EX)
	e.queued("r", 0, 1)
	prWaiter := e.lockAsync(e.ctx, c, "r", lockc.PR)
	e.queued("r", 0, 2)

	_, err := c.Lock(e.ctx, []byte("r"), lockc.PR, lockc.NoQueue)
	assert.ErrorIs(e.t, err, lockc.ErrWouldBlock, "PR is compatible with the holder but must wait behind EX")
	_, err = c.Lock(e.ctx, []byte("r"), lockc.NL, lockc.NoQueue)
	assert.ErrorIs(e.t, err, lockc.ErrWouldBlock, "even NL waits behind the queue without Expedite")
	nl := e.lock(c, "r", lockc.NL, lockc.Expedite)
	unordered := e.lock(c, "r", lockc.PR, lockc.NoOrder)
	e.queued("r", 0, 2)
	e.unlock(unordered)

	assert.False(e.t, exWaiter.finished())
	assert.False(e.t, prWaiter.finished())
	e.unlock(holder)
	ex := e.granted(exWaiter, lockc.EX)
	e.queued("r", 0, 1)
	assert.False(e.t, prWaiter.finished(), "PR must wait for EX")
	e.unlock(ex)
	e.unlock(e.granted(prWaiter, lockc.PR))
	e.unlock(nl)
	e.assertNoResources()
}

// testConversionsBeatWaiters: a conversion queued after a waiter is granted
// before it.
func testConversionsBeatWaiters(e *env) {
	a, b, c := e.open(1), e.open(2), e.open(3)
	first := e.lock(a, "r", lockc.PR)
	second := e.lock(b, "r", lockc.PR)
	waiter := e.lockAsync(e.ctx, c, "r", lockc.EX)
	e.queued("r", 0, 1)
	conv := e.convertAsync(e.ctx, first, lockc.EX)
	e.queued("r", 1, 1)
	e.unlock(second)
	_, err := e.wait(conv)
	require.NoError(e.t, err)
	assert.Equal(e.t, lockc.EX, first.Mode())
	e.queued("r", 0, 1)
	assert.False(e.t, waiter.finished(), "the waiter must wait for the conversion")
	e.unlock(first)
	e.unlock(e.granted(waiter, lockc.EX))
	e.assertNoResources()
}

// testConversionInPlace: a compatible conversion is granted at once even
// with an incompatible new request waiting.
func testConversionInPlace(e *env) {
	a, b := e.open(1), e.open(2)
	held := e.lock(a, "r", lockc.CR)
	waiter := e.lockAsync(e.ctx, b, "r", lockc.EX)
	e.queued("r", 0, 1)
	require.NoError(e.t, held.Convert(e.ctx, lockc.PR, lockc.NoQueue), "compatible conversion, waiters ignored")
	assert.Equal(e.t, lockc.PR, held.Mode())
	require.NoError(e.t, held.Convert(e.ctx, lockc.EX, lockc.NoQueue), "no other holder: EX in place")
	assert.False(e.t, waiter.finished())
	e.unlock(held)
	e.unlock(e.granted(waiter, lockc.EX))
	e.assertNoResources()

	// In place, but still compatible with the granted mode of a queued
	// conversion: CW would conflict with the converting lock's PR.
	conv := e.lock(a, "q", lockc.PR)
	cr := e.lock(b, "q", lockc.CR)
	nl := e.lock(b, "q", lockc.NL)
	up := e.convertAsync(e.ctx, conv, lockc.EX)
	e.queued("q", 1, 0)
	assert.ErrorIs(e.t, nl.Convert(e.ctx, lockc.CW, lockc.NoQueue), lockc.ErrWouldBlock,
		"CW conflicts with the PR still granted to the queued conversion")
	e.convert(nl, lockc.CR)
	e.unlock(cr)
	e.unlock(nl)
	_, err := e.wait(up)
	require.NoError(e.t, err)
	assert.Equal(e.t, lockc.EX, conv.Mode())
	e.unlock(conv)
	e.assertNoResources()
}

// testQueueConvert: QueueConvert queues a conversion behind the convert
// queue even when it is compatible.
func testQueueConvert(e *env) {
	a, b, c := e.open(1), e.open(2), e.open(3)
	first := e.lock(a, "r", lockc.PR)
	second := e.lock(b, "r", lockc.PR)
	late := e.lock(c, "r", lockc.NL)
	other := e.lock(c, "r", lockc.NL)

	up := e.convertAsync(e.ctx, first, lockc.EX)
	e.queued("r", 1, 0)
	assert.ErrorIs(e.t, late.Convert(e.ctx, lockc.CR, lockc.QueueConvert, lockc.NoQueue), lockc.ErrWouldBlock,
		"QueueConvert with conversions queued cannot be granted at once")
	e.convert(other, lockc.CR) // without QueueConvert: in place
	queuedCR := e.convertAsync(e.ctx, late, lockc.CR, lockc.QueueConvert)
	e.queued("r", 2, 0)

	e.unlock(second)
	e.unlock(other)
	_, err := e.wait(up)
	require.NoError(e.t, err)
	e.queued("r", 1, 0)
	assert.False(e.t, queuedCR.finished(), "CR behind EX")
	e.unlock(first)
	_, err = e.wait(queuedCR)
	require.NoError(e.t, err)
	assert.Equal(e.t, lockc.CR, late.Mode())
	e.unlock(late)
	e.assertNoResources()
}

// testQueuedConversionsInOrder: queued conversions are granted first in,
// first out, even when a later one alone would be grantable.
func testQueuedConversionsInOrder(e *env) {
	a, b, c := e.open(1), e.open(2), e.open(3)
	holder := e.lock(a, "r", lockc.EX)
	first := e.lock(b, "r", lockc.NL)
	second := e.lock(c, "r", lockc.NL)
	upEX := e.convertAsync(e.ctx, first, lockc.EX)
	e.queued("r", 1, 0)
	upCR := e.convertAsync(e.ctx, second, lockc.CR)
	e.queued("r", 2, 0)
	e.unlock(holder)
	_, err := e.wait(upEX)
	require.NoError(e.t, err)
	assert.Equal(e.t, lockc.EX, first.Mode())
	e.queued("r", 1, 0)
	assert.False(e.t, upCR.finished(), "CR was queued after EX")
	e.convert(first, lockc.NL)
	_, err = e.wait(upCR)
	require.NoError(e.t, err)
	assert.Equal(e.t, lockc.CR, second.Mode())
	e.unlock(first)
	e.unlock(second)
	e.assertNoResources()
}

// testDownConvertWakesInOrder: a down-conversion is immediate and grants
// the waiters that have become grantable, in order.
func testDownConvertWakesInOrder(e *env) {
	a, b, c, d := e.open(1), e.open(2), e.open(3), e.open(4)
	holder := e.lock(a, "r", lockc.EX)
	w1 := e.lockAsync(e.ctx, b, "r", lockc.PR)
	e.queued("r", 0, 1)
	w2 := e.lockAsync(e.ctx, c, "r", lockc.CW)
	e.queued("r", 0, 2)
	w3 := e.lockAsync(e.ctx, d, "r", lockc.PR)
	e.queued("r", 0, 3)

	require.NoError(e.t, holder.Convert(e.ctx, lockc.PR, lockc.NoQueue), "down-conversions never wait")
	l1 := e.granted(w1, lockc.PR)
	e.queued("r", 0, 2)
	assert.False(e.t, w2.finished(), "CW conflicts with PR")
	assert.False(e.t, w3.finished(), "PR waits behind CW")
	e.convert(holder, lockc.NL)
	e.unlock(l1)
	l2 := e.granted(w2, lockc.CW)
	e.queued("r", 0, 1)
	assert.False(e.t, w3.finished())
	e.convert(l2, lockc.CR)
	e.unlock(e.granted(w3, lockc.PR))
	e.unlock(l2)
	e.unlock(holder)
	e.assertNoResources()
}

// testNoQueue: a refused NoQueue request or conversion leaves no residue
// and sends no blocking notification.
func testNoQueue(e *env) {
	a, b, c := e.open(1), e.open(2), e.open(3)
	holder := e.lock(a, "r", lockc.EX)
	l, err := b.Lock(e.ctx, []byte("r"), lockc.PR, lockc.NoQueue)
	assert.ErrorIs(e.t, err, lockc.ErrWouldBlock)
	assert.Nil(e.t, l)
	nl := e.lock(b, "r", lockc.NL)
	assert.ErrorIs(e.t, nl.Convert(e.ctx, lockc.PW, lockc.NoQueue), lockc.ErrWouldBlock)
	assert.Equal(e.t, lockc.NL, nl.Mode())
	e.queued("r", 0, 0)

	// A later queued CR request is the first notification the holder
	// gets; had the refused PR or PW requests notified it, it would see
	// the higher of the modes.
	cr := e.lockAsync(e.ctx, c, "r", lockc.CR)
	e.queued("r", 0, 1)
	e.expectBast(holder, lockc.CR)
	e.unlock(holder)
	e.unlock(e.granted(cr, lockc.CR))
	e.unlock(nl)
	e.assertNoResources()

	// Nothing of the refused request stays: the resource is free.
	again := e.lock(b, "r", lockc.EX, lockc.NoQueue)
	e.unlock(again)
	e.assertNoResources()
}

// testBasts: only incompatible holders are notified, with the requested
// mode, once per level until granted again, and never after unlock.
func testBasts(e *env) {
	a, b, c, d := e.open(1), e.open(2), e.open(3), e.open(4)
	nl := e.lock(a, "r", lockc.NL)
	cr := e.lock(a, "r", lockc.CR)
	pr := e.lock(b, "r", lockc.PR)

	cw := e.lockAsync(e.ctx, c, "r", lockc.CW)
	e.queued("r", 0, 1)
	e.expectBast(pr, lockc.CW)
	e.noBast(nl, "NL is compatible with CW")
	e.noBast(cr, "CR is compatible with CW")

	cw2 := e.lockAsync(e.ctx, d, "r", lockc.CW)
	e.queued("r", 0, 2)
	e.noBast(pr, "already told about CW")

	ex := e.lockAsync(e.ctx, d, "r", lockc.EX)
	e.queued("r", 0, 3)
	e.expectBast(pr, lockc.EX)
	e.expectBast(cr, lockc.EX)
	e.noBast(nl, "NL is compatible with everything")

	// A same-mode conversion re-grants PR: it hears of the waiters again,
	// with the highest blocked mode.
	e.convert(pr, lockc.PR)
	e.expectBast(pr, lockc.EX)

	// A notification not yet received when the lock is released is
	// withdrawn with it.
	e.convert(cr, lockc.CR)
	e.unlock(pr)
	e.unlock(cr)
	l1, l2 := e.granted(cw, lockc.CW), e.granted(cw2, lockc.CW)
	e.noBast(pr, "unlocked")
	e.noBast(cr, "unlocked with a notification pending")
	e.expectBast(l1, lockc.EX)
	e.expectBast(l2, lockc.EX)
	e.unlock(l1)
	e.unlock(l2)
	e.unlock(e.granted(ex, lockc.EX))
	e.noBast(l1, "unlocked")
	e.unlock(nl)
	e.assertNoResources()
}
