package dlmtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/dlm"
	"github.com/clustersnap/clustersnap/lockc/dlm/solo"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// EnvKernel is the environment variable that says the process runs on a
// kernel with the DLM that tests may use: "1".
const EnvKernel = "CLUSTERSNAP_DLM_KERNEL"

// anchorNode is the node id the anchors report; no test node uses it.
const anchorNode = 1 << 31

// debugfsDLM is where the kernel shows each lockspace's resources.
const debugfsDLM = "/sys/kernel/debug/dlm"

// queuePoll is the interval of WaitQueueLen's polling of debugfs: the
// kernel gives no notification of a request joining a queue.
const queuePoll = time.Millisecond

// controller is the process's solo controller, started by the first
// cluster that finds no local node configured. It is process-wide because
// the kernel is: one controller answers every lockspace join.
var controller struct {
	once sync.Once
	err  error
}

// startController starts the solo controller unless configfs has a local
// node already.
func startController() error {
	controller.once.Do(func() {
		if hasLocalNode() {
			return
		}
		_, controller.err = solo.Start(1)
	})
	return controller.err
}

// hasLocalNode reports whether configfs has a local node (a controller
// configured the kernel).
func hasLocalNode() bool {
	comms := "/sys/kernel/config/dlm/cluster/comms"
	entries, err := os.ReadDir(comms)
	if err != nil {
		return false
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(comms, e.Name(), "local"))
		if err == nil && strings.TrimSpace(string(b)) == "1" {
			return true
		}
	}
	return false
}

// Cluster is a simulated cluster on one kernel's DLM.
type Cluster struct {
	tb      testing.TB
	opts    dlm.Options
	anchors *dlm.Engine

	mu      sync.Mutex
	nodes   map[uint32]*node
	anchor  map[string]lockc.Lockspace
	opened  []lockc.Lockspace
	cleaned bool
}

var (
	_ locktest.Cluster     = (*Cluster)(nil)
	_ locktest.Crasher     = (*Cluster)(nil)
	_ locktest.QueueWaiter = (*Cluster)(nil)
)

// NewCluster returns a cluster whose nodes are Engines on this kernel's
// DLM, with the default options; see NewClusterOptions.
func NewCluster(tb testing.TB) *Cluster { return NewClusterOptions(tb, dlm.Options{}) }

// NewClusterOptions returns a cluster whose nodes are Engines made with o
// (NodeID set to the node's id). It skips tb unless EnvKernel is 1, and
// closes every lockspace it opened at tb's cleanup.
func NewClusterOptions(tb testing.TB, o dlm.Options) *Cluster {
	tb.Helper()
	if os.Getenv(EnvKernel) != "1" {
		tb.Skipf("the kernel DLM tests run in a guest (test/dlm), where %s=1", EnvKernel)
	}
	if err := startController(); err != nil {
		tb.Fatalf("start the solo DLM controller: %v", err)
	}
	ao := o
	ao.NodeID = anchorNode
	c := &Cluster{tb: tb, opts: o, anchors: dlm.New(ao), nodes: map[uint32]*node{}, anchor: map[string]lockc.Lockspace{}}
	tb.Cleanup(c.cleanup)
	return c
}

// Node returns node id's engine.
func (c *Cluster) Node(id uint32) lockc.Engine { return c.node(id) }

// Engine returns node id's dlm.Engine, for engine-specific tests.
func (c *Cluster) Engine(id uint32) *dlm.Engine { return c.node(id).e }

func (c *Cluster) node(id uint32) *node {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.nodes[id]
	if n == nil {
		o := c.opts
		o.NodeID = id
		n = &node{c: c, e: dlm.New(o)}
		c.nodes[id] = n
	}
	return n
}

// Crash kills node id: see dlm.Engine.Crash.
func (c *Cluster) Crash(id uint32) { c.node(id).e.Crash() }

