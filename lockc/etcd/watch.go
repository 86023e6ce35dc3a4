package etcd

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/clustersnap/clustersnap/lockc"
)

// watch follows every key of the lockspace's resources from revision from
// on: an event on a resource wakes this node's requests waiting there and
// sends blocking notifications to its locks there. When the watch breaks
// (compaction, a member without a leader) it starts again where it left
// off, or from the current revision if etcd no longer has the events;
// then every waiting request looks again and every held lock re-reads its
// resource's queues, so no wake-up or notification is lost.
func (ls *lockspace) watch(from int64) {
	defer ls.done.Done()
	for ls.ctx.Err() == nil {
		ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ls.ctx))
		ch := ls.c.Watch(ctx, ls.keys.resources(), clientv3.WithPrefix(), clientv3.WithRev(from))
		resync := false
		for resp := range ch {
			if err := resp.Err(); err != nil {
				if errors.Is(err, rpctypes.ErrCompacted) {
					resync = true
				}
				break
			}
			for _, ev := range resp.Events {
				if st := ls.event(ev); st != nil {
					ls.reap(st)
				}
				from = ev.Kv.ModRevision + 1
			}
			ls.advance(from - 1)
		}
		cancel()
		if ls.ctx.Err() != nil {
			return
		}
		if resync {
			r, err := ls.c.Get(ls.ctx, ls.keys.nodes())
			if err != nil {
				ls.pause()
				continue
			}
			from = r.Header.Revision + 1
			ls.resync(r.Header.Revision)
			continue
		}
		ls.pause()
	}
}

// pause waits a moment before the watch starts again.
func (ls *lockspace) pause() { ls.pauseFor(ls.ctx) }

// pauseFor waits a moment before a failed request is tried again, or
// until ctx or the membership ends.
func (ls *lockspace) pauseFor(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	defer context.AfterFunc(ls.ctx, cancel)()
	pause(ctx)
	cancel()
}

// retry runs op until it succeeds or ctx ends, pausing between attempts:
// a request can fail while etcd elects a leader. It returns op's last
// error once ctx ended. op must be safe to repeat.
func retry(ctx context.Context, op func() error) error {
	for {
		err := op()
		if err == nil || ctx.Err() != nil {
			return err
		}
		pause(ctx)
	}
}

// pause waits retryPause, or until ctx ends.
func pause(ctx context.Context) {
	t := time.NewTimer(retryPause)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// advance records that every event through rev has been handled.
func (ls *lockspace) advance(rev int64) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if rev > ls.processed {
		ls.processed = rev
		close(ls.progress)
		ls.progress = make(chan struct{})
		for name, g := range ls.goneAt {
			if g <= rev {
				delete(ls.goneAt, name)
			}
		}
	}
}

// waitProcessed blocks until the watch has handled every event through
// rev, or ctx or the membership ends.
func (ls *lockspace) waitProcessed(ctx context.Context, rev int64) error {
	for {
		ls.mu.Lock()
		done, ch := ls.processed >= rev, ls.progress
		ls.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-ls.lost:
			return ls.Err()
		}
	}
}

// event handles one change of a key under the lockspace's resources. It
// returns a stray change of one of this membership's lock keys, for reap.
func (ls *lockspace) event(ev *clientv3.Event) *stray {
	res, kind, name := ls.keys.parseKey(string(ev.Kv.Key))
	rev := ev.Kv.ModRevision
	ls.mu.Lock()
	defer ls.mu.Unlock()
	set := ls.locks[res]
	if kind == kindLock && ev.Type == mvccpb.PUT && strings.HasPrefix(name, ls.lockPrefix()) {
		if st := ls.strayChange(set, name, ev.Kv); st != nil {
			return st
		}
	}
	if len(set) == 0 {
		return nil
	}
	ls.wake(res, rev)
	if kind != kindLock || ev.Type != mvccpb.PUT {
		return nil
	}
	e, err := decodeEntry(ev.Kv.Value)
	if err != nil || !e.queued() {
		return nil
	}
	for l := range set {
		// Only a change after the lock's own last change tells it
		// something new: older ones were in the view it decided on.
		if l.held && l.name != name && rev > l.stateRev && !lockc.Compatible(l.gr, e.rq) && int(e.rq) > l.highBast {
			l.deliverBast(e.rq)
		}
	}
	return nil
}

