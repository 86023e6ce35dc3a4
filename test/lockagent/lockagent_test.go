package lockagent_test

import (
	"context"
	"net"
	"path/filepath"
	"testing"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/lockc/locktest"
	"github.com/clustersnap/clustersnap/test/lockagent"
	"github.com/stretchr/testify/require"
)

// proxied is an inproc cluster behind one lockagent server on a unix
// socket, with the inproc engine's test capabilities carried over it too.
type proxied struct {
	*lockagent.Cluster
	client *lockagent.Client
}

func (p *proxied) WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error {
	return p.client.WaitQueueLen(ctx, lockspace, resource, converting, waiting)
}

func (p *proxied) ResourceCount() int {
	n, err := p.client.ResourceCount(context.Background())
	if err != nil {
		panic(err)
	}
	return n
}

// newProxied serves a fresh inproc cluster on a unix socket and connects a
// client to it.
func newProxied(tb testing.TB) *proxied {
	tb.Helper()
	ic := inproc.NewCluster()
	path := filepath.Join(tb.TempDir(), "agent.sock")
	ln, err := net.Listen("unix", path)
	require.NoError(tb, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		conn, err := ln.Accept()
		ln.Close()
		if err != nil {
			served <- err
			return
		}
		served <- lockagent.Serve(ctx, conn, lockagent.ServerConfig{
			Name:   "inproc",
			Engine: func(node uint32) (lockc.Engine, error) { return ic.Node(node), nil },
			Crash: func(_ context.Context, node uint32) error {
				ic.Crash(node)
				return nil
			},
			QueueWaiter:   ic,
			ResourceCount: ic.ResourceCount,
		})
	}()
	conn, err := net.Dial("unix", path)
	require.NoError(tb, err)
	client, err := lockagent.NewClient(conn)
	require.NoError(tb, err)
	tb.Cleanup(func() {
		client.Close()
		cancel()
		require.NoError(tb, <-served)
	})
	nodes := map[uint32]lockagent.Placement{}
	for id := uint32(1); id <= 8; id++ {
		nodes[id] = lockagent.Placement{Client: client, Node: id}
	}
	return &proxied{Cluster: lockagent.NewCluster(tb, nodes), client: client}
}

// TestConformance runs the conformance suite over the proxy: a lockagent
// client in front of a server in front of the inproc engine must pass it
// in its strict form, as inproc does directly.
func TestConformance(t *testing.T) {
	locktest.Run(t, locktest.Harness{
		Name:       "lockagent-inproc",
		NewCluster: func(tb testing.TB) locktest.Cluster { return newProxied(tb) },
	})
}