// WaitQueueLen waits until resource in lockspace has exactly converting
// locks on its convert queue and waiting ones on its wait queue, then
// passes a request through every node's file of the lockspace, whose
// answer follows the blocking notifications queued before it.
func (c *Cluster) WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error {
	tick := time.NewTicker(queuePoll)
	defer tick.Stop()
	for {
		cv, w, err := queueLen(lockspace, resource)
		if err != nil {
			return err
		}
		if cv == converting && w == waiting {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("queues of %q in %s: %d converting, %d waiting, want %d and %d: %w",
				resource, lockspace, cv, w, converting, waiting, ctx.Err())
		case <-tick.C:
		}
	}
	c.mu.Lock()
	nodes := make([]*node, 0, len(c.nodes))
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	c.mu.Unlock()
	for _, n := range nodes {
		if err := n.e.Sync(ctx, lockspace); err != nil {
			return err
		}
	}
	return nil
}

// queueLen reads the lengths of resource's convert and wait queues from
// debugfs.
func queueLen(lockspace string, resource []byte) (converting, waiting int, err error) {
	b, err := os.ReadFile(filepath.Join(debugfsDLM, lockspace+"_all"))
	if err != nil {
		return 0, 0, fmt.Errorf("queues of %s (is debugfs mounted?): %w", lockspace, err)
	}
	return parseQueues(b, resource)
}

// Lock states in debugfs (DLM_LKSTS_*).
const (
	statusWaiting = "1"
	statusConvert = "3"
)

// parseQueues counts resource's converting and waiting locks in the
// kernel's "_all" debugfs format: an "rsb" line per resource (its name
// after the length, as "str NAME" or "hex XX XX ..."), then an "lkb" line
// per lock whose eighth field is its status.
func parseQueues(b, resource []byte) (converting, waiting int, err error) {
	sc := bufio.NewScanner(bytes.NewReader(b))
	in := false
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "rsb "):
			name, err := rsbName(line)
			if err != nil {
				return 0, 0, err
			}
			in = bytes.Equal(name, resource)
		case in && strings.HasPrefix(line, "lkb "):
			f := strings.Fields(line)
			if len(f) < 9 {
				return 0, 0, fmt.Errorf("debugfs lkb line %q", line)
			}
			switch f[8] {
			case statusConvert:
				converting++
			case statusWaiting:
				waiting++
			}
		}
	}
	return converting, waiting, sc.Err()
}

// rsbName decodes the name of an rsb line: "rsb PTR NODEID FIRSTLKID FLAGS
// ROOT RECOVER COUNT LEN str NAME" or "... LEN hex XX XX".
func rsbName(line string) ([]byte, error) {
	rest := line
	for range 9 {
		_, after, ok := strings.Cut(rest, " ")
		if !ok {
			return nil, fmt.Errorf("debugfs rsb line %q", line)
		}
		rest = after
	}
	if s, ok := strings.CutPrefix(rest, "str "); ok {
		return []byte(s), nil
	}
	if h, ok := strings.CutPrefix(rest, "hex"); ok {
		return hex.DecodeString(strings.ReplaceAll(h, " ", ""))
	}
	return nil, fmt.Errorf("debugfs rsb line %q", line)
}

// cleanup closes every lockspace the cluster's nodes opened, then the
// anchors.
func (c *Cluster) cleanup() {
	c.mu.Lock()
	c.cleaned = true
	opened, anchors := c.opened, c.anchor
	c.opened, c.anchor = nil, nil
	c.mu.Unlock()
	for _, ls := range opened {
		_ = ls.Close()
	}
	for _, ls := range anchors {
		_ = ls.Close()
	}
}

// node is one node's engine: it opens lockspaces through the cluster, which
// anchors them.
type node struct {
	c *Cluster
	e *dlm.Engine
}

func (n *node) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	if err := n.c.anchorFor(ctx, name); err != nil {
		return nil, err
	}
	ls, err := n.e.Open(ctx, name)
	if err != nil {
		return nil, err
	}
	n.c.mu.Lock()
	n.c.opened = append(n.c.opened, ls)
	n.c.mu.Unlock()
	return ls, nil
}

// anchorFor opens lockspace name through the anchor Engine once.
func (c *Cluster) anchorFor(ctx context.Context, name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cleaned {
		return fmt.Errorf("open lockspace %s: the cluster was cleaned up", name)
	}
	if c.anchor[name] != nil {
		return nil
	}
	ls, err := c.anchors.Open(ctx, name)
	if err != nil {
		return fmt.Errorf("anchor lockspace %s: %w", name, err)
	}
	c.anchor[name] = ls
	return nil
}
