package etcd

import (
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// testOptions give a lease long enough that a test binary starved of CPU
// (-race, other tests beside it) never misses a renewal: no sub-test waits
// for a lease to expire (Crash revokes it).
func testOptions() Options { return Options{TTL: 5 * time.Second, Margin: time.Second} }

// The conformance suite passes on an embedded etcd server.
func TestConformanceEmbedded(t *testing.T) {
	locktest.Run(t, harness("etcd-embedded", etcdtest.Start(t, 1).Endpoints(), testOptions()))
}

// The conformance suite passes on a three-member embedded cluster whose
// leader is stopped in the middle of the Linearizable sub-test (nodes
// crashing while others count under EX), so that requests are in flight
// when it goes; Isolation and Soak then run on the two members left. The
// nodes' clients fail over to the other members, and requests whose answer
// was lost are resolved by reading the lock's entry. The lease is longer
// than an election, so no node fences itself while the cluster elects a
// new leader. (The stop is in a sub-test whose bounds allow an election:
// the ordering sub-tests bound how soon a released lock must be granted.)
func TestConformanceMemberStopped(t *testing.T) {
	if testing.Short() {
		t.Skip("three etcd members and an election: not in -short")
	}
	c := etcdtest.Start(t, 3)
	// Opens and renewals wait out the election: a node opened while
	// the cluster has no leader must not give up.
	o := Options{TTL: 10 * time.Second, Margin: 2 * time.Second, DialTimeout: 30 * time.Second}
	var stopped atomic.Bool
	h := locktest.Harness{
		Name: "etcd-3-members",
		NewCluster: func(tb testing.TB) locktest.Cluster {
			if strings.HasSuffix(tb.Name(), "/Linearizable") {
				leader := c.Leader()
				tb.Logf("stopping member %d (the leader) a second into this sub-test", leader)
				timer := time.AfterFunc(time.Second, func() {
					c.Stop(leader)
					stopped.Store(true)
				})
				tb.Cleanup(func() { timer.Stop() })
			}
			return newTestCluster(tb, c.Endpoints(), o)
		},
	}
	locktest.Run(t, h)
	if !stopped.Load() {
		t.Error("no member was stopped during the suite")
	}
}

// The conformance suite passes on the etcd server Debian ships
// (etcd-server, an older release built by someone else).
func TestConformanceBinary(t *testing.T) {
	if _, err := os.Stat(etcdtest.BinaryPath); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s: %v (apt-get install etcd-server)", etcdtest.BinaryPath, err)
		}
		t.Skipf("%s: %v (apt-get install etcd-server)", etcdtest.BinaryPath, err)
	}
	b := etcdtest.StartBinary(t, etcdtest.BinaryPath)
	t.Logf("etcd %s at %s", b.Version, b.Endpoint)
	locktest.Run(t, harness("etcd-binary", []string{b.Endpoint}, testOptions()))
}
