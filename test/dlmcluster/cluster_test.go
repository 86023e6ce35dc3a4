package dlmcluster

import (
	"context"
	"testing"
	"time"

	"github.com/clustersnap/clustersnap/clusterized/clustertest"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// clusterTimeout bounds the whole cluster test, guests included.
const clusterTimeout = 8 * time.Minute

// TestCluster boots three guests once and runs, in order, the conformance
// suite across them, the clusterizer's multi-node checker on their locks,
// and the cross-node tests; the tests that kill or cut off a guest come
// last.
func TestCluster(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), clusterTimeout)
	defer cancel()
	start := time.Now()
	rm := Start(ctx, t, Options{})
	t.Logf("three guests quorate, agents connected after %v", time.Since(start).Round(time.Second))
	defer func() {
		if t.Failed() {
			t.Logf("the guests' DLM state:\n%s", rm.Info(ctx, "locktest"))
		}
	}()

	t.Run("Suite", func(t *testing.T) {
		locktest.Run(t, locktest.Harness{
			Name:                      "dlm-3guests",
			NewCluster:                func(tb testing.TB) locktest.Cluster { return rm.LockCluster(tb, 4) },
			UnwrittenInvalidIsUnknown: true,
		})
	})
	t.Logf("suite done after %v", time.Since(start).Round(time.Second))

	// The clusterizer's multi-node checker with its nodes' locks on three
	// kernels (one node per guest; a crash is a process crash there, through
	// lockagent), the shared devices in this process.
	t.Run("Clusterizer", func(t *testing.T) {
		clustertest.Run(t, clustertest.Harness{
			Name:                      "dlm-3guests",
			NewCluster:                func(tb testing.TB) locktest.Cluster { return rm.LockCluster(tb, 3) },
			UnwrittenInvalidIsUnknown: true,
		})
	})
	t.Logf("clusterizer checks done after %v", time.Since(start).Round(time.Second))

	x := newXnode(ctx, t, rm)
	for _, tc := range []struct {
		name string
		run  func(*xnode)
	}{
		{"RemoteMastering", testRemoteMastering},
		{"LVBAcrossGuests", testLVBAcrossGuests},
		{"BlockingAcrossGuests", testBlockingAcrossGuests},
		{"RoundTrips", testRoundTrips},
		{"KillGuest", testKillGuest},
		{"Partition", testPartition},
	} {
		ok := t.Run(tc.name, func(t *testing.T) {
			x.t = t
			tc.run(x)
		})
		t.Logf("%s done after %v", tc.name, time.Since(start).Round(time.Second))
		if !ok && (tc.name == "KillGuest") {
			return // the partition needs three working guests
		}
	}
}
