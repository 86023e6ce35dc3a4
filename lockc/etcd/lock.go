package etcd

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/clustersnap/clustersnap/lockc"
)

// attemptTimeout bounds one request to etcd: past it the request's outcome
// is unknown and the operation reads its lock's entry to find out.
const attemptTimeout = 5 * time.Second

// lock is one lock: a lockc.Lock. Fields below mu are guarded by ls.mu.
type lock struct {
	ls   *lockspace
	res  []byte
	keys resourceKeys
	name string // the entry's name: lease and counter
	key  string
	bast chan lockc.Mode

	held     bool
	gr       lockc.Mode
	busy     bool // an operation runs
	gone     bool // unlocked, cancelled or lost
	lvb      lockc.LVB
	state    lockc.LVBState
	inval    bool
	token    uint64
	mod      int64  // the entry's ModRevision as this node last wrote it
	seq      uint64 // the last sequence number written to the entry
	stateRev int64  // revision of the last grant or down-conversion
	// unexpected is the revision of the latest change of the key the
	// watch saw while an operation ran, past mod; idle and forget look
	// at it once the operation is done.
	unexpected int64
	highBast   int // highest mode notified since then, -1 for none
}

// allFlags is every flag the engine understands.
const allFlags = lockc.NoQueue | lockc.QueueConvert | lockc.Expedite | lockc.NoOrder

func (l *lock) String() string {
	return fmt.Sprintf("lockspace %s: resource %q", l.ls.name, l.res)
}

// Lock requests a new lock; see lockc.Lockspace.
func (ls *lockspace) Lock(ctx context.Context, res []byte, mode lockc.Mode, flags ...lockc.Flag) (lockc.Lock, error) {
	f := lockc.JoinFlags(flags...)
	switch {
	case len(res) == 0 || len(res) > lockc.MaxResourceName:
		return nil, fmt.Errorf("lockspace %s: resource %q: name must be 1 to %d bytes: %w", ls.name, res, lockc.MaxResourceName, lockc.ErrBadRequest)
	case !mode.Valid():
		return nil, fmt.Errorf("lockspace %s: resource %q: %v: %w", ls.name, res, mode, lockc.ErrBadRequest)
	case f&^allFlags != 0, f&lockc.QueueConvert != 0, f&lockc.Expedite != 0 && mode != lockc.NL:
		return nil, fmt.Errorf("lockspace %s: resource %q: flags %#x for a new %v lock: %w", ls.name, res, uint32(f), mode, lockc.ErrBadRequest)
	}
	if err := ls.lostErr(res); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("lockspace %s: resource %q: %w", ls.name, res, err)
	}
	l := &lock{
		ls: ls, res: append([]byte(nil), res...), keys: ls.keys.keysOf(res),
		name: fmt.Sprintf("%016x-%d", int64(ls.lease), ls.nextLock.Add(1)),
		bast: make(chan lockc.Mode, 1), highBast: -1, busy: true,
	}
	l.key = l.keys.lock(l.name)
	ls.mu.Lock()
	if ls.err != nil {
		ls.mu.Unlock()
		return nil, fmt.Errorf("resource %q: %w", res, ls.err)
	}
	set := ls.locks[l.keys.hex]
	if set == nil {
		set = map[*lock]struct{}{}
		ls.locks[l.keys.hex] = set
	}
	set[l] = struct{}{}
	ls.mu.Unlock()
	err := l.acquire(ctx, request{name: l.name, rq: mode, flags: f, isNew: true})
	if err != nil {
		ls.forget(l)
		return nil, err
	}
	l.idle()
	return l, nil
}

// forget drops l from the lockspace's locks. ls.mu must not be held.
func (ls *lockspace) forget(l *lock) {
	if st := ls.forgetLocked(l); st != nil {
		ls.reap(st)
	}
}

// forgetLocked is forget under ls.mu; it returns a change of the lock's
// key the watch saw during its last operation that the operation did not
// make, for reap.
func (ls *lockspace) forgetLocked(l *lock) *stray {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	l.gone, l.held = true, false
	if l.mod > ls.processed {
		ls.goneAt[l.name] = l.mod
	}
	var st *stray
	if l.unexpected > l.mod {
		st = &stray{key: l.key, writer: l.keys.writer(l.name), rev: l.unexpected}
	}
	select { // a notification not yet received goes with the lock
	case <-l.bast:
	default:
	}
	set := ls.locks[l.keys.hex]
	delete(set, l)
	if len(set) == 0 {
		delete(ls.locks, l.keys.hex)
		delete(ls.eventRev, l.keys.hex)
		if ch, ok := ls.changed[l.keys.hex]; ok {
			close(ch)
			delete(ls.changed, l.keys.hex)
		}
	}
	return st
}

