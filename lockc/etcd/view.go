package etcd

import (
	"cmp"
	"fmt"
	"slices"

	"go.etcd.io/etcd/api/v3/mvccpb"

	"github.com/clustersnap/clustersnap/lockc"
)

// queuedEntry is one lock's entry as a view saw it, with the revisions
// that order it: CreateRevision orders new requests, ModRevision orders
// conversions (the entry is not written again while it waits).
type queuedEntry struct {
	name   string
	e      entry
	create int64
	mod    int64
}

// view is one resource's keys as read at revision rev: every decision is
// made on a view and committed only if no key of the resource changed
// since (deletions aside: a lock that vanished since only makes a view
// more cautious, never less).
type view struct {
	rev      int64
	locks    []queuedEntry
	lvb      lockc.LVB
	lvbState lockc.LVBState
	writers  []string // names of locks with a writer marker
}

// newView builds the view of one resource from its keys read at rev.
func newView(k layout, kvs []*mvccpb.KeyValue, rev int64) (*view, error) {
	v := &view{rev: rev}
	for _, kv := range kvs {
		_, kind, name := k.parseKey(string(kv.Key))
		switch kind {
		case kindLock:
			e, err := decodeEntry(kv.Value)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", kv.Key, err)
			}
			v.locks = append(v.locks, queuedEntry{name: name, e: e, create: kv.CreateRevision, mod: kv.ModRevision})
		case kindLVB:
			lvb, st, err := decodeLVB(kv.Value)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", kv.Key, err)
			}
			v.lvb, v.lvbState = lvb, st
		case kindWriter:
			v.writers = append(v.writers, name)
		}
	}
	return v, nil
}

// find returns the entry of lock name, or nil.
func (v *view) find(name string) *queuedEntry {
	for i := range v.locks {
		if v.locks[i].name == name {
			return &v.locks[i]
		}
	}
	return nil
}

// converting returns the waiting conversions in the order they queued.
func (v *view) converting() []queuedEntry {
	var c []queuedEntry
	for _, q := range v.locks {
		if q.e.held && q.e.granted != q.e.rq {
			c = append(c, q)
		}
	}
	slices.SortFunc(c, func(a, b queuedEntry) int { return cmp.Compare(a.mod, b.mod) })
	return c
}

// waiting returns the waiting new requests in the order they queued.
func (v *view) waiting() []queuedEntry {
	var w []queuedEntry
	for _, q := range v.locks {
		if !q.e.held {
			w = append(w, q)
		}
	}
	slices.SortFunc(w, func(a, b queuedEntry) int { return cmp.Compare(a.create, b.create) })
	return w
}

// deadWriters returns the writer markers whose lock has no entry: their
// lease expired while they held PW or EX.
func (v *view) deadWriters() []string {
	var dead []string
	for _, w := range v.writers {
		if v.find(w) == nil {
			dead = append(dead, w)
		}
	}
	return dead
}

// compatibleWithHolders reports whether rq is compatible with every other
// lock's granted mode (granted or converting).
func (v *view) compatibleWithHolders(self string, rq lockc.Mode) bool {
	for _, q := range v.locks {
		if q.name != self && q.e.held && !lockc.Compatible(q.e.granted, rq) {
			return false
		}
	}
	return true
}

// request is a pending operation to decide on a view.
type request struct {
	name   string // the lock
	rq     lockc.Mode
	flags  lockc.Flag
	isNew  bool
	queued bool // its entry already waits on a queue
}

// canGrant is the DLM's _can_be_granted: a request not yet queued is
// decided as it arrives; a queued one must also be at the head of its
// queue (conversions first) unless NoOrder.
func (v *view) canGrant(r request) bool {
	if r.flags&lockc.Expedite != 0 {
		return true
	}
	if !v.compatibleWithHolders(r.name, r.rq) {
		return false
	}
	conv := v.converting()
	others := func(qs []queuedEntry) []queuedEntry {
		return slices.DeleteFunc(qs, func(q queuedEntry) bool { return q.name == r.name })
	}
	switch {
	case !r.queued && !r.isNew && r.flags&lockc.QueueConvert == 0:
		return true
	case r.flags&lockc.NoOrder != 0:
		return true
	case r.queued && !r.isNew:
		return len(conv) > 0 && conv[0].name == r.name
	case !r.isNew:
		return len(others(conv)) == 0
	case !r.queued:
		return len(conv) == 0 && len(v.waiting()) == 0
	default:
		w := v.waiting()
		return len(conv) == 0 && len(w) > 0 && w[0].name == r.name
	}
}

// deadlocks reports whether a conversion of lock name, holding gr, would
// wait behind a queued conversion that gr blocks: that one can never be
// granted, so this one would wait forever.
func (v *view) deadlocks(name string, gr lockc.Mode) bool {
	for _, q := range v.converting() {
		if q.name != name && !lockc.Compatible(gr, q.e.rq) {
			return true
		}
	}
	return false
}

// blockedBy returns the highest mode among the requests queued on the
// resource that a lock named name holding gr keeps waiting, or -1.
func (v *view) blockedBy(name string, gr lockc.Mode) int {
	high := -1
	for _, q := range v.locks {
		if q.name != name && q.e.queued() && !lockc.Compatible(gr, q.e.rq) {
			high = max(high, int(q.e.rq))
		}
	}
	return high
}
