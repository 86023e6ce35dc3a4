package etcdtest_test

import (
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc/etcd"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// The conformance suite passes on LockClusters of lockc/etcd engines that
// share one embedded server, crashes included: Crash returns only once the
// other nodes have seen the crashed node's locks go.
func TestLockClusterConformance(t *testing.T) {
	endpoints := etcdtest.Start(t, 1).Endpoints()
	locktest.Run(t, locktest.Harness{
		Name: "etcdtest",
		NewCluster: func(tb testing.TB) locktest.Cluster {
			return etcdtest.NewLockCluster(tb, func(prefix string) (etcdtest.Engine, error) {
				// Short leases, so that a crashed node's locks go in seconds.
				return etcd.New(etcd.Options{Endpoints: endpoints, Prefix: prefix, TTL: 2 * time.Second, Margin: 500 * time.Millisecond})
			})
		},
	})
}
