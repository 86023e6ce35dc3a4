package clusterized_test

import (
	"testing"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/etcd"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// etcdClusterOn returns a new cluster of lockc/etcd engines, with the
// engine's default options, on the etcd server at endpoints, under a key
// prefix of its own.
func etcdClusterOn(tb testing.TB, endpoints []string) *etcdtest.LockCluster {
	return etcdtest.NewLockCluster(tb, func(prefix string) (etcdtest.Engine, error) {
		return etcd.New(etcd.Options{Endpoints: endpoints, Prefix: prefix})
	})
}

// newEtcdCluster is a cluster of lockc/etcd engines on an embedded etcd
// server of its own (a unix socket), stopped at tb's cleanup.
func newEtcdCluster(tb testing.TB) locktest.Cluster {
	return etcdClusterOn(tb, etcdtest.Start(tb, 1).Endpoints())
}

// etcdLocks starts an embedded etcd server, stopped at tb's cleanup, and
// returns lock engines on it (each one node of a cluster of its own) and
// the server.
func etcdLocks(tb testing.TB) (newLocks, *etcdtest.Cluster) {
	server := etcdtest.Start(tb, 1)
	endpoints := server.Endpoints()
	return func(tb testing.TB) lockc.Engine { return etcdClusterOn(tb, endpoints).Node(1) }, server
}

// reportEtcdWrites runs bench and reports how many writes server committed
// per operation ("etcd-writes/op"), setting up stores included: each is a
// lock request, conversion or unlock that had to wait for etcd.
func reportEtcdWrites(b *testing.B, server *etcdtest.Cluster, bench func(b *testing.B)) {
	rev := server.Revision(0)
	bench(b)
	b.ReportMetric(float64(server.Revision(0)-rev)/float64(b.N), "etcd-writes/op")
}
