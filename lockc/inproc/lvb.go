package inproc

import "github.com/clustersnap/clustersnap/lockc"

// convertTo changes l's granted mode to rq, moving the LVB as the DLM does.
// c.mu must be held.
func (l *lock) convertTo(rq lockc.Mode) {
	switch lockc.LVBMoveOf(l.gr, rq) {
	case lockc.LVBRead:
		l.read()
	case lockc.LVBWrite:
		l.publish()
	}
	if lockc.IsUpConversion(l.gr, rq) {
		l.token = l.m.n.c.nextToken()
	}
	l.gr = rq
}

// publish writes l's staged LVB to the resource (or invalidates it). c.mu
// must be held and l must hold PW or EX.
func (l *lock) publish() {
	r := l.res
	if l.inval {
		r.state = lockc.LVBInvalid
		l.state = lockc.LVBInvalid
		l.inval = false
		return
	}
	r.lvb = l.lvb
	r.state = lockc.LVBValid
}

// read copies the resource's LVB into l. c.mu must be held.
func (l *lock) read() {
	l.lvb, l.state, l.inval = l.res.lvb, l.res.state, false
}

// LVB returns the lock's LVB copy and its state; after InvalidateLVB the
// state is LVBInvalid, after SetLVB it is LVBValid.
func (l *lock) LVB() (lockc.LVB, lockc.LVBState) {
	l.m.n.c.mu.Lock()
	defer l.m.n.c.mu.Unlock()
	if l.inval {
		return l.lvb, lockc.LVBInvalid
	}
	return l.lvb, l.state
}

// SetLVB stages v; see lockc.Lock.
func (l *lock) SetLVB(v lockc.LVB) {
	l.m.n.c.mu.Lock()
	defer l.m.n.c.mu.Unlock()
	l.lvb, l.state, l.inval = v, lockc.LVBValid, false
}

// InvalidateLVB stages an invalidation; see lockc.Lock.
func (l *lock) InvalidateLVB() {
	l.m.n.c.mu.Lock()
	defer l.m.n.c.mu.Unlock()
	l.inval = true
}
