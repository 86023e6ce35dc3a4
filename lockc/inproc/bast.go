package inproc

import "github.com/clustersnap/clustersnap/lockc"

// sendPendingBasts notifies every holder of each queued request its granted
// mode blocks, with the highest such mode, once per level until the holder
// is granted again. c.mu must be held.
func (r *resource) sendPendingBasts() {
	notify := func(h *lock) {
		high := -1
		for _, q := range r.converting {
			if q != h && !lockc.Compatible(h.gr, q.op.rq) {
				high = max(high, int(q.op.rq))
			}
		}
		for _, q := range r.waiting {
			if !lockc.Compatible(h.gr, q.op.rq) {
				high = max(high, int(q.op.rq))
			}
		}
		if high > h.highBast {
			h.deliverBast(lockc.Mode(high))
		}
	}
	for _, h := range r.granted {
		notify(h)
	}
	for _, h := range r.converting {
		notify(h)
	}
}

// deliverBast puts m on l's blocking channel without blocking, coalescing
// with an undelivered notification to the higher mode. c.mu must be held
// (the engine is the channel's only sender).
func (l *lock) deliverBast(m lockc.Mode) {
	l.highBast = int(m)
	select {
	case old := <-l.bast:
		m = max(m, old)
	default:
	}
	l.bast <- m
	l.m.n.stats.Basts++
}

// Blocking returns the lock's blocking-notification channel.
func (l *lock) Blocking() <-chan lockc.Mode { return l.bast }
