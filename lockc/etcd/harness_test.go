package etcd

import (
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// testCluster is an etcdtest.LockCluster of this package's engines, with
// the options its nodes use (their Prefix included, for engines a test
// makes beside the cluster's) and a client of its own to look at etcd.
type testCluster struct {
	*etcdtest.LockCluster
	o     Options
	admin *clientv3.Client
}

// newTestCluster returns a cluster on endpoints whose engines use o.
func newTestCluster(tb testing.TB, endpoints []string, o Options) *testCluster {
	admin, err := clientv3.New(clientv3.Config{Endpoints: endpoints, Logger: quietLogger()})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { admin.Close() })
	o.Endpoints = endpoints
	c := &testCluster{admin: admin}
	c.LockCluster = etcdtest.NewLockCluster(tb, func(prefix string) (etcdtest.Engine, error) {
		o := o
		o.Prefix = prefix
		return New(o)
	})
	o.Prefix = c.Prefix()
	c.o = o
	return c
}

// harness runs the conformance suite on the etcd cluster at endpoints;
// each sub-test's nodes use a key prefix of their own.
func harness(name string, endpoints []string, o Options) locktest.Harness {
	return locktest.Harness{
		Name: name,
		NewCluster: func(tb testing.TB) locktest.Cluster {
			return newTestCluster(tb, endpoints, o)
		},
	}
}
