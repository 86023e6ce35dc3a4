// Package inproc is lockc's in-process lock engine: the embedded default for
// a single host, and a simulated cluster of several nodes (with crashes) for
// tests of clustered code.
//
// All nodes of a Cluster share one table of lockspaces guarded by one mutex;
// a request is decided while that mutex is held, so every decision sees one
// consistent state. Waiting callers block on a channel that the engine closes
// when their request completes; the engine itself never runs goroutines.
//
// The rules are the Linux DLM's (specs/locks.md §1), including its LVB table
// (dlm_lvb_operations). Choices where the DLM leaves room:
//   - A resource is forgotten as soon as no lock (granted, converting or
//     waiting) remains on it; the next lock reads a zero LVB in state
//     LVBUnknown (the DLM tosses it after about 10 s; here it is immediate).
//   - Tokens come from one counter per Cluster, so a resource's token keeps
//     increasing even across being forgotten.
//   - Close is an orderly unlock of every lock: PW and EX locks publish their
//     staged LVB (or invalidate it, after InvalidateLVB). Crash publishes
//     nothing and marks the LVB invalid where the node held PW or EX.
//   - Blocking notifications go to every lock holding a granted mode that is
//     incompatible with the queued request, including locks that are
//     themselves waiting to convert (they still hold their granted mode).
//   - After a crash a node may open lockspaces again, as a restarted node.
//   - LVB() of a lock reports LVBValid after SetLVB and LVBInvalid after
//     InvalidateLVB (what the next publish would write).
//   - As in the DLM, a PW or EX lock that leaves PW/EX without SetLVB or
//     InvalidateLVB republishes the copy it read, and marks it valid.
//   - A cancelled request whose grant won the race is undone without
//     publishing. The one exception is a PR↔CW conversion after which
//     another lock was granted a mode compatible with the new mode but not
//     the old one: going back is impossible, so Convert reports success.
//   - Unlock never waits and ignores its context.
package inproc

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/lockc"
)

// What a conversion does with the LVB; see lvbOp.
const (
	lvbNone  = iota // nothing
	lvbRead         // resource → lock
	lvbWrite        // lock → resource
)

// lvbOp says what converting from granted mode gr to mode rq does with the
// LVB, as the DLM's dlm_lvb_operations table: only PW and EX write (on every
// conversion except PW→EX), and every other conversion to the same or a
// stronger mode reads.
func lvbOp(gr, rq lockc.Mode) int {
	switch {
	case gr == lockc.EX, gr == lockc.PW && rq != lockc.EX:
		return lvbWrite
	case rq >= gr:
		return lvbRead
	}
	return lvbNone
}

// allFlags is every flag the engine understands.
const allFlags = lockc.NoQueue | lockc.QueueConvert | lockc.Expedite | lockc.NoOrder

// isUp reports whether converting from gr to rq is an up-conversion, which
// must wait like a request: a stronger mode, or the DLM's "middle"
// conversion PR→CW (CW is not weaker than PR).
func isUp(gr, rq lockc.Mode) bool {
	return rq > gr || (gr == lockc.PR && rq == lockc.CW)
}

// NodeStats counts one node's traffic through the engine.
type NodeStats struct {
	// Requests, Converts and Unlocks count the Lock, Convert and Unlock
	// calls that reached the engine (valid arguments, lockspace not lost):
	// a clustered client's lock round trips.
	Requests, Converts, Unlocks uint64
	// Grants counts new locks and conversions granted to the node.
	Grants uint64
	// Basts counts blocking notifications delivered to the node's locks.
	Basts uint64
	// Undone counts grants taken back because the caller's context ended
	// as the grant arrived.
	Undone uint64
}

// Cluster is a set of simulated nodes sharing lockspaces in one process.
// Its zero value is not usable; call NewCluster.
type Cluster struct {
	mu      sync.Mutex
	nodes   map[uint32]*node
	spaces  map[string]*space
	token   uint64        // last fencing token handed out
	changed chan struct{} // closed (and cleared) on the next state change; nil if nobody waits
}

// NewCluster returns an empty cluster.
func NewCluster() *Cluster {
	return &Cluster{nodes: map[uint32]*node{}, spaces: map[string]*space{}}
}

// New returns the embedded single-host default engine (a one-node cluster,
// node 1).
func New() lockc.Engine { return NewCluster().Node(1) }

