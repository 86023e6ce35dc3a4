package inproc

import (
	"context"
	"fmt"
	"slices"

	"github.com/clustersnap/clustersnap/lockc"
)

// lock is one lock: a lockc.Lock.
type lock struct {
	m        *member
	res      *resource
	held     bool       // gr is a granted mode
	gr       lockc.Mode // granted mode
	op       *op        // pending (or not yet acknowledged) operation; nil when idle
	lvb      lockc.LVB
	state    lockc.LVBState
	inval    bool // InvalidateLVB staged
	token    uint64
	bast     chan lockc.Mode
	highBast int  // highest mode notified since the last grant, -1 for none
	gone     bool // unlocked or lost
}

// op is a lock's pending request or conversion.
type op struct {
	rq       lockc.Mode
	flags    lockc.Flag
	isNew    bool
	done     chan struct{} // made when queued, closed when finished
	finished bool
	err      error // nil if granted
	// The lock's state before a conversion, restored if a cancelled
	// conversion's grant has to be undone.
	oldGr       lockc.Mode
	oldLVB      lockc.LVB
	oldState    lockc.LVBState
	oldInval    bool
	oldToken    uint64
	oldHighBast int
}

// finish completes o with err (nil: granted). c.mu must be held.
func (o *op) finish(err error) {
	o.finished = true
	o.err = err
	if o.done != nil {
		close(o.done)
	}
}

// allFlags is every flag the engine understands.
const allFlags = lockc.NoQueue | lockc.QueueConvert | lockc.Expedite | lockc.NoOrder

// Lock requests a new lock; see lockc.Lockspace.
func (m *member) Lock(ctx context.Context, name []byte, mode lockc.Mode, flags ...lockc.Flag) (lockc.Lock, error) {
	l, o, err := m.request(ctx, name, mode, lockc.JoinFlags(flags...))
	if err != nil {
		return nil, err
	}
	if o != nil {
		if err := l.wait(ctx, o); err != nil {
			return nil, err
		}
	}
	return l, nil
}

// request decides a new request: it returns the granted lock (op nil), or
// the queued lock and its op to wait for, or an error.
func (m *member) request(ctx context.Context, name []byte, mode lockc.Mode, f lockc.Flag) (*lock, *op, error) {
	switch {
	case len(name) == 0 || len(name) > lockc.MaxResourceName:
		return nil, nil, fmt.Errorf("lockspace %s: resource %q: name must be 1 to %d bytes: %w", m.sp.name, name, lockc.MaxResourceName, lockc.ErrBadRequest)
	case !mode.Valid():
		return nil, nil, fmt.Errorf("lockspace %s: resource %q: %v: %w", m.sp.name, name, mode, lockc.ErrBadRequest)
	case f&^allFlags != 0, f&lockc.QueueConvert != 0, f&lockc.Expedite != 0 && mode != lockc.NL:
		return nil, nil, fmt.Errorf("lockspace %s: resource %q: flags %#x for a new %v lock: %w", m.sp.name, name, uint32(f), mode, lockc.ErrBadRequest)
	}
	c := m.n.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if m.err != nil {
		return nil, nil, fmt.Errorf("resource %q: %w", name, m.err)
	}
	if err := ctx.Err(); err != nil {
		return nil, nil, fmt.Errorf("lockspace %s: resource %q: %w", m.sp.name, name, err)
	}
	m.n.stats.Requests++
	r := m.resource(name)
	l := &lock{m: m, res: r, bast: make(chan lockc.Mode, 1), highBast: -1}
	o := &op{rq: mode, flags: f, isNew: true}
	l.op = o
	if r.canGrant(l, true) {
		r.grant(l, false)
		l.op = nil
		m.locks[l] = struct{}{}
		c.notify()
		return l, nil, nil
	}
	if f&lockc.NoQueue != 0 {
		r.forgetIfEmpty()
		return nil, nil, fmt.Errorf("%v: %v: %w", r, mode, lockc.ErrWouldBlock)
	}
	m.locks[l] = struct{}{}
	o.done = make(chan struct{})
	r.waiting = append(r.waiting, l)
	r.sendPendingBasts()
	c.notify()
	return l, o, nil
}

