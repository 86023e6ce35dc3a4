package dlm_test

import (
	"testing"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/dlm/dlmtest"
	"github.com/clustersnap/clustersnap/lockc/locktest"
)

// harness runs the conformance suite on this kernel's DLM.
func harness() locktest.Harness {
	return locktest.Harness{
		Name:       "dlm",
		NewCluster: func(tb testing.TB) locktest.Cluster { return dlmtest.NewCluster(tb) },
		// The kernel reports an invalidated LVB only once the resource
		// has held a value (see the field).
		UnwrittenInvalidIsUnknown: true,
	}
}

// The conformance suite passes on the kernel DLM (in a guest: test/dlm).
func TestConformance(t *testing.T) { locktest.Run(t, harness()) }

func BenchmarkCachedConvert(b *testing.B) { locktest.BenchmarkCachedConvert(b, harness()) }

func BenchmarkUncachedNL(b *testing.B) { locktest.BenchmarkUncached(b, harness(), lockc.NL) }

func BenchmarkUncachedEX(b *testing.B) { locktest.BenchmarkUncached(b, harness(), lockc.EX) }

func BenchmarkPingPong(b *testing.B) { locktest.BenchmarkPingPong(b, harness()) }
