package etcd

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
)

// A node whose watch comes back after etcd compacted away the events it
// missed (here: the release of the lock it waits for) starts over from
// the current revision and looks again: the waiting request is granted.
// Without that, it would wait for an event that etcd no longer has.
func TestWatchCompactedWhileAway(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	server := etcdtest.Start(t, 1)
	proxy := etcdtest.NewProxy(t, server.Endpoint(0))
	// A long lease: the node behind the proxy must not fence itself
	// while it is cut off.
	o := Options{TTL: 20 * time.Second, Margin: 2 * time.Second}
	c := newTestCluster(t, server.Endpoints(), o)
	oB := c.o
	oB.Endpoints = []string{proxy.Endpoint()}
	eB, err := New(oB)
	require.NoError(t, err)
	t.Cleanup(func() { eB.Close() })
	t.Cleanup(proxy.Heal)

	a, err := c.Node(1).Open(ctx, "compact")
	require.NoError(t, err)
	b, err := eB.Open(ctx, "compact")
	require.NoError(t, err)
	la, err := a.Lock(ctx, []byte("r"), lockc.EX)
	require.NoError(t, err)
	waiting := make(chan error, 1)
	go func() {
		lb, err := b.Lock(ctx, []byte("r"), lockc.EX)
		if err == nil {
			err = lb.Unlock(ctx)
		}
		waiting <- err
	}()
	require.NoError(t, c.WaitQueueLen(ctx, "compact", []byte("r"), 0, 1))

	// B hears nothing from now on; A releases, and etcd forgets the
	// events B missed.
	proxy.Cut()
	require.NoError(t, la.Unlock(ctx))
	r, err := c.admin.Put(ctx, c.o.Prefix+"filler", "")
	require.NoError(t, err)
	_, err = c.admin.Compact(ctx, r.Header.Revision, clientv3.WithCompactPhysical())
	require.NoError(t, err)
	// B's connection fails and comes back: its watch resumes from a
	// compacted revision.
	proxy.Reset()
	proxy.Heal()
	select {
	case err := <-waiting:
		require.NoError(t, err, "B is granted the lock A released while B was away")
	case <-ctx.Done():
		t.Fatal("B still waits for the lock A released while B was away")
	}
	require.NoError(t, b.Err(), "B's membership survived the failure")
}