// Convert changes the lock's mode; see lockc.Lock.
func (l *lock) Convert(ctx context.Context, mode lockc.Mode, flags ...lockc.Flag) error {
	o, err := l.startConvert(ctx, mode, lockc.JoinFlags(flags...))
	if err != nil || o == nil {
		return err
	}
	return l.wait(ctx, o)
}

// startConvert decides a conversion: it returns nil if it was granted at
// once, the queued op to wait for, or an error.
func (l *lock) startConvert(ctx context.Context, mode lockc.Mode, f lockc.Flag) (*op, error) {
	r := l.res
	if !mode.Valid() || f&^allFlags != 0 || f&lockc.Expedite != 0 {
		return nil, fmt.Errorf("%v: convert to %v with flags %#x: %w", r, mode, uint32(f), lockc.ErrBadRequest)
	}
	c := l.m.n.c
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case l.gone:
		return nil, l.notHeld()
	case l.op != nil:
		return nil, fmt.Errorf("%v: convert to %v: %w", r, mode, lockc.ErrBusy)
	case f&lockc.QueueConvert != 0 && !lockc.IsUpConversion(l.gr, mode):
		return nil, fmt.Errorf("%v: QueueConvert from %v to %v: %w", r, l.gr, mode, lockc.ErrBadRequest)
	case ctx.Err() != nil:
		return nil, fmt.Errorf("%v: convert to %v: %w", r, mode, ctx.Err())
	}
	l.m.n.stats.Converts++
	if !lockc.IsUpConversion(l.gr, mode) {
		// Down-conversions and same-mode conversions are always
		// granted, and may let others in.
		l.convertTo(mode)
		l.highBast = -1
		l.m.n.stats.Grants++
		r.runQueues()
		c.notify()
		return nil, nil
	}
	o := &op{
		rq: mode, flags: f,
		oldGr: l.gr, oldLVB: l.lvb, oldState: l.state, oldInval: l.inval, oldToken: l.token, oldHighBast: l.highBast,
	}
	l.op = o
	if r.canGrant(l, true) {
		r.grant(l, false)
		l.op = nil
		r.sendPendingBasts() // the lock is granted again: it hears of waiters anew
		c.notify()
		return nil, nil
	}
	if f&lockc.NoQueue != 0 {
		l.op = nil
		return nil, fmt.Errorf("%v: convert %v to %v: %w", r, l.gr, mode, lockc.ErrWouldBlock)
	}
	for _, x := range r.converting {
		// Queued conversions are granted in order, so one ahead of us
		// that our granted mode blocks can never be granted.
		if !lockc.Compatible(l.gr, x.op.rq) {
			l.op = nil
			return nil, fmt.Errorf("%v: convert %v to %v: %w", r, l.gr, mode, lockc.ErrDeadlock)
		}
	}
	r.granted = slices.DeleteFunc(r.granted, func(x *lock) bool { return x == l })
	o.done = make(chan struct{})
	r.converting = append(r.converting, l)
	r.sendPendingBasts()
	c.notify()
	return o, nil
}

// Unlock releases the lock, publishing the LVB from PW or EX.
// It never waits, so ctx is not consulted.
func (l *lock) Unlock(ctx context.Context) error {
	c := l.m.n.c
	c.mu.Lock()
	defer c.mu.Unlock()
	return l.unlock()
}

// unlock is Unlock with c.mu held.
func (l *lock) unlock() error {
	c := l.m.n.c
	if l.gone {
		return l.notHeld()
	}
	if l.op != nil {
		return fmt.Errorf("%v: unlock: %w", l.res, lockc.ErrBusy)
	}
	l.m.n.stats.Unlocks++
	if l.gr >= lockc.PW {
		l.publish()
	}
	l.detach()
	delete(l.m.locks, l)
	l.res.runQueues()
	l.res.forgetIfEmpty()
	c.notify()
	return nil
}

