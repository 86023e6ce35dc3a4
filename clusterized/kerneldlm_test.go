package clusterized_test

import (
	"testing"

	"github.com/clustersnap/clustersnap/clusterized/clustertest"
	"github.com/clustersnap/clustersnap/lockc/dlm/dlmtest"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// newDLMCluster is a cluster of simulated nodes on this kernel's DLM, one
// lockspace file per node (dlmtest); it skips the test outside a guest.
func newDLMCluster(tb testing.TB) locktest.Cluster { return dlmtest.NewCluster(tb) }

// TestMultiNodeKernelDLM runs the multi-node checker (package
// clustertest) on the kernel DLM, with crash runs (a node's lockspace
// files closed: the kernel force-unlocks and invalidates the LVB under
// its EX). It runs in a guest (test/dlm) and skips elsewhere.
func TestMultiNodeKernelDLM(t *testing.T) {
	clustertest.Run(t, kernelDLMHarness())
}

// kernelDLMHarness runs the suite on the kernel DLM.
func kernelDLMHarness() clustertest.Harness {
	return clustertest.Harness{
		Name:       "kernel-dlm",
		NewCluster: newDLMCluster,
		// The kernel reports an invalidated LVB only once the resource
		// has held a value.
		UnwrittenInvalidIsUnknown: true,
		Inspector:                 inspector(),
	}
}