// Node returns the lockc.Engine of node id; the same id gives the same node.
// Ids are chosen by the caller and must not be zero (Node panics on 0, which
// the DLM reserves).
func (c *Cluster) Node(id uint32) lockc.Engine {
	if id == 0 {
		panic("inproc: node id 0")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[id]
	if n == nil {
		n = &node{c: c, id: id, members: map[*member]struct{}{}}
		c.nodes[id] = n
	}
	return n
}

// Crash simulates node id's death: every lockspace it joined is lost (Lost
// closed, Err wraps lockc.ErrLost and says the node crashed), its locks are
// dropped without publishing, and on any resource where it held PW or EX the
// LVB becomes LVBInvalid; waiters are then granted. Pending requests of the
// node fail with lockc.ErrLost. The node may open lockspaces again afterwards
// (it has restarted). Crashing an unknown node does nothing.
func (c *Cluster) Crash(id uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[id]
	if n == nil {
		return
	}
	for m := range n.members {
		m.leave(fmt.Errorf("lockspace %s: node %d crashed: %w", m.sp.name, id, lockc.ErrLost), true)
	}
	c.notify()
}

// Stats returns node id's counters (zero for an unknown node).
func (c *Cluster) Stats(id uint32) NodeStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := c.nodes[id]; n != nil {
		return n.stats
	}
	return NodeStats{}
}

// ResourceCount returns how many resources the cluster remembers, over all
// lockspaces. A resource is remembered while any lock is on it, so this drops
// back to zero when every lock is released: leak checks use it.
func (c *Cluster) ResourceCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	total := 0
	for _, sp := range c.spaces {
		total += len(sp.resources)
	}
	return total
}

// QueueLen returns how many conversions and new requests wait on resource in
// lockspace (zeros if the resource is not remembered).
func (c *Cluster) QueueLen(lockspace string, resource []byte) (converting, waiting int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.queueLen(lockspace, resource)
}

func (c *Cluster) queueLen(lockspace string, resource []byte) (converting, waiting int) {
	sp := c.spaces[lockspace]
	if sp == nil {
		return 0, 0
	}
	r := sp.resources[string(resource)]
	if r == nil {
		return 0, 0
	}
	return len(r.converting), len(r.waiting)
}

// WaitQueueLen blocks until exactly converting conversions and waiting new
// requests are queued on resource in lockspace, or ctx ends. Tests use it to
// know that a request has reached its queue.
func (c *Cluster) WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error {
	for {
		c.mu.Lock()
		cv, w := c.queueLen(lockspace, resource)
		if cv == converting && w == waiting {
			c.mu.Unlock()
			return nil
		}
		if c.changed == nil {
			c.changed = make(chan struct{})
		}
		ch := c.changed
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("lockspace %s: resource %q: waiting for %d converting, %d waiting (have %d, %d): %w",
				lockspace, resource, converting, waiting, cv, w, ctx.Err())
		}
	}
}

// notify wakes WaitQueueLen callers. c.mu must be held.
func (c *Cluster) notify() {
	if c.changed != nil {
		close(c.changed)
		c.changed = nil
	}
}

// nextToken returns a new fencing token. c.mu must be held.
func (c *Cluster) nextToken() uint64 {
	c.token++
	return c.token
}

// node is one simulated node: a lockc.Engine.
type node struct {
	c       *Cluster
	id      uint32
	members map[*member]struct{} // lockspaces joined and not lost
	stats   NodeStats
}

// Open joins the named lockspace (1 to 64 bytes). Each Open returns a
// separate membership, like a separate process on the node.
func (n *node) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	if len(name) == 0 || len(name) > 64 {
		return nil, fmt.Errorf("lockspace %q: name must be 1 to 64 bytes: %w", name, lockc.ErrBadRequest)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("lockspace %s: %w", name, err)
	}
	c := n.c
	c.mu.Lock()
	defer c.mu.Unlock()
	sp := c.spaces[name]
	if sp == nil {
		sp = &space{name: name, resources: map[string]*resource{}, members: map[*member]struct{}{}}
		c.spaces[name] = sp
	}
	m := &member{n: n, sp: sp, locks: map[*lock]struct{}{}, lost: make(chan struct{})}
	sp.members[m] = struct{}{}
	n.members[m] = struct{}{}
	return m, nil
}

// space is a lockspace shared by the cluster's nodes.
type space struct {
	name      string
	resources map[string]*resource
	members   map[*member]struct{}
}

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

// member is one node's membership of a lockspace: a lockc.Lockspace.
type member struct {
	n     *node
	sp    *space
	locks map[*lock]struct{}
	lost  chan struct{}
	// isLost is set just before lost is closed.
	isLost atomic.Bool
	err    error    // set when lost, under c.mu
	onLost []func() // OnLost's functions, called as the membership ends; under c.mu
}

var (
	_ lockc.LostChecker  = (*member)(nil)
	_ lockc.LostNotifier = (*member)(nil)
)

// NodeID returns the node's id.
func (m *member) NodeID() uint32 { return m.n.id }

// Name returns the lockspace's name.
func (m *member) Name() string { return m.sp.name }

// Lost is closed when the membership ends (Close or Crash).
func (m *member) Lost() <-chan struct{} { return m.lost }

