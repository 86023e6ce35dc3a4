package inproc

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/lockc"
)

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
