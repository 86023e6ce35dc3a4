package clustertest

import (
	"testing"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// Harness describes the lock engine the suite runs the clusterized store
// on, and, for the suite's own self-test only, deliberate bugs to plant.
type Harness struct {
	// Name names the engine in test output.
	Name string
	// NewCluster returns the cluster for one check (nodes 1 to 3); the
	// harness registers its own cleanup on tb. It may return the same
	// cluster every time (a cluster of guests costs too much to boot per
	// check): every check uses cluster ids, and so lock resources, of its
	// own. A node crashed by one check must be able to open lockspaces
	// again in the next, as locktest.Crasher promises. The crash runs of
	// CheckMultiNode need the cluster to be a locktest.Crasher, and skip
	// otherwise.
	NewCluster func(tb testing.TB) locktest.Cluster
	// UnwrittenInvalidIsUnknown says that the engine reports the LVB of a
	// resource that never held a published value as Unknown where it was
	// invalidated (a PW or EX holder died), as the kernel DLM does (see
	// locktest.Harness's field of the same name). A crash run whose victim
	// dies before any node published a counter then requires the
	// survivors to re-read the metadata, instead of requiring them to see
	// the LVB invalid. Strict engines (inproc) leave it false.
	UnwrittenInvalidIsUnknown bool
	// Inspector looks inside a node's store where the clusterized
	// package shows it only to its own tests.
	Inspector Inspector

	// WrapCore, if set, returns what node id's store uses as its core in
	// place of core, for its first core and every full reload's. The
	// result must keep every capability of core it does not mean to
	// break (embedding core does).
	WrapCore func(id uint32, core Core) exstore.Store
	// WrapEngineStore, if set, returns what node id's COW engine uses in
	// place of s, its clustered store's Exstore (a
	// *clusterized.LazyStore). CheckMultiNode needs the result to be an
	// exstore.LazyCommitter still.
	WrapEngineStore func(id uint32, s exstore.Store) exstore.Store
}

// Inspector gives the suite what a node's store shows only to the tests of
// package clusterized (its export_test.go). A nil function skips the check
// that needs it; the clusterized package's own run sets both.
type Inspector struct {
	// LazyWaitingOutsideEX reports whether lazily committed exceptions
	// wait to be written while s does not hold EX, which must never be.
	LazyWaitingOutsideEX func(s *clusterized.Store) bool
	// UsersInside is the number of users s's gate counts inside.
	UsersInside func(s *clusterized.Store) uint64
}

// workloadLead is the Workloads' Workload.Lead: a node's three workers
// may run a few operations each ahead of the other nodes.
const workloadLead = 24

// Workloads returns the runs of CheckMultiNode that Run makes.
func Workloads() []Workload {
	return []Workload{
		{Name: "no crash", Seed: 1, Lead: workloadLead},
		{Name: "crash", Seed: 2, Crash: true, Lead: workloadLead},
		{Name: "crash 2", Seed: 3, Crash: true, Lead: workloadLead},
		{Name: "same node", Seed: 4, SameNode: true, Lead: workloadLead},
	}
}

// Run runs every check of the suite against h, each as a sub-test named
// after h.Name and the check.
func Run(t *testing.T, h Harness) {
	t.Run(h.Name, func(t *testing.T) {
		t.Run("MultiNode", func(t *testing.T) {
			for _, w := range Workloads() {
				t.Run(w.Name, func(t *testing.T) { CheckMultiNode(t, h, w) })
			}
		})
		t.Run("OptimisticRead", func(t *testing.T) {
			t.Run("one chunk", func(t *testing.T) { CheckOptimisticRead(t, h, 1) })
			t.Run("window", func(t *testing.T) { CheckOptimisticRead(t, h, 3) })
		})
		t.Run("PrepareAdmission", func(t *testing.T) { CheckPrepareAdmission(t, h) })
		t.Run("DrainWaitsForUnsettled", func(t *testing.T) { CheckDrainWaitsForUnsettled(t, h) })
		t.Run("OtherNodesExceptionsSeen", func(t *testing.T) { CheckOtherNodesExceptionsSeen(t, h) })
	})
}