// IsLost implements lockc.LostChecker.
func (m *member) IsLost() bool { return m.isLost.Load() }

// OnLost implements lockc.LostNotifier: f runs under the cluster's mutex
// as the membership ends, before its locks are given to anyone.
func (m *member) OnLost(f func()) {
	c := m.n.c
	c.mu.Lock()
	if m.err == nil {
		m.onLost = append(m.onLost, f)
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	f()
}

// Err says why the membership ended, or nil.
func (m *member) Err() error {
	m.n.c.mu.Lock()
	defer m.n.c.mu.Unlock()
	return m.err
}

// Close releases every lock of the membership as Unlock would (PW and EX
// locks publish their staged LVB), fails its pending requests with
// lockc.ErrLost and closes Lost. Closing again does nothing.
func (m *member) Close() error {
	c := m.n.c
	c.mu.Lock()
	defer c.mu.Unlock()
	m.leave(fmt.Errorf("lockspace %s: closed by node %d: %w", m.sp.name, m.n.id, lockc.ErrLost), false)
	c.notify()
	return nil
}

// leave ends the membership with err: crash drops locks without publishing
// and invalidates LVBs under PW/EX; otherwise locks are unlocked in order.
// c.mu must be held.
func (m *member) leave(err error, crash bool) {
	if m.err != nil {
		return
	}
	m.err = err
	touched := map[*resource]struct{}{}
	for l := range m.locks {
		r := l.res
		touched[r] = struct{}{}
		if l.op != nil && !l.op.finished {
			l.op.finish(err)
		}
		if l.held && l.gr >= lockc.PW {
			if crash {
				r.state = lockc.LVBInvalid
			} else {
				l.publish()
			}
		}
		l.detach()
	}
	clear(m.locks)
	for _, f := range m.onLost {
		f()
	}
	m.onLost = nil
	m.isLost.Store(true)
	close(m.lost)
	delete(m.n.members, m)
	delete(m.sp.members, m)
	for r := range touched {
		r.runQueues()
		r.forgetIfEmpty()
	}
	if len(m.sp.members) == 0 && len(m.sp.resources) == 0 {
		delete(m.n.c.spaces, m.sp.name)
	}
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

// combine ORs flags together.
func combine(flags []lockc.Flag) lockc.Flag {
	var f lockc.Flag
	for _, x := range flags {
		f |= x
	}
	return f
}

// Lock requests a new lock; see lockc.Lockspace.
func (m *member) Lock(ctx context.Context, name []byte, mode lockc.Mode, flags ...lockc.Flag) (lockc.Lock, error) {
	l, o, err := m.request(ctx, name, mode, combine(flags))
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
		if isUp(l.gr, o.oldGr) && !r.compatibleWithHolders(l, o.oldGr) {
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

// convertTo changes l's granted mode to rq, moving the LVB as the DLM does.
// c.mu must be held.
func (l *lock) convertTo(rq lockc.Mode) {
	switch lvbOp(l.gr, rq) {
	case lvbRead:
		l.read()
	case lvbWrite:
		l.publish()
	}
	if isUp(l.gr, rq) {
		l.token = l.m.n.c.nextToken()
	}
	l.gr = rq
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

// Mode returns the granted mode.
func (l *lock) Mode() lockc.Mode {
	l.m.n.c.mu.Lock()
	defer l.m.n.c.mu.Unlock()
	return l.gr
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

// Blocking returns the lock's blocking-notification channel.
func (l *lock) Blocking() <-chan lockc.Mode { return l.bast }

// Token returns the fencing token of the lock's last grant or
// up-conversion.
func (l *lock) Token() uint64 {
	l.m.n.c.mu.Lock()
	defer l.m.n.c.mu.Unlock()
	return l.token
}

// notHeld returns the error for an operation on a gone lock. c.mu must be
// held.
func (l *lock) notHeld() error {
	if l.m.err != nil {
		return fmt.Errorf("%v: %w: %w", l.res, lockc.ErrUnlocked, l.m.err)
	}
	return fmt.Errorf("%v: %w", l.res, lockc.ErrUnlocked)
}

// Convert changes the lock's mode; see lockc.Lock.
func (l *lock) Convert(ctx context.Context, mode lockc.Mode, flags ...lockc.Flag) error {
	o, err := l.startConvert(ctx, mode, combine(flags))
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
	case f&lockc.QueueConvert != 0 && !isUp(l.gr, mode):
		return nil, fmt.Errorf("%v: QueueConvert from %v to %v: %w", r, l.gr, mode, lockc.ErrBadRequest)
	case ctx.Err() != nil:
		return nil, fmt.Errorf("%v: convert to %v: %w", r, mode, ctx.Err())
	}
	l.m.n.stats.Converts++
	if !isUp(l.gr, mode) {
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