// idle ends l's operation. A change of the lock's key that the watch saw
// meanwhile, later than the operation's own last change, is a late commit
// of one of its rounds: the key is put back to what the lock holds.
func (l *lock) idle() {
	ls := l.ls
	ls.mu.Lock()
	l.busy = false
	var st *stray
	if l.unexpected > l.mod && !l.gone {
		l.seq++
		st = &stray{
			key: l.key, rev: l.unexpected, lock: l, writer: l.keys.writer(l.name),
			want:       entry{held: true, granted: l.gr, rq: l.gr, node: ls.node, seq: l.seq},
			dropWriter: l.gr < lockc.PW,
		}
	}
	ls.mu.Unlock()
	if st != nil {
		ls.reap(st)
	}
}

// opContext is ctx that also ends with the membership.
func (ls *lockspace) opContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(ls.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}

// view reads the resource's keys.
func (l *lock) view(ctx context.Context) (*view, error) {
	ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	r, err := l.ls.c.Get(ctx, l.keys.prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	return newView(l.ls.keys, r.Kvs, r.Header.Revision)
}

// failed returns what ends an operation that could not reach etcd: the
// membership's end if it ended, or nil to try again.
func (l *lock) failed() error {
	return l.ls.lostErr(l.res)
}

// acquire runs a new request or an up-conversion (or a same-mode
// conversion that reads the LVB) until it is granted, refused, or given up.
// The lock's entry in etcd is the truth about where the request stands:
// every round reads the resource, finds the entry, and decides on that
// view, so a change whose answer was lost is seen for what it did.
func (l *lock) acquire(ctx context.Context, r request) error {
	ls := l.ls
	opCtx, cancel := ls.opContext(ctx)
	defer cancel()
	ls.mu.Lock()
	gr0, held0, seq0 := l.gr, l.held, l.seq
	ls.mu.Unlock()
	for {
		if err := l.failed(); err != nil {
			return err
		}
		if ctx.Err() != nil {
			return l.giveUp(ctx, r, gr0)
		}
		v, err := l.view(opCtx)
		if err != nil {
			ls.pauseFor(ctx)
			continue
		}
		me := v.find(l.name)
		switch {
		case me == nil && held0:
			return l.vanished()
		case me == nil:
			r.queued = false
		case me.e.held && me.e.granted == r.rq && me.e.rq == r.rq && me.e.seq > seq0:
			// An earlier round's grant committed though its answer
			// was lost.
			return l.finishGrant(opCtx, v, me.mod, r)
		default:
			r.queued = me.e.queued()
		}
		if v.canGrant(r) {
			rev, ok, err := l.commitGrant(opCtx, v, r, gr0)
			if err != nil {
				ls.pauseFor(ctx)
			}
			if err != nil || !ok {
				continue
			}
			return l.finishGrant(opCtx, v, rev, r)
		}
		if !r.queued {
			if r.flags&lockc.NoQueue != 0 {
				return fmt.Errorf("%v: %v: %w", l, r.rq, lockc.ErrWouldBlock)
			}
			if !r.isNew && v.deadlocks(l.name, gr0) {
				return fmt.Errorf("%v: convert %v to %v: %w", l, gr0, r.rq, lockc.ErrDeadlock)
			}
			_, ok, err := l.commitQueue(opCtx, v, r, gr0)
			if err != nil {
				ls.pauseFor(ctx)
			}
			if err != nil || !ok {
				continue
			}
			// Wait for changes since the view, not since the
			// queueing: a lock that went between the two (a
			// deletion does not stop the commit) must wake us.
			r.queued = true
		}
		select {
		case <-ls.changedSince(l.keys.hex, v.rev):
		case <-ctx.Done():
		case <-ls.lost:
		}
	}
}

// commitGrant grants r if the resource has not changed since v: the entry
// takes the mode, a writer marker is set for PW and EX, and dead writers'
// markers go and make the LVB invalid. It returns the grant's revision.
func (l *lock) commitGrant(ctx context.Context, v *view, r request, gr0 lockc.Mode) (int64, bool, error) {
	seq := l.nextSeq()
	ops := []clientv3.Op{clientv3.OpPut(l.key, entry{held: true, granted: r.rq, rq: r.rq, node: l.ls.node, seq: seq}.encode(), clientv3.WithLease(l.ls.lease))}
	if r.rq >= lockc.PW && (r.isNew || gr0 < lockc.PW) {
		ops = append(ops, clientv3.OpPut(l.keys.writer(l.name), ""))
	}
	if dead := v.deadWriters(); len(dead) > 0 {
		for _, w := range dead {
			ops = append(ops, clientv3.OpDelete(l.keys.writer(w)))
		}
		ops = append(ops, clientv3.OpPut(l.keys.lvb(), encodeLVB(v.lvb, lockc.LVBInvalid)))
	}
	return l.commitOnView(ctx, v, ops)
}

// commitQueue queues r if the resource has not changed since v.
func (l *lock) commitQueue(ctx context.Context, v *view, r request, gr0 lockc.Mode) (int64, bool, error) {
	e := entry{rq: r.rq, flags: r.flags, node: l.ls.node, seq: l.nextSeq()}
	if !r.isNew {
		e.held, e.granted = true, gr0
	}
	return l.commitOnView(ctx, v, []clientv3.Op{clientv3.OpPut(l.key, e.encode(), clientv3.WithLease(l.ls.lease))})
}

// commitOnView commits ops if no key of the resource changed since v.
func (l *lock) commitOnView(ctx context.Context, v *view, ops []clientv3.Op) (int64, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	t, err := l.ls.c.Txn(ctx).
		If(clientv3.Compare(clientv3.ModRevision(l.keys.prefix), "<", v.rev+1).WithPrefix()).
		Then(ops...).
		Commit()
	if err != nil {
		return 0, false, err
	}
	return t.Header.Revision, t.Succeeded, nil
}

// nextSeq returns a sequence number no earlier change of the lock used.
func (l *lock) nextSeq() uint64 {
	l.ls.mu.Lock()
	defer l.ls.mu.Unlock()
	l.seq++
	return l.seq
}

// finishGrant records the grant of r at revision rev. v is the view the
// grant was decided on; if the resource may have changed between v and the
// grant (a grant found committed after its answer was lost), the LVB is
// read again as of rev.
func (l *lock) finishGrant(ctx context.Context, v *view, rev int64, r request) error {
	ls := l.ls
	lvb, st := v.lvb, v.lvbState
	if len(v.deadWriters()) > 0 {
		st = lockc.LVBInvalid
	}
	if v.rev >= rev {
		if at, err := l.viewAt(ctx, rev); err == nil {
			lvb, st = at.lvb, at.lvbState
		} else {
			st = lockc.LVBInvalid
		}
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	gr0 := l.gr
	if r.isNew || lockc.LVBMoveOf(gr0, r.rq) == lockc.LVBRead {
		l.lvb, l.state, l.inval = lvb, st, false
	}
	if r.isNew || lockc.IsUpConversion(gr0, r.rq) {
		l.token = uint64(rev)
	}
	l.held, l.gr, l.mod = true, r.rq, rev
	l.stateRev, l.highBast = rev, -1
	if high := v.blockedBy(l.name, l.gr); high >= 0 {
		l.deliverBast(lockc.Mode(high))
	}
	return nil
}

// viewAt reads the resource as of revision rev.
func (l *lock) viewAt(ctx context.Context, rev int64) (*view, error) {
	ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	defer cancel()
	r, err := l.ls.c.Get(ctx, l.keys.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev))
	if err != nil {
		return nil, err
	}
	return newView(l.ls.keys, r.Kvs, rev)
}

// vanished ends the membership: the lock's entry is gone, so its lease
// expired and other nodes may hold what this node thought it held.
func (l *lock) vanished() error {
	l.ls.end(fmt.Errorf("lockspace %s: node %d: the entry of a lock on %q vanished (its lease expired): %w", l.ls.name, l.ls.node, l.res, lockc.ErrLost))
	return l.failed()
}

// giveUp takes back a request whose caller's context ended, and returns
// the context's error. Whatever the entry in etcd says is undone without
// publishing: a new lock's entry is deleted, a conversion goes back to its
// old mode. A conversion that was granted and cannot go back (PR and CW
// are incompatible with different modes) stands, and giveUp reports it
// granted.
func (l *lock) giveUp(ctx context.Context, r request, gr0 lockc.Mode) error {
	ls := l.ls
	cancelled := fmt.Errorf("%v: %v: %w", l, r.rq, ctx.Err())
	for {
		if err := l.failed(); err != nil {
			return err
		}
		actx, cancel := context.WithTimeout(ls.ctx, attemptTimeout)
		var t *clientv3.TxnResponse
		var err error
		if r.isNew {
			t, err = ls.c.Txn(actx).Then(clientv3.OpDelete(l.key), clientv3.OpDelete(l.keys.writer(l.name))).Commit()
			cancel()
			if err == nil {
				ls.mu.Lock()
				l.mod = t.Header.Revision
				ls.mu.Unlock()
				return cancelled
			}
			ls.pauseFor(ls.ctx)
			continue
		}
		var g *clientv3.GetResponse
		g, err = ls.c.Get(actx, l.key)
		if err != nil {
			cancel()
			ls.pauseFor(ls.ctx)
			continue
		}
		if len(g.Kvs) == 0 {
			cancel()
			return l.vanished()
		}
		kv := g.Kvs[0]
		e, derr := decodeEntry(kv.Value)
		if derr == nil && e.held && e.granted == r.rq && lockc.IsUpConversion(r.rq, gr0) {
			cancel()
			v, verr := l.viewAt(ls.ctx, kv.ModRevision)
			if verr != nil {
				continue
			}
			return l.finishGrant(ls.ctx, v, kv.ModRevision, r)
		}
		ops := []clientv3.Op{clientv3.OpPut(l.key, entry{held: true, granted: gr0, rq: gr0, node: ls.node, seq: l.nextSeq()}.encode(), clientv3.WithLease(ls.lease))}
		if derr == nil && e.held && e.granted >= lockc.PW && gr0 < lockc.PW {
			ops = append(ops, clientv3.OpDelete(l.keys.writer(l.name)))
		}
		t, err = ls.c.Txn(actx).If(clientv3.Compare(clientv3.ModRevision(l.key), "=", kv.ModRevision)).Then(ops...).Commit()
		cancel()
		if err == nil && t.Succeeded {
			ls.mu.Lock()
			l.mod = t.Header.Revision
			ls.mu.Unlock()
			return cancelled
		}
		if err != nil {
			ls.pauseFor(ls.ctx)
		}
	}
}

// Convert changes the lock's mode; see lockc.Lock.
func (l *lock) Convert(ctx context.Context, mode lockc.Mode, flags ...lockc.Flag) error {
	f := lockc.JoinFlags(flags...)
	if !mode.Valid() || f&^allFlags != 0 || f&lockc.Expedite != 0 {
		return fmt.Errorf("%v: convert to %v with flags %#x: %w", l, mode, uint32(f), lockc.ErrBadRequest)
	}
	gr0, err := l.begin("convert to "+mode.String(), func(gr lockc.Mode) error {
		switch {
		case f&lockc.QueueConvert != 0 && !lockc.IsUpConversion(gr, mode):
			return fmt.Errorf("%v: QueueConvert from %v to %v: %w", l, gr, mode, lockc.ErrBadRequest)
		case ctx.Err() != nil:
			return fmt.Errorf("%v: convert to %v: %w", l, mode, ctx.Err())
		}
		return nil
	})
	if err != nil {
		return err
	}
	defer l.idle()
	if lockc.IsUpConversion(gr0, mode) || lockc.LVBMoveOf(gr0, mode) == lockc.LVBRead {
		return l.acquire(ctx, request{name: l.name, rq: mode, flags: f})
	}
	return l.release(mode)
}

// Unlock releases the lock, publishing the LVB from PW or EX. It waits for
// no other lock, only for etcd's answer, so ctx is not consulted.
func (l *lock) Unlock(ctx context.Context) error {
	if _, err := l.begin("unlock", nil); err != nil {
		return err
	}
	defer l.idle()
	return l.release(unlockMode)
}

// begin starts an operation (what) on l and returns the mode l holds: it
// fails on a gone lock, with ErrBusy while another operation runs, or with
// what check, if not nil, says of the mode. The caller ends it with idle.
func (l *lock) begin(what string, check func(gr lockc.Mode) error) (lockc.Mode, error) {
	ls := l.ls
	ls.mu.Lock()
	gone, busy, gr := l.gone, l.busy, l.gr
	var err error
	if !gone && !busy && check != nil {
		err = check(gr)
	}
	if !gone && !busy && err == nil {
		l.busy = true
	}
	ls.mu.Unlock()
	switch {
	case gone:
		return gr, l.notHeld()
	case busy:
		return gr, fmt.Errorf("%v: %s: %w", l, what, lockc.ErrBusy)
	}
	return gr, err
}

// unlockMode asks release to unlock.
const unlockMode = lockc.Mode(255)

// release converts the lock down to mode, or unlocks it if mode is -1:
// one transaction writes the entry (or deletes it), publishes the LVB from
// PW or EX and drops the writer marker below PW. An unlock that leaves no
// lock on the resource forgets the resource: its keys go and the next lock
// finds its LVB Unknown.
func (l *lock) release(mode lockc.Mode) error {
	ls := l.ls
	ls.mu.Lock()
	if l.gone {
		ls.mu.Unlock()
		return l.notHeld()
	}
	gr0, mod := l.gr, l.mod
	publish := gr0 >= lockc.PW && (mode == unlockMode || lockc.LVBMoveOf(gr0, mode) == lockc.LVBWrite)
	lvb, st := l.lvb, lockc.LVBValid
	if l.inval {
		st = lockc.LVBInvalid
	}
	ls.mu.Unlock()
	unlock := mode == unlockMode
	var ops []clientv3.Op
	seq := l.nextSeq()
	if unlock {
		ops = append(ops, clientv3.OpDelete(l.key))
	} else {
		ops = append(ops, clientv3.OpPut(l.key, entry{held: true, granted: mode, rq: mode, node: ls.node, seq: seq}.encode(), clientv3.WithLease(ls.lease)))
	}
	if publish {
		ops = append(ops, clientv3.OpPut(l.keys.lvb(), encodeLVB(lvb, st)))
	}
	if gr0 >= lockc.PW && (unlock || mode < lockc.PW) {
		ops = append(ops, clientv3.OpDelete(l.keys.writer(l.name)))
	}
	if !unlock {
		ops = append(ops, clientv3.OpGet(l.keys.prefix, clientv3.WithPrefix()))
	}
	mine := clientv3.Compare(clientv3.ModRevision(l.key), "=", mod)
	for {
		if err := l.failed(); err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(ls.ctx, attemptTimeout)
		var t *clientv3.TxnResponse
		var err error
		if unlock {
			qEnd := clientv3.GetPrefixRangeEnd(l.keys.queue())
			t, err = ls.c.Txn(ctx).
				If(mine,
					clientv3.Compare(clientv3.CreateRevision(l.keys.queue()), "=", 0).WithRange(l.key),
					clientv3.Compare(clientv3.CreateRevision(l.key+"\x00"), "=", 0).WithRange(qEnd)).
				Then(clientv3.OpDelete(l.keys.prefix, clientv3.WithPrefix())).
				Else(clientv3.OpTxn([]clientv3.Cmp{mine}, ops, nil)).
				Commit()
		} else {
			t, err = ls.c.Txn(ctx).If(mine).Then(ops...).Commit()
		}
		cancel()
		if err != nil {
			// The outcome is unknown: the entry tells.
			done, rev, gerr := l.committed(unlock, seq)
			if gerr != nil {
				return gerr
			}
			if !done {
				ls.pauseFor(ls.ctx)
				continue
			}
			l.released(mode, rev, publish, nil)
			l.rescan()
			return nil
		}
		ok := t.Succeeded
		var got []*clientv3.GetResponse
		if unlock && !ok {
			ok = t.Responses[0].GetResponseTxn().Succeeded
		}
		if !ok {
			// The entry changed under us (a late change of an
			// earlier operation) or vanished.
			done, _, gerr := l.committed(unlock, seq)
			if gerr != nil {
				return gerr
			}
			if !done {
				ls.mu.Lock()
				mine = clientv3.Compare(clientv3.ModRevision(l.key), "=", l.mod)
				ls.mu.Unlock()
			}
			continue
		}
		if !unlock {
			got = append(got, (*clientv3.GetResponse)(t.Responses[len(t.Responses)-1].GetResponseRange()))
		}
		l.released(mode, t.Header.Revision, publish, got)
		return nil
	}
}

// committed reads the lock's entry after a change whose answer was lost or
// refused: done says the change with sequence number seq is in etcd (for
// an unlock: the entry is gone). A vanished entry of a held lock ends the
// membership. Otherwise it records the entry's current revision.
func (l *lock) committed(unlock bool, seq uint64) (done bool, rev int64, err error) {
	ls := l.ls
	for {
		if err := l.failed(); err != nil {
			return false, 0, err
		}
		ctx, cancel := context.WithTimeout(ls.ctx, attemptTimeout)
		g, gerr := ls.c.Get(ctx, l.key)
		cancel()
		if gerr != nil {
			ls.pauseFor(ls.ctx)
			continue
		}
		if len(g.Kvs) == 0 {
			if unlock {
				return true, g.Header.Revision, nil
			}
			return false, 0, l.vanished()
		}
		kv := g.Kvs[0]
		if e, derr := decodeEntry(kv.Value); derr == nil && e.seq == seq && !unlock {
			return true, kv.ModRevision, nil
		}
		ls.mu.Lock()
		l.mod = kv.ModRevision
		ls.mu.Unlock()
		return false, 0, nil
	}
}

// released records a committed down-conversion to mode (or unlock, mode
// -1) at revision rev, and notifies the lock of requests its new mode
// still blocks, as read in the same transaction.
func (l *lock) released(mode lockc.Mode, rev int64, published bool, got []*clientv3.GetResponse) {
	ls := l.ls
	if mode == unlockMode {
		ls.mu.Lock()
		l.mod = rev
		ls.mu.Unlock()
		ls.forget(l)
		return
	}
	var v *view
	if len(got) == 1 {
		v, _ = newView(ls.keys, got[0].Kvs, rev)
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if published && l.inval {
		l.state, l.inval = lockc.LVBInvalid, false
	}
	l.gr, l.mod, l.stateRev, l.highBast = mode, rev, rev, -1
	if v != nil {
		if high := v.blockedBy(l.name, mode); high >= 0 {
			l.deliverBast(lockc.Mode(high))
		}
	}
}

// rescan reads the lock's resource and notifies the lock of the requests
// its mode blocks, when events may have been missed.
func (l *lock) rescan() {
	v, err := l.view(l.ls.ctx)
	if err != nil {
		return
	}
	ls := l.ls
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if l.gone || !l.held || v.rev <= l.stateRev {
		return
	}
	if high := v.blockedBy(l.name, l.gr); high > l.highBast {
		l.deliverBast(lockc.Mode(high))
	}
}

// deliverBast puts m on the blocking channel without blocking, coalescing
// with an undelivered notification. ls.mu must be held.
func (l *lock) deliverBast(m lockc.Mode) {
	l.highBast = int(m)
	select {
	case old := <-l.bast:
		m = max(m, old)
	default:
	}
	l.bast <- m
}

// Blocking returns the lock's blocking-notification channel.
func (l *lock) Blocking() <-chan lockc.Mode { return l.bast }

// notHeld returns the error for an operation on a gone lock.
func (l *lock) notHeld() error {
	if err := l.ls.Err(); err != nil {
		return fmt.Errorf("%v: %w: %w", l, lockc.ErrUnlocked, err)
	}
	return fmt.Errorf("%v: %w", l, lockc.ErrUnlocked)
}

// Mode returns the granted mode.
func (l *lock) Mode() lockc.Mode {
	l.ls.mu.Lock()
	defer l.ls.mu.Unlock()
	return l.gr
}

// LVB returns the lock's LVB copy and its state.
func (l *lock) LVB() (lockc.LVB, lockc.LVBState) {
	l.ls.mu.Lock()
	defer l.ls.mu.Unlock()
	if l.inval {
		return l.lvb, lockc.LVBInvalid
	}
	return l.lvb, l.state
}

// SetLVB stages v; see lockc.Lock.
func (l *lock) SetLVB(v lockc.LVB) {
	l.ls.mu.Lock()
	defer l.ls.mu.Unlock()
	l.lvb, l.state, l.inval = v, lockc.LVBValid, false
}

// InvalidateLVB stages an invalidation; see lockc.Lock.
func (l *lock) InvalidateLVB() {
	l.ls.mu.Lock()
	defer l.ls.mu.Unlock()
	l.inval = true
}

// Grants are etcd revisions, which increase across the whole cluster.
var _ lockc.Tokener = (*lock)(nil)

// Token returns the revision of the lock's last grant or up-conversion.
func (l *lock) Token() uint64 {
	l.ls.mu.Lock()
	defer l.ls.mu.Unlock()
	return l.token
}
