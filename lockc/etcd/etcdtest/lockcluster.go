package etcdtest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// Engine is what a LockCluster needs of a node's lock engine; lockc/etcd's
// *Engine has it. (This package does not import lockc/etcd: that
// package's own tests import this one.)
type Engine interface {
	lockc.Engine
	// Crash ends every lockspace the engine has open as the node's death
	// would, and revokes their leases.
	Crash()
	// Sync returns once the engine's lockspaces named lockspace have
	// handled every change etcd had committed before the call.
	Sync(ctx context.Context, lockspace string) error
	// Close closes the engine's lockspaces and its connection.
	Close() error
	// WaitQueueLen returns once etcd holds exactly the queued requests
	// given on resource and the engine's lockspaces of that name have
	// handled the changes that queued them.
	WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error
	// ResourceCount counts the resources with any key under the
	// engine's prefix.
	ResourceCount(ctx context.Context) (int, error)
}

// NewEngine makes a node's engine, whose lockspaces live under the etcd
// key prefix given.
type NewEngine func(prefix string) (Engine, error)

// syncBound bounds how long Crash waits for the other nodes to see a
// crashed node's locks go.
const syncBound = 30 * time.Second

// LockCluster is a locktest.Cluster (and Crasher, QueueWaiter and
// ResourceCounter) whose nodes are
// lock engines on one etcd cluster, each with its own connection, under a
// key prefix no other LockCluster uses (so clusters share a server without
// sharing locks). Engines are made on first use and closed at cleanup.
type LockCluster struct {
	tb        testing.TB
	newEngine NewEngine
	prefix    string

	mu     sync.Mutex
	nodes  map[uint32]*lockNode
	spaces map[string]bool // lockspaces opened through the cluster, by name
}

var (
	_ locktest.Crasher         = (*LockCluster)(nil)
	_ locktest.QueueWaiter     = (*LockCluster)(nil)
	_ locktest.ResourceCounter = (*LockCluster)(nil)
)

// NewLockCluster returns a cluster whose nodes' engines newEngine makes.
func NewLockCluster(tb testing.TB, newEngine NewEngine) *LockCluster {
	c := &LockCluster{
		tb:        tb,
		newEngine: newEngine,
		prefix:    fmt.Sprintf("/etcdtest/%s/%016x/", strings.ReplaceAll(tb.Name(), "/", "."), rand.Uint64()),
		nodes:     map[uint32]*lockNode{},
		spaces:    map[string]bool{},
	}
	tb.Cleanup(func() {
		for _, n := range c.all() {
			if err := n.Engine.Close(); err != nil {
				tb.Logf("etcd lock cluster: close node %d: %v", n.id, err)
			}
		}
	})
	return c
}

// Prefix is the etcd key prefix the cluster's engines are made with.
func (c *LockCluster) Prefix() string { return c.prefix }

// Node returns node id's engine (ids from 1).
func (c *LockCluster) Node(id uint32) lockc.Engine { return c.node(id) }

// lockNode is a node's engine that tells its cluster which lockspaces it
// opens.
type lockNode struct {
	Engine
	id uint32
	c  *LockCluster
}

func (n *lockNode) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	n.c.mu.Lock()
	n.c.spaces[name] = true
	n.c.mu.Unlock()
	return n.Engine.Open(ctx, name)
}

func (c *LockCluster) node(id uint32) *lockNode {
	if id == 0 {
		c.tb.Fatal("etcd lock cluster: node 0: ids start at 1")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[id]
	if n == nil {
		e, err := c.newEngine(c.prefix)
		if err != nil {
			c.tb.Fatalf("etcd lock cluster: node %d: %v", id, err)
		}
		n = &lockNode{Engine: e, id: id, c: c}
		c.nodes[id] = n
	}
	return n
}

func (c *LockCluster) all() []*lockNode {
	c.mu.Lock()
	defer c.mu.Unlock()
	nodes := make([]*lockNode, 0, len(c.nodes))
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	return nodes
}

// Crash kills node id (its lockspaces are lost and their leases revoked,
// which removes its locks from etcd) and returns once every node's
// lockspaces have seen its locks go.
func (c *LockCluster) Crash(id uint32) {
	c.node(id).Crash()
	ctx, cancel := context.WithTimeout(context.Background(), syncBound)
	defer cancel()
	c.mu.Lock()
	var names []string
	for name := range c.spaces {
		names = append(names, name)
	}
	c.mu.Unlock()
	for _, n := range c.all() {
		for _, name := range names {
			if err := n.Sync(ctx, name); err != nil {
				c.tb.Errorf("etcd lock cluster: crash of node %d: node %d: %v", id, n.id, err)
			}
		}
	}
}

// WaitQueueLen waits until etcd holds exactly the queued requests given,
// then until every node has handled the changes that queued them.
func (c *LockCluster) WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error {
	for _, n := range c.all() {
		if err := n.WaitQueueLen(ctx, lockspace, resource, converting, waiting); err != nil {
			return err
		}
	}
	return nil
}

// ResourceCount counts the resources the cluster's nodes left keys of in
// etcd (they share a prefix, so any node counts them all).
func (c *LockCluster) ResourceCount() int {
	ctx, cancel := context.WithTimeout(context.Background(), syncBound)
	defer cancel()
	n, err := c.node(1).ResourceCount(ctx)
	if err != nil {
		c.tb.Errorf("etcd lock cluster: %v", err)
		return -1
	}
	return n
}