// stray is a change to one of this membership's lock keys that no
// operation of this node expects: a request whose answer was lost, which
// etcd applied after its operation had moved on (given up, or found it
// not committed and decided otherwise). Left alone, a stray waiting request
// would block its queue for as long as this node lives, since only its
// owner would grant it.
type stray struct {
	key, writer string
	rev         int64
	lock        *lock // nil: no lock of this node has the key any more
	want        entry // for a lock: what its key must say
	dropWriter  bool
}

// lockPrefix is how the names of this membership's locks begin.
func (ls *lockspace) lockPrefix() string { return fmt.Sprintf("%016x-", int64(ls.lease)) }

// strayChange returns the stray change kv is, or nil if an operation
// expects it or it says what the lock holds. ls.mu must be held.
func (ls *lockspace) strayChange(set map[*lock]struct{}, name string, kv *mvccpb.KeyValue) *stray {
	var l *lock
	for x := range set {
		if x.name == name {
			l = x
		}
	}
	if l == nil {
		if g, ok := ls.goneAt[name]; ok && kv.ModRevision <= g {
			return nil
		}
		return &stray{key: string(kv.Key), writer: strings.Replace(string(kv.Key), "/q/", "/w/", 1), rev: kv.ModRevision}
	}
	if l.gone || kv.ModRevision <= l.mod {
		return nil
	}
	if l.busy {
		// The operation may have made it (and not yet recorded
		// its revision): decide once it is done (idle, forget).
		l.unexpected = max(l.unexpected, kv.ModRevision)
		return nil
	}
	e, err := decodeEntry(kv.Value)
	if err == nil && e.held == l.held && e.granted == l.gr && e.rq == l.gr {
		return nil
	}
	l.seq++
	return &stray{
		key: string(kv.Key), rev: kv.ModRevision, lock: l,
		want:       entry{held: true, granted: l.gr, rq: l.gr, node: ls.node, seq: l.seq},
		writer:     l.keys.writer(l.name),
		dropWriter: err != nil || (e.held && e.granted >= lockc.PW && l.gr < lockc.PW),
	}
}

// reap undoes a stray change, if the key still holds it: a key no lock of
// this node has is deleted (with its writer marker), a lock's key is put
// back to what the lock holds. Nothing is published.
func (ls *lockspace) reap(st *stray) {
	ctx, cancel := context.WithTimeout(ls.ctx, attemptTimeout)
	defer cancel()
	ops := []clientv3.Op{clientv3.OpDelete(st.key), clientv3.OpDelete(st.writer)}
	if st.lock != nil {
		ops = []clientv3.Op{clientv3.OpPut(st.key, st.want.encode(), clientv3.WithLease(ls.lease))}
		if st.dropWriter {
			ops = append(ops, clientv3.OpDelete(st.writer))
		}
	}
	t, err := ls.c.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(st.key), "=", st.rev)).Then(ops...).Commit()
	if err != nil || !t.Succeeded || st.lock == nil {
		return
	}
	ls.mu.Lock()
	if !st.lock.busy {
		st.lock.mod = t.Header.Revision
	}
	ls.mu.Unlock()
	// The put is a change of the key too: its event arrives at or below
	// mod and is not taken for another stray.
}

// wake records an event on res at rev and wakes the requests waiting for
// one. ls.mu must be held.
func (ls *lockspace) wake(res string, rev int64) {
	ls.eventRev[res] = max(ls.eventRev[res], rev)
	if ch, ok := ls.changed[res]; ok {
		close(ch)
		delete(ls.changed, res)
	}
}

// changedSince returns a channel that is closed once an event on res after
// revision rev has arrived (at once if one has).
func (ls *lockspace) changedSince(res string, rev int64) <-chan struct{} {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.eventRev[res] > rev {
		ch := make(chan struct{})
		close(ch)
		return ch
	}
	ch, ok := ls.changed[res]
	if !ok {
		ch = make(chan struct{})
		ls.changed[res] = ch
	}
	return ch
}

// resync wakes every waiting request and has every held lock look at its
// resource again, after a watch lost events up to rev.
func (ls *lockspace) resync(rev int64) {
	ls.mu.Lock()
	var held []*lock
	for res, set := range ls.locks {
		ls.wake(res, rev)
		for l := range set {
			if l.held {
				held = append(held, l)
			}
		}
	}
	ls.mu.Unlock()
	for _, l := range held {
		l.rescan()
	}
	ls.advance(rev)
}