// wait blocks until o finishes or ctx ends. On ctx's end a queued request is
// removed; if the grant won the race it is undone. The caller must not hold
// c.mu.
func (l *lock) wait(ctx context.Context, o *op) error {
	c := l.m.n.c
	if ctx.Err() == nil {
		select {
		case <-o.done:
			c.mu.Lock()
			defer c.mu.Unlock()
			if l.op == o {
				l.op = nil
			}
			return o.err
		case <-ctx.Done():
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if l.op == o {
		l.op = nil
	}
	r := l.res
	cancelled := fmt.Errorf("%v: %v: %w", r, o.rq, ctx.Err())
	if o.finished {
		if o.err != nil {
			return o.err
		}
		if l.gone {
			return cancelled
		}
		if !l.undo(o) {
			// The grant stands (see undo); report it.
			return nil
		}
		l.m.n.stats.Undone++
		c.notify()
		return cancelled
	}
	// Still queued: take it off its queue; nothing was granted.
	o.finish(cancelled)
	if o.isNew {
		r.waiting = slices.DeleteFunc(r.waiting, func(x *lock) bool { return x == l })
		delete(l.m.locks, l)
		l.gone = true
	} else {
		r.converting = slices.DeleteFunc(r.converting, func(x *lock) bool { return x == l })
		r.granted = append(r.granted, l)
	}
	r.runQueues()
	r.forgetIfEmpty()
	c.notify()
	return cancelled
}

// undo reverts the grant of o after its caller gave up: a new lock is
// released without publishing; a conversion goes back to its old mode and
// LVB copy without publishing. It reports false if the old mode can no
// longer be granted (only after a PR↔CW conversion, when another lock was
// granted a mode compatible with the new mode but not the old one); then the
// conversion stands. c.mu must be held.
func (l *lock) undo(o *op) bool {
	r := l.res
	if o.isNew {
		l.detach()
		delete(l.m.locks, l)
	} else {
		if lockc.IsUpConversion(l.gr, o.oldGr) && !r.compatibleWithHolders(l, o.oldGr) {
			return false
		}
		l.gr = o.oldGr
		l.lvb, l.state, l.inval = o.oldLVB, o.oldState, o.oldInval
		l.token = o.oldToken
		l.highBast = o.oldHighBast
	}
	r.runQueues()
	r.forgetIfEmpty()
	return true
}

// detach takes l off its resource's queues and marks it gone. c.mu must be
// held.
func (l *lock) detach() {
	r := l.res
	is := func(x *lock) bool { return x == l }
	r.granted = slices.DeleteFunc(r.granted, is)
	r.converting = slices.DeleteFunc(r.converting, is)
	r.waiting = slices.DeleteFunc(r.waiting, is)
	l.held = false
	l.gone = true
	select {
	case <-l.bast:
	default:
	}
}

// notHeld returns the error for an operation on a gone lock. c.mu must be
// held.
func (l *lock) notHeld() error {
	if l.m.err != nil {
		return fmt.Errorf("%v: %w: %w", l.res, lockc.ErrUnlocked, l.m.err)
	}
	return fmt.Errorf("%v: %w", l.res, lockc.ErrUnlocked)
}

// Mode returns the granted mode.
func (l *lock) Mode() lockc.Mode {
	l.m.n.c.mu.Lock()
	defer l.m.n.c.mu.Unlock()
	return l.gr
}

// The in-process engine numbers every grant of its Cluster, so its locks
// carry fencing tokens.
var _ lockc.Tokener = (*lock)(nil)

// Token returns the fencing token of the lock's last grant or
// up-conversion.
func (l *lock) Token() uint64 {
	l.m.n.c.mu.Lock()
	defer l.m.n.c.mu.Unlock()
	return l.token
}
