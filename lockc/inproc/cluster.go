package inproc

import (
	"context"
	"fmt"
	"sync"

	"github.com/clustersnap/clustersnap/lockc"
)

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
