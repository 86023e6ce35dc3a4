package locktest

import (
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/stretchr/testify/assert"
)

// testLVBDirection: the LVB is read on new grants and up-conversions and
// written only when leaving PW or EX (or converting PW→PW, EX→EX), never by
// lower modes.
func testLVBDirection(e *env) {
	a, b := e.open(1), e.open(2)
	watch := e.lock(b, "r", lockc.NL) // keeps the resource remembered

	w := e.lock(a, "r", lockc.EX)
	w.SetLVB(counter(1))
	e.convert(w, lockc.EX) // EX→EX publishes
	fresh := e.lock(b, "r", lockc.NL)
	v, st := fresh.LVB()
	assert.Equal(e.t, lockc.LVBValid, st, "a new NL lock reads the LVB")
	assert.Equal(e.t, counter(1), v, "EX→EX published")

	w.SetLVB(counter(2)) // staged only
	stale := e.lock(b, "r", lockc.NL)
	v, _ = stale.LVB()
	assert.Equal(e.t, counter(1), v, "SetLVB alone publishes nothing")
	e.unlock(stale)

	e.convert(w, lockc.PW) // EX→PW publishes 2
	v, _ = fresh.LVB()
	assert.Equal(e.t, counter(1), v, "a held lock's copy changes only when it reads")
	e.assertLVB(fresh, 2, lockc.LVBValid, "EX→PW published")

	// PW→PW publishes; a CR lock can read alongside PW.
	w.SetLVB(counter(3))
	e.convert(w, lockc.PW)
	cr := e.lock(b, "r", lockc.CR)
	v, st = cr.LVB()
	assert.Equal(e.t, lockc.LVBValid, st)
	assert.Equal(e.t, counter(3), v, "PW→PW published")
	e.unlock(cr)

	// PW→EX is an up-conversion: it reads, dropping the staged value.
	w.SetLVB(counter(4))
	e.convert(w, lockc.EX)
	v, _ = w.LVB()
	assert.Equal(e.t, counter(3), v, "PW→EX reads the resource's value")
	e.unlock(w) // EX unlock publishes its copy, 3
	e.assertLVB(fresh, 3, lockc.LVBValid, "after PW→EX and unlock")

	// Lower modes never write, whatever they stage.
	for _, m := range []lockc.Mode{lockc.CR, lockc.CW, lockc.PR} {
		l := e.lock(a, "r", m)
		v, st := l.LVB()
		assert.Equal(e.t, counter(3), v, "new %v reads", m)
		assert.Equal(e.t, lockc.LVBValid, st)
		l.SetLVB(counter(99))
		e.convert(l, lockc.NL)
		e.assertLVB(fresh, 3, lockc.LVBValid, m.String()+"→NL writes nothing")
		e.convert(l, m) // up-conversion from NL reads
		v, _ = l.LVB()
		assert.Equal(e.t, counter(3), v, "NL→%v reads", m)
		l.SetLVB(counter(99))
		l.InvalidateLVB()
		e.unlock(l)
		e.assertLVB(fresh, 3, lockc.LVBValid, m.String()+" unlock writes nothing")
	}

	// PW unlock publishes.
	pw := e.lock(a, "r", lockc.PW)
	pw.SetLVB(counter(5))
	e.unlock(pw)
	e.assertLVB(fresh, 5, lockc.LVBValid, "PW unlock")
	e.unlock(fresh)
	e.unlock(watch)
	e.assertNoResources()
}

