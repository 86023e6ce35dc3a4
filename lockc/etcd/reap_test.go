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

// A request whose answer was lost can commit after its operation moved on.
// These tests make such late commits by hand, in a node's name and under
// its lease, and check that the node undoes them: otherwise the other
// node's request below would wait for as long as the first node lives.
func TestStrayChangesAreUndone(t *testing.T) {
	c := newTestCluster(t, etcdtest.Start(t, 1).Endpoints(), testOptions())
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	open := func(id uint32) *lockspace {
		ls, err := c.Node(id).Open(ctx, "strays")
		require.NoError(t, err)
		return ls.(*lockspace)
	}
	a, b := open(1), open(2)

	t.Run("waiting request of no lock", func(t *testing.T) {
		k := a.keys.keysOf([]byte("r1"))
		stray := k.lock(a.lockPrefix() + "999")
		_, err := c.admin.Put(ctx, stray, entry{rq: lockc.EX, node: a.node, seq: 1}.encode(), clientv3.WithLease(a.lease))
		require.NoError(t, err)
		l, err := b.Lock(ctx, []byte("r1"), lockc.EX)
		require.NoError(t, err, "the stray request ahead of it is gone")
		g, err := c.admin.Get(ctx, stray)
		require.NoError(t, err)
		require.Empty(t, g.Kvs)
		require.NoError(t, l.Unlock(ctx))
	})

	t.Run("late commit seen while the lock was busy", func(t *testing.T) {
		l, err := a.Lock(ctx, []byte("r3"), lockc.NL)
		require.NoError(t, err)
		al := l.(*lock)
		// The stray arrives while an operation runs on the lock: the
		// watch cannot tell it from the operation's own change, so it
		// is judged when the operation ends.
		a.mu.Lock()
		al.busy = true
		a.mu.Unlock()
		_, err = c.admin.Txn(ctx).Then(
			clientv3.OpPut(al.key, entry{held: true, granted: lockc.EX, rq: lockc.EX, node: a.node, seq: 98}.encode(), clientv3.WithLease(a.lease)),
			clientv3.OpPut(al.keys.writer(al.name), "")).Commit()
		require.NoError(t, err)
		require.NoError(t, a.e.Sync(ctx, "strays"))
		al.idle()
		bl, err := b.Lock(ctx, []byte("r3"), lockc.EX)
		require.NoError(t, err, "the stray EX went back to NL when the operation ended")
		require.NoError(t, bl.Unlock(ctx))
		require.NoError(t, al.Unlock(ctx))
	})

	t.Run("grant a lock never got", func(t *testing.T) {
		l, err := a.Lock(ctx, []byte("r2"), lockc.NL)
		require.NoError(t, err)
		al := l.(*lock)
		_, err = c.admin.Txn(ctx).Then(
			clientv3.OpPut(al.key, entry{held: true, granted: lockc.EX, rq: lockc.EX, node: a.node, seq: 99}.encode(), clientv3.WithLease(a.lease)),
			clientv3.OpPut(al.keys.writer(al.name), "")).Commit()
		require.NoError(t, err)
		bl, err := b.Lock(ctx, []byte("r2"), lockc.EX)
		require.NoError(t, err, "the stray EX went back to the NL the lock holds")
		require.Equal(t, lockc.NL, al.Mode())
		require.NoError(t, bl.Unlock(ctx))
		// The lock still works: its releases find its key.
		require.NoError(t, al.Convert(ctx, lockc.EX))
		require.NoError(t, al.Unlock(ctx))
	})
}
