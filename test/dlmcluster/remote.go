package dlmcluster

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/test/guest"
	"github.com/clustersnap/clustersnap/test/lockagent"
)

// agentPackage is the guest program that serves the DLM engines.
const agentPackage = "github.com/clustersnap/clustersnap/test/dlmcluster/agent"

// agentPort is where guests dial the host's test (forwarded by QEMU).
const agentPort = 7000

// Options describe a Remote.
type Options struct {
	// Guests is the number of guests (cluster nodes); 3 when zero.
	Guests int
	// StallBound is the guest engines' dlm.Options.StallBound.
	StallBound time.Duration
	// MemoryMiB is each guest's memory; 512 when zero.
	MemoryMiB int
}

// DefaultStallBound is the guests' stall bound when Options has none:
// longer than the DLM's recovery after a node's death in these guests, so
// survivors keep their lockspaces, and short enough that a partitioned
// node's loss is seen within a test's time.
const DefaultStallBound = 20 * time.Second

// Remote is a DLM cluster of QEMU guests (corosync, dlm_controld, the
// kernel DLM) with a lockagent server in each guest serving lockc/dlm
// engines, and the host's clients of them: a test on the host drives
// kernel DLM engines on several kernels through it.
type Remote struct {
	tb      testing.TB
	cluster *guest.DLMCluster
	ln      net.Listener

	mu      sync.Mutex
	clients map[int]*lockagent.Client // by guest, the newest connection
	arrived chan struct{}             // closed and replaced when a client arrives
}

