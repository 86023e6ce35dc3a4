package clusterized_test

import (
	"testing"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/clusterized/clustertest"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// inspector is what the suite may see of a store through export_test.go.
func inspector() clustertest.Inspector {
	return clustertest.Inspector{
		LazyWaitingOutsideEX: (*clusterized.Store).LazyWaitingOutsideEX,
		UsersInside:          (*clusterized.Store).UsersInside,
	}
}

// inprocHarness runs the suite on the in-process engine.
func inprocHarness() clustertest.Harness {
	return clustertest.Harness{
		Name:       "inproc",
		NewCluster: func(testing.TB) locktest.Cluster { return inproc.NewCluster() },
		Inspector:  inspector(),
	}
}

// TestMultiNode runs the multi-node checker (package clustertest) on the
// in-process engine.
func TestMultiNode(t *testing.T) {
	clustertest.Run(t, inprocHarness())
}
