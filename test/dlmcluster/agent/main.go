// Command agent serves kernel DLM engines (package lockc/dlm) to a test on
// the host, over one lockagent connection: it runs in a guest of a DLM
// cluster, dials the host's test through the guest's forwarded address,
// and serves until the connection ends.
//
// Each lockagent node id is an Engine of its own, so its lockspaces are
// separate lock owners (device files) to the kernel. Crash makes a node's
// Engine die as a crashed process would (dlm.Engine.Crash: the files close
// without unlocking, the kernel force-unlocks). The agent keeps every
// lockspace a node opened open through an anchor Engine of its own until it
// exits: the kernel frees a lockspace when its last member leaves, and a
// join that races that free can attach to the dying lockspace.
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/dlm"
	"github.com/clustersnap/clustersnap/test/lockagent"
)

func main() {
	addr := flag.String("addr", "", "the host's address to dial (host:port)")
	name := flag.String("name", "", "the name sent to the host")
	stall := flag.Duration("stall", dlm.DefaultStallBound, "the engines' StallBound")
	flag.Parse()
	if err := run(*addr, *name, *stall); err != nil {
		fmt.Fprintf(os.Stderr, "agent: %v\n", err)
		os.Exit(1)
	}
}

func run(addr, name string, stall time.Duration) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	conn, err := (&net.Dialer{Timeout: time.Minute}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	a := &agent{opts: dlm.Options{StallBound: stall}, anchors: map[string]lockc.Lockspace{}, nodes: map[uint32]*dlm.Engine{}}
	a.anchor = dlm.New(a.opts)
	defer a.close()
	return lockagent.Serve(ctx, conn, lockagent.ServerConfig{
		Name:      name,
		Engine:    a.engine,
		Crash:     a.crash,
		Extension: a.extension,
	})
}

// agent holds the node engines and the anchors.
type agent struct {
	opts   dlm.Options
	anchor *dlm.Engine

	mu      sync.Mutex
	anchors map[string]lockc.Lockspace // by lockspace name
	nodes   map[uint32]*dlm.Engine
}

// engine makes node's Engine, whose Opens anchor the lockspace first.
func (a *agent) engine(node uint32) (lockc.Engine, error) {
	e := dlm.New(a.opts)
	a.mu.Lock()
	a.nodes[node] = e
	a.mu.Unlock()
	return anchored{a: a, e: e}, nil
}

// crash kills node's Engine. A node with none (never opened anything, or
// crashed and not opened since) has nothing to lose: as with the other
// engines' test clusters, crashing it does nothing. The conformance
// suite's Linearizable can crash a node twice before it rejoins.
func (a *agent) crash(_ context.Context, node uint32) error {
	a.mu.Lock()
	e := a.nodes[node]
	delete(a.nodes, node)
	a.mu.Unlock()
	if e != nil {
		e.Crash()
	}
	return nil
}

// Extension methods (see the package comment of test/dlmcluster).
const (
	methodQueues = "queues" // Counts: converting, waiting; Flag: this node masters the resource
	methodProbe  = "probe"  // a request on the resource and back, through its master
	methodSync   = "sync"   // every engine's notifications of the lockspace delivered
	methodInfo   = "info"   // Text: what the DLM tools say, for a failing test's log
	// methodCached converts an NL lock to CR and back for Args[0] ms;
	// Counts: iterations.
	methodCached = "cached"
	// methodPingPong runs Args[0] owners converting NL->EX (publishing)
	// ->NL on one resource for Args[1] ms; Counts: EX acquisitions.
	methodPingPong = "pingpong"
)

// extension answers the agent's own test operations.
func (a *agent) extension(ctx context.Context, method, lockspace string, resource []byte, args []int) (lockagent.ExtensionResult, error) {
	switch method {
	case methodQueues:
		q, err := readQueues(lockspace, resource)
		if err != nil {
			return lockagent.ExtensionResult{}, err
		}
		return lockagent.ExtensionResult{Counts: []int{q.converting, q.waiting}, Flag: q.master && q.found}, nil
	case methodProbe:
		// An NL request with Expedite is granted at once and blocks
		// nothing; its answer comes from the resource's master on the
		// same connection as the master's earlier blocking notifications
		// to this node, so those have been received when it returns.
		if err := a.anchorFor(ctx, lockspace); err != nil {
			return lockagent.ExtensionResult{}, err
		}
		a.mu.Lock()
		ls := a.anchors[lockspace]
		a.mu.Unlock()
		l, err := ls.Lock(ctx, resource, lockc.NL, lockc.Expedite)
		if err != nil {
			return lockagent.ExtensionResult{}, fmt.Errorf("probe %q: %w", resource, err)
		}
		return lockagent.ExtensionResult{}, l.Unlock(ctx)
	case methodSync:
		a.mu.Lock()
		engines := make([]*dlm.Engine, 0, len(a.nodes))
		for _, e := range a.nodes {
			engines = append(engines, e)
		}
		a.mu.Unlock()
		for _, e := range engines {
			if err := e.Sync(ctx, lockspace); err != nil {
				return lockagent.ExtensionResult{}, err
			}
		}
		return lockagent.ExtensionResult{}, nil
	case methodCached, methodPingPong:
		if err := a.anchorFor(ctx, lockspace); err != nil {
			return lockagent.ExtensionResult{}, err
		}
		n, err := a.bench(ctx, method, lockspace, resource, args)
		return lockagent.ExtensionResult{Counts: []int{n}}, err
	case methodInfo:
		var out []byte
		for _, args := range [][]string{{"dlm_tool", "ls"}, {"dlm_tool", "lockdebug", "-v", "-w", lockspace}, {"corosync-quorumtool", "-s"}, {"dmesg"}} {
			b, err := exec.CommandContext(ctx, args[0], args[1:]...).CombinedOutput()
			out = fmt.Appendf(out, "$ %s (%v)\n%s\n", strings.Join(args, " "), err, tailLines(b, 40))
		}
		return lockagent.ExtensionResult{Text: string(out)}, nil
	}
	return lockagent.ExtensionResult{}, fmt.Errorf("unknown method %q: %w", method, lockc.ErrBadRequest)
}

// tailLines is the last n lines of b.
func tailLines(b []byte, n int) []byte {
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return bytes.Join(lines, []byte("\n"))
}

// anchorFor opens lockspace name through the anchor Engine once.
func (a *agent) anchorFor(ctx context.Context, name string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.anchors[name] != nil {
		return nil
	}
	ls, err := a.anchor.Open(ctx, name)
	if err != nil {
		return fmt.Errorf("anchor lockspace %s: %w", name, err)
	}
	a.anchors[name] = ls
	return nil
}

// close leaves the anchored lockspaces.
func (a *agent) close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, ls := range a.anchors {
		_ = ls.Close()
	}
}

// anchored is a node's Engine whose Opens anchor the lockspace first.
type anchored struct {
	a *agent
	e *dlm.Engine
}

func (n anchored) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	if err := n.a.anchorFor(ctx, name); err != nil {
		return nil, err
	}
	return n.e.Open(ctx, name)
}
