package lockagent

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
)

// Placement says where a cluster's node runs: on which server, as which of
// its node ids.
type Placement struct {
	Client *Client
	Node   uint32
}

// Cluster is a lockc cluster whose nodes run on lockagent servers: the
// locktest.Cluster and locktest.Crasher of remote engines, for the
// conformance suite and for other multi-node checkers.
type Cluster struct {
	tb    testing.TB
	nodes map[uint32]Placement
}

// crashTimeout bounds a remote crash.
const crashTimeout = 2 * time.Minute

// NewCluster returns the cluster of nodes: node id → where it runs. Errors
// of Crash, which has no error result, fail tb.
func NewCluster(tb testing.TB, nodes map[uint32]Placement) *Cluster {
	return &Cluster{tb: tb, nodes: nodes}
}

// Node returns node id's engine.
func (c *Cluster) Node(id uint32) lockc.Engine {
	p, ok := c.nodes[id]
	if !ok {
		c.tb.Fatalf("lockagent cluster: no node %d", id)
	}
	return p.Client.Engine(p.Node)
}

// Placement returns where node id runs.
func (c *Cluster) Placement(id uint32) Placement { return c.nodes[id] }

// Crash kills node id's engine (Client.Crash): its lockspaces are lost here
// first, then the server drops its locks without releasing them.
func (c *Cluster) Crash(id uint32) {
	if err := c.CrashContext(context.Background(), id); err != nil {
		c.tb.Errorf("%v", err)
	}
}

// CrashContext is Crash with a context and an error.
func (c *Cluster) CrashContext(ctx context.Context, id uint32) error {
	p, ok := c.nodes[id]
	if !ok {
		return fmt.Errorf("lockagent cluster: no node %d", id)
	}
	ctx, cancel := context.WithTimeout(ctx, crashTimeout)
	defer cancel()
	if err := p.Client.Crash(ctx, p.Node); err != nil {
		return fmt.Errorf("lockagent cluster: crash node %d: %w", id, err)
	}
	return nil
}
