package clusterized_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// contendedChunks is the origin size of the contended benchmarks, in 4 KiB
// chunks: every origin write of a run goes to a chunk of its own.
const contendedChunks = 32768

// contendedSetup is one shared origin and COW served by two writers: two
// nodes of one cluster (each its own clustered store and COW engine over
// the shared devices), or, bare, one persistent store and engine that both
// writers share.
type contendedSetup struct {
	origins [2]*cow.Origin
	snaps   [2]*cow.Snapshot
	engine  *inproc.Cluster // nil when bare
}

func newContendedSetup(b *testing.B, clustered bool) *contendedSetup {
	ctx := context.Background()
	origin := newMemDevice("origin", contendedChunks*4096)
	cowDev := newMemDevice("cow", (contendedChunks+contendedChunks/256+8)*4096)
	formatCOW(b, cowDev, benchChunkSectors)
	s := &contendedSetup{}
	if !clustered {
		st, err := persistent.Open(ctx, cowDev, persistent.Options{NoFormat: true, Logger: quietLogger()})
		require.NoError(b, err)
		b.Cleanup(func() { _ = st.Close() })
		o := cow.NewOrigin(origin)
		snap, err := o.AddSnapshot("snap", st, cowDev, cow.SnapshotOptions{})
		require.NoError(b, err)
		s.origins, s.snaps = [2]*cow.Origin{o, o}, [2]*cow.Snapshot{snap, snap}
		return s
	}
	s.engine = inproc.NewCluster()
	for i := range s.origins {
		cs, err := openPersistent(ctx, cowDev, s.engine.Node(uint32(i+1)), "contended")
		require.NoError(b, err)
		b.Cleanup(func() { _ = cs.Close() })
		s.origins[i] = cow.NewOrigin(origin)
		s.snaps[i], err = s.origins[i].AddSnapshot("snap", cs.Exstore(), cowDev, cow.SnapshotOptions{})
		require.NoError(b, err)
	}
	return s
}

// lockOps counts the lock engine's round trips of both nodes so far.
func (s *contendedSetup) lockOps() uint64 {
	if s.engine == nil {
		return 0
	}
	var n uint64
	for id := uint32(1); id <= 2; id++ {
		st := s.engine.Stats(id)
		n += st.Requests + st.Converts + st.Unlocks
	}
	return n
}

// BenchmarkContendedTwoNodes runs two writers at once over one origin and
// COW, as two nodes of a cluster and, for comparison, as two goroutines of
// one bare node, and reports both costs per operation, their ratio
// (bare/clustered throughput) and the clustered lock round trips per
// operation. Unlike the Ratio benchmarks (one node, its lock cached in EX),
// the nodes here take the lock from each other:
//   - first-writes: both nodes write the origin, each a chunk no one wrote
//     yet (node 1 the even ones, node 2 the odd ones): every write copies
//     and commits under EX, which moves between the nodes;
//   - write-and-read: node 1 writes the origin as above while node 2 reads
//     the snapshot: EX against CR.
func BenchmarkContendedTwoNodes(b *testing.B) {
	for _, wl := range []string{"first-writes", "write-and-read"} {
		b.Run(wl, func(b *testing.B) {
			if b.N > contendedChunks {
				b.Skipf("%d writes do not fit in the origin", b.N)
			}
			var took [2]time.Duration
			var lockOps uint64
			for side, clustered := range []bool{false, true} {
				b.StopTimer()
				s := newContendedSetup(b, clustered)
				before := s.lockOps()
				b.StartTimer()
				t0 := time.Now()
				runContended(b, s, wl)
				took[side] = time.Since(t0)
				lockOps = s.lockOps() - before
			}
			b.ReportMetric(float64(took[0].Nanoseconds())/float64(b.N), "bare-ns/op")
			b.ReportMetric(float64(took[1].Nanoseconds())/float64(b.N), "clustered-ns/op")
			b.ReportMetric(float64(took[0])/float64(took[1]), "throughput-ratio")
			b.ReportMetric(float64(lockOps)/float64(b.N), "lockops/op")
		})
	}
}

// runContended does b.N operations of workload wl on s, split between the
// two writers running at once.
func runContended(b *testing.B, s *contendedSetup, wl string) {
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Go(func() {
			p := make([]byte, 4096)
			for i := w; i < b.N; i += 2 {
				var err error
				if wl == "write-and-read" && w == 1 {
					err = s.snaps[1].ReadAt(ctx, p, int64(i-1)*4096)
				} else {
					err = s.origins[w].WriteAt(ctx, p, int64(i)*4096, false)
				}
				if err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
}
