package etcd

import (
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
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

// The conformance suite passes on the etcd server Debian ships (etcd-server,
// an older release built by someone else), three member processes, whose
// leader is killed with SIGKILL in the middle of the Linearizable sub-test
// (nodes crashing while others count under EX), so that requests are in
// flight when it dies; Isolation and Soak then run on the two members
// left. The nodes' clients fail over to the other members, and requests
// whose answer was lost are resolved by reading the lock's entry. The
// lease is longer than an election, so no node fences itself while the
// cluster elects a new leader. (The kill is in a sub-test whose bounds
// allow an election: the ordering sub-tests bound how soon a released
// lock must be granted.)
func TestConformanceBinaryMemberKilled(t *testing.T) {
	if _, err := os.Stat(etcdtest.BinaryPath); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s: %v (apt-get install etcd-server)", etcdtest.BinaryPath, err)
		}
		t.Skipf("%s: %v (apt-get install etcd-server)", etcdtest.BinaryPath, err)
	}
	c := etcdtest.StartBinaryCluster(t, etcdtest.BinaryPath, 3)
	t.Logf("etcd %s, members at %v", c.Version, c.Endpoints())
	// Opens and renewals wait out the election: a node opened while
	// the cluster has no leader must not give up.
	o := Options{TTL: 10 * time.Second, Margin: 2 * time.Second, DialTimeout: 30 * time.Second}
	var killed atomic.Bool
	h := locktest.Harness{
		Name: "etcd-binary-3-members",
		NewCluster: func(tb testing.TB) locktest.Cluster {
			if strings.HasSuffix(tb.Name(), "/Linearizable") {
				leader, err := c.Leader(tb.Context())
				if err != nil {
					tb.Fatal(err)
				}
				tb.Logf("killing member %d (the leader) a second into this sub-test", leader)
				timer := time.AfterFunc(time.Second, func() {
					c.Kill(leader)
					killed.Store(true)
				})
				tb.Cleanup(func() { timer.Stop() })
			}
			return newTestCluster(tb, c.Endpoints(), o)
		},
	}
	locktest.Run(t, h)
	if !killed.Load() {
		t.Error("no member was killed during the suite")
	}
}