// Start boots the guests, waits until every guest's agent has connected,
// and registers their end at tb's cleanup. It skips tb (fails it under
// CI=true) when QEMU, the kernel or the cluster's packages are missing.
func Start(ctx context.Context, tb testing.TB, opts Options) *Remote {
	tb.Helper()
	if opts.Guests == 0 {
		opts.Guests = 3
	}
	if opts.StallBound == 0 {
		opts.StallBound = DefaultStallBound
	}
	agent := guest.BuildStatic(tb, agentPackage)
	r := guest.DLMSetup(tb, guest.Config{
		Modules:      []string{"virtio_pci", "virtio_net"},
		Files:        map[string][]byte{"/bin/lockagent": agent},
		HostPrograms: []string{guest.Netcat},
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatalf("listen for the guests' agents: %v", err)
	}
	rm := &Remote{tb: tb, ln: ln, clients: map[int]*lockagent.Client{}, arrived: make(chan struct{})}
	go rm.accept()
	forward := guest.Forward{GuestPort: agentPort, HostAddr: ln.Addr().String()}
	cluster, err := guest.StartDLMCluster(ctx, r, guest.DLMClusterOptions{
		Nodes:     opts.Guests,
		MemoryMiB: opts.MemoryMiB,
		QEMUArgs:  func(int) []string { return guest.NetworkArgs(forward) },
		Script: func(i int) string {
			return guest.NetworkUpScript + fmt.Sprintf("exec /bin/lockagent -addr %s:%d -name %d -stall %s\n",
				guest.GuestHostAddr, agentPort, i, opts.StallBound)
		},
	})
	if err != nil {
		ln.Close()
		tb.Fatalf("start the DLM cluster: %v", err)
	}
	rm.cluster = cluster
	tb.Cleanup(rm.close)
	for i := 1; i <= opts.Guests; i++ {
		if _, err := rm.waitClient(ctx, i, nil); err != nil {
			tb.Fatalf("%v", err)
		}
	}
	return rm
}

// accept takes the agents' connections until the listener closes.
func (rm *Remote) accept() {
	for {
		conn, err := rm.ln.Accept()
		if err != nil {
			return
		}
		go func() {
			c, err := lockagent.NewClient(conn)
			if err != nil {
				rm.tb.Logf("an agent's connection failed: %v", err)
				return
			}
			i, err := strconv.Atoi(c.Name())
			if err != nil {
				rm.tb.Logf("an agent named itself %q", c.Name())
				c.Close()
				return
			}
			rm.mu.Lock()
			rm.clients[i] = c
			close(rm.arrived)
			rm.arrived = make(chan struct{})
			rm.mu.Unlock()
		}()
	}
}

// waitClient waits for guest i's agent to connect, other than old.
func (rm *Remote) waitClient(ctx context.Context, i int, old *lockagent.Client) (*lockagent.Client, error) {
	for {
		rm.mu.Lock()
		c, arrived := rm.clients[i], rm.arrived
		rm.mu.Unlock()
		if c != nil && c != old {
			return c, nil
		}
		select {
		case <-arrived:
		case <-rm.cluster.Machine(i).Done():
			return nil, fmt.Errorf("guest %d stopped before its agent connected:\n%s", i, rm.cluster.Machine(i).Console())
		case <-ctx.Done():
			return nil, fmt.Errorf("guest %d's agent: %w", i, ctx.Err())
		}
	}
}

// Client returns guest i's agent client.
func (rm *Remote) Client(i int) *lockagent.Client {
	rm.mu.Lock()
	defer rm.mu.Unlock()
	return rm.clients[i]
}

// Guests is the cluster of guests.
func (rm *Remote) Guests() *guest.DLMCluster { return rm.cluster }

// Node returns an engine of guest i: agent node n on it (separate lock
// owners for separate n).
func (rm *Remote) Node(i int, n uint32) lockc.Engine { return rm.Client(i).Engine(n) }

// LockCluster is a lockc cluster whose nodes are engines in the guests: a
// locktest.Cluster, locktest.Crasher and locktest.QueueWaiter.
type LockCluster struct {
	*lockagent.Cluster
	rm *Remote
}

// LockCluster returns a lockc cluster of nodes 1..nodes spread over the
// guests in turn: node id k runs on guest (k-1)%guests+1, as that guest's
// agent node (k-1)/guests+1. With three guests, node 4 is a second owner
// on guest 1. Its Crash is a process-level crash of the node's engine.
func (rm *Remote) LockCluster(tb testing.TB, nodes int) *LockCluster {
	guests := rm.cluster.Nodes()
	place := map[uint32]lockagent.Placement{}
	for k := 1; k <= nodes; k++ {
		place[uint32(k)] = lockagent.Placement{Client: rm.Client((k-1)%guests + 1), Node: uint32((k-1)/guests + 1)}
	}
	return &LockCluster{Cluster: lockagent.NewCluster(tb, place), rm: rm}
}

// queuePoll is how often WaitQueueLen reads the queues: the kernel gives
// no notification of a request reaching its queue.
const queuePoll = 20 * time.Millisecond

// WaitQueueLen waits until the guest that masters resource has exactly
// converting and waiting requests queued on it; then it makes sure the
// blocking notifications this caused have reached the locks: every other
// guest passes a request through the master (whose answer follows the
// master's notifications to that guest on their connection), then every
// guest passes one through each of its lockspace files (whose answer
// follows the notifications queued on it), and the agents send what their
// engines delivered before they answer.
func (lc *LockCluster) WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error {
	rm := lc.rm
	tick := time.NewTicker(queuePoll)
	defer tick.Stop()
	master := 0
	for {
		master = 0
		cv, w := 0, 0
		for i := 1; i <= rm.cluster.Nodes(); i++ {
			res, err := rm.Client(i).Extension(ctx, "queues", lockspace, resource)
			if err != nil {
				return fmt.Errorf("guest %d: %w", i, err)
			}
			if res.Flag {
				master, cv, w = i, res.Counts[0], res.Counts[1]
			}
		}
		if cv == converting && w == waiting {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("queues of %q in %s (master guest %d): %d converting, %d waiting, want %d and %d: %w",
				resource, lockspace, master, cv, w, converting, waiting, ctx.Err())
		case <-tick.C:
		}
	}
	for i := 1; i <= rm.cluster.Nodes(); i++ {
		if master != 0 && i != master {
			if _, err := rm.Client(i).Extension(ctx, "probe", lockspace, resource); err != nil {
				return fmt.Errorf("guest %d: %w", i, err)
			}
		}
	}
	for i := 1; i <= rm.cluster.Nodes(); i++ {
		if _, err := rm.Client(i).Extension(ctx, "sync", lockspace, nil); err != nil {
			return fmt.Errorf("guest %d: %w", i, err)
		}
	}
	return nil
}

// Info returns what the DLM tools of every guest say about lockspace, for
// a failing test's log.
func (rm *Remote) Info(ctx context.Context, lockspace string) string {
	var b []byte
	for i := 1; i <= rm.cluster.Nodes(); i++ {
		res, err := rm.Client(i).Extension(ctx, "info", lockspace, nil)
		b = fmt.Appendf(b, "=== guest %d (%v)\n%s\n", i, err, res.Text)
	}
	return string(b)
}

// Kill ends guest i's QEMU at once (SIGKILL). Its lockspaces are lost on
// the host first, as the guest's own engines would have lost them had
// they seen it coming.
func (rm *Remote) Kill(i int) {
	rm.Client(i).LoseAll(fmt.Errorf("guest %d killed: %w", i, lockc.ErrLost))
	rm.cluster.Kill(i)
}

// Reboot boots guest i again and waits until it has rejoined the cluster
// and its agent has connected.
func (rm *Remote) Reboot(ctx context.Context, i int) error {
	old := rm.Client(i)
	if err := rm.cluster.Reboot(ctx, i); err != nil {
		return err
	}
	_, err := rm.waitClient(ctx, i, old)
	return err
}

// close ends the connections, the guests and the listener.
func (rm *Remote) close() {
	rm.mu.Lock()
	clients := rm.clients
	rm.mu.Unlock()
	for _, c := range clients {
		c.Close()
	}
	rm.cluster.Close()
	rm.ln.Close()
}