// testFreshUnknown: a resource never written, or forgotten after every lock
// on it was released, reads as zeros in state Unknown.
func testFreshUnknown(e *env) {
	a, b := e.open(1), e.open(2)
	l := e.lock(a, "r", lockc.EX)
	v, st := l.LVB()
	assert.Equal(e.t, lockc.LVBUnknown, st)
	assert.Equal(e.t, lockc.LVB{}, v)
	l.SetLVB(counter(7))
	e.unlock(l)
	e.assertNoResources()

	// Published, but nobody held the resource since: forgotten.
	r := e.lock(b, "r", lockc.PR)
	v, st = r.LVB()
	assert.Equal(e.t, lockc.LVBUnknown, st, "the resource was released everywhere")
	assert.Equal(e.t, lockc.LVB{}, v)
	e.unlock(r)

	// An NL lock keeps the resource, and its LVB, alive.
	keep := e.lock(b, "r", lockc.NL)
	l = e.lock(a, "r", lockc.EX)
	l.SetLVB(counter(8))
	e.unlock(l)
	e.assertLVB(keep, 8, lockc.LVBValid, "kept by NL")
	e.unlock(keep)
	e.assertNoResources()
}

// testInvalidateLVB: InvalidateLVB makes the next write from PW or EX mark
// the LVB invalid, until the next publish; from lower modes it does nothing.
func testInvalidateLVB(e *env) {
	a, b := e.open(1), e.open(2)
	keep := e.lock(b, "r", lockc.NL)
	w := e.lock(a, "r", lockc.EX)
	w.SetLVB(counter(1))
	e.convert(w, lockc.NL)
	e.assertLVB(keep, 1, lockc.LVBValid, "published")

	pr := e.lock(a, "r", lockc.PR)
	pr.InvalidateLVB()
	e.unlock(pr)
	e.assertLVB(keep, 1, lockc.LVBValid, "PR cannot invalidate")

	e.convert(w, lockc.EX)
	w.InvalidateLVB()
	_, st := w.LVB()
	assert.Equal(e.t, lockc.LVBInvalid, st, "the staged invalidation shows in the lock")
	e.convert(w, lockc.NL)
	e.assertLVB(keep, 0, lockc.LVBInvalid, "EX→NL with InvalidateLVB")

	// Readers and non-publishing holders keep it invalid.
	cr := e.lock(a, "r", lockc.CR)
	_, st = cr.LVB()
	assert.Equal(e.t, lockc.LVBInvalid, st)
	e.unlock(cr)
	e.convert(w, lockc.PR)
	e.convert(w, lockc.NL)
	e.assertLVB(keep, 0, lockc.LVBInvalid, "still invalid after PR")

	// The next publish makes it valid again.
	e.convert(w, lockc.PW)
	_, st = w.LVB()
	assert.Equal(e.t, lockc.LVBInvalid, st, "PW reads the invalid state")
	w.SetLVB(counter(2))
	e.convert(w, lockc.NL)
	e.assertLVB(keep, 2, lockc.LVBValid, "PW publish clears the invalid state")
	e.unlock(w)
	e.unlock(keep)
	e.assertNoResources()
}

// testTokens: tokens increase with every grant and up-conversion on a
// resource, across nodes.
func testTokens(e *env) {
	a, b := e.open(1), e.open(2)
	var last uint64
	next := func(l lockc.Lock, what string) {
		e.t.Helper()
		t, ok := l.(lockc.Tokener)
		if !ok {
			e.t.Skip("the engine offers no fencing tokens (lockc.Tokener)")
		}
		tok := t.Token()
		assert.Greater(e.t, tok, last, "token after %s", what)
		last = tok
	}
	x := e.lock(a, "r", lockc.NL)
	next(x, "new NL on node 1")
	y := e.lock(b, "r", lockc.PR)
	next(y, "new PR on node 2")
	e.convert(x, lockc.CR)
	next(x, "NL→CR on node 1")
	e.unlock(y)
	e.convert(x, lockc.EX)
	next(x, "CR→EX on node 1")
	e.convert(x, lockc.NL)
	z := e.lock(b, "r", lockc.EX)
	next(z, "new EX on node 2")
	e.unlock(z)
	e.convert(x, lockc.PW)
	next(x, "NL→PW on node 1")
	e.unlock(x)
	e.assertNoResources()
}
