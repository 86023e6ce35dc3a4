package inproc

import (
	"fmt"
	"slices"

	"github.com/clustersnap/clustersnap/lockc"
)

// resource is a lockable name with its queues and LVB.
type resource struct {
	sp         *space
	name       string
	granted    []*lock // locks with a granted mode and no pending conversion
	converting []*lock // convert queue, in arrival order; each still holds its granted mode
	waiting    []*lock // wait queue of new requests, in arrival order
	lvb        lockc.LVB
	state      lockc.LVBState
}

func (r *resource) String() string {
	return fmt.Sprintf("lockspace %s: resource %q", r.sp.name, r.name)
}

// resource returns the named resource, creating it. c.mu must be held.
func (m *member) resource(name []byte) *resource {
	r := m.sp.resources[string(name)]
	if r == nil {
		r = &resource{sp: m.sp, name: string(name)}
		m.sp.resources[r.name] = r
	}
	return r
}

// compatibleWithHolders reports whether mode rq is compatible with every
// other lock's granted mode, on the granted and convert queues.
func (r *resource) compatibleWithHolders(l *lock, rq lockc.Mode) bool {
	for _, g := range r.granted {
		if g != l && !lockc.Compatible(g.gr, rq) {
			return false
		}
	}
	for _, g := range r.converting {
		if g != l && !lockc.Compatible(g.gr, rq) {
			return false
		}
	}
	return true
}

// canGrant is the DLM's _can_be_granted for l's pending operation: now is
// true for a fresh request or conversion, false when re-running the queues.
func (r *resource) canGrant(l *lock, now bool) bool {
	o := l.op
	conv := !o.isNew
	if o.flags&lockc.Expedite != 0 {
		return true
	}
	if !r.compatibleWithHolders(l, o.rq) {
		return false
	}
	switch {
	case now && conv && o.flags&lockc.QueueConvert == 0:
		return true
	case o.flags&lockc.NoOrder != 0:
		return true
	case !now && conv:
		return r.converting[0] == l
	case now && conv:
		return len(r.converting) == 0
	case now:
		return len(r.converting) == 0 && len(r.waiting) == 0
	default:
		return len(r.converting) == 0 && r.waiting[0] == l
	}
}

// grant grants l's pending operation and finishes it: l moves from its
// queue to the granted queue (a conversion granted at once is already
// there). c.mu must be held.
func (r *resource) grant(l *lock, queued bool) {
	o := l.op
	is := func(x *lock) bool { return x == l }
	if o.isNew {
		l.held = true
		l.gr = o.rq
		l.read()
		l.token = l.m.n.c.nextToken()
	} else {
		l.convertTo(o.rq)
	}
	switch {
	case queued && o.isNew:
		r.waiting = slices.DeleteFunc(r.waiting, is)
		r.granted = append(r.granted, l)
	case queued:
		r.converting = slices.DeleteFunc(r.converting, is)
		r.granted = append(r.granted, l)
	case o.isNew:
		r.granted = append(r.granted, l)
	}
	l.highBast = -1
	l.m.n.stats.Grants++
	if !o.finished {
		o.finish(nil)
	}
}

// runQueues grants what has become grantable, conversions first and each
// queue in order, then sends blocking notifications for what still waits.
// c.mu must be held.
func (r *resource) runQueues() {
	for progress := true; progress; {
		progress = false
		for _, l := range r.converting {
			if r.canGrant(l, false) {
				r.grant(l, true)
				progress = true
				break
			}
		}
		if progress {
			continue
		}
		for _, l := range r.waiting {
			if r.canGrant(l, false) {
				r.grant(l, true)
				progress = true
				break
			}
		}
	}
	r.sendPendingBasts()
}

// forgetIfEmpty drops r when no lock is on it, so the next lock finds a
// fresh resource with an unknown LVB. c.mu must be held.
func (r *resource) forgetIfEmpty() {
	if len(r.granted)+len(r.converting)+len(r.waiting) > 0 {
		return
	}
	if r.sp.resources[r.name] == r {
		delete(r.sp.resources, r.name)
	}
}
