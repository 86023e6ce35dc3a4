package clusterized_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/lockc/locktest"
	"github.com/clustersnap/clustersnap/persistent"
)

// The Engine benchmarks run the same store operations on the wrapper over
// each lock engine: BenchmarkEngine on each engine alone, and
// BenchmarkEngineRatio on the in-process engine and each other engine
// alternately (as the Ratio benchmarks do), reporting the other engine's
// throughput relative to the in-process engine's. The cached-lock
// operations touch no lock engine once the node holds its lock, so their
// ratio says what a cached lock costs on that engine; Alternating moves EX
// between two nodes on every operation, for contrast. The kernel DLM runs
// only in a guest (dlmtest.NewCluster skips elsewhere); etcd is an
// embedded server per cluster, on a unix socket.

// lockEngine is a lock engine the Engine benchmarks run the wrapper on.
type lockEngine struct {
	name       string
	newCluster func(tb testing.TB) locktest.Cluster
}

func inprocEngine() lockEngine {
	return lockEngine{"inproc", func(testing.TB) locktest.Cluster { return inproc.NewCluster() }}
}

// engineOp is an operation of the Engine benchmarks, set up on a fresh
// cluster of an engine.
type engineOp struct {
	name string
	op   func(b *testing.B, cluster locktest.Cluster) ratioOp
}

// engineCOWBytes is the size of the Engine benchmarks' COW devices: small
// enough for two of them in a guest's memory; a full store is replaced by
// a fresh one, untimed.
const engineCOWBytes = 32 << 20

func engineOps() []engineOp {
	return []engineOp{
		{"PrepareCommit", enginePrepareCommitOp},
		{"LookupMiss", engineLookupMissOp},
		{"SnapshotRead", engineSnapshotReadOp},
		{"Alternating", engineAlternatingOp},
	}
}

// engineNode opens node id's wrapper of cluster clusterID on dev (formatted
// by the caller), through cluster. The caller closes it: a store replaced
// when full must not stay reachable, with its device, until the benchmark
// ends (a guest has little memory).
func engineNode(b *testing.B, cluster locktest.Cluster, id uint32, dev *memDevice, clusterID string) *clusterized.Store {
	b.Helper()
	s, err := openPersistent(context.Background(), dev, cluster.Node(id), clusterID)
	require.NoError(b, err)
	return s
}

// engineStore returns the wrapper (its Exstore) of node 1 of cluster on a
// fresh COW of engineCOWBytes, its lock cached in EX (warmStore), under a
// cluster id of its own: an engine may keep a released resource's LVB.
// The caller closes it.
func engineStore(b *testing.B, cluster locktest.Cluster) exstore.Store {
	b.Helper()
	dev := newMemDevice("cow", engineCOWBytes)
	formatCOW(b, dev, benchChunkSectors)
	s := engineNode(b, cluster, 1, dev, benchClusterID()).Exstore()
	warmStore(b, s)
	return s
}

func benchClusterID() string { return fmt.Sprintf("bench-%08x", rand.Uint32()) }

// enginePrepareCommitOp prepares and commits an exception under the cached
// EX (a metadata write each).
func enginePrepareCommitOp(b *testing.B, cluster locktest.Cluster) ratioOp {
	capacity := persistent.NewGeometry(benchChunkSectors, engineCOWBytes).Capacity()
	s := engineStore(b, cluster)
	b.Cleanup(func() { _ = s.Close() }) // the last store
	used := uint64(0)
	ctx := context.Background()
	return ratioOp{
		prepare: func(_, n int) {
			if used+uint64(n) >= capacity {
				_ = s.Close()
				s = engineStore(b, cluster)
				used = 0
			}
		},
		run: func(int) {
			e, err := s.Prepare(ctx, exstore.Chunk(used))
			if err != nil {
				b.Fatal(err)
			}
			if err := s.Commit(ctx, e); err != nil {
				b.Fatal(err)
			}
			used++
		},
	}
}

// engineLookupMissOp looks up chunks that have no exception, entering in
// the cached lock, and releases the answer.
func engineLookupMissOp(b *testing.B, cluster locktest.Cluster) ratioOp {
	s := engineStore(b, cluster)
	b.Cleanup(func() { _ = s.Close() })
	return lookupOp(b, s, 1<<20, 4096)
}

// engineSnapshotReadOp reads 4 KiB through the COW engine, chunks
// alternately from the COW and from the origin (memory devices), the
// lookups optimistic under the cached lock.
func engineSnapshotReadOp(b *testing.B, cluster locktest.Cluster) ratioOp {
	const chunks = 1024
	dev := newMemDevice("cow", engineCOWBytes)
	formatCOW(b, dev, benchChunkSectors)
	s := engineNode(b, cluster, 1, dev, benchClusterID())
	b.Cleanup(func() { _ = s.Close() })
	origin := cow.NewOrigin(newMemDevice("origin", chunks*4096))
	snap, err := origin.AddSnapshot("snap", s.Exstore(), dev, cow.SnapshotOptions{})
	require.NoError(b, err)
	ctx := context.Background()
	p := make([]byte, 4096)
	for c := 0; c < chunks; c += 2 {
		require.NoError(b, origin.WriteAt(ctx, p, int64(c)*4096, false))
	}
	require.NoError(b, snap.Flush(ctx))
	return ratioOp{run: func(i int) {
		if err := snap.ReadAt(ctx, p, int64(i%chunks)*4096); err != nil {
			b.Fatal(err)
		}
	}}
}

// engineAlternatingOp has two nodes take turns preparing and committing an
// exception, so that every operation moves EX to the other node: a
// blocking notification, a down-conversion and an up-conversion with the
// LVB, and a refresh.
func engineAlternatingOp(b *testing.B, cluster locktest.Cluster) ratioOp {
	capacity := persistent.NewGeometry(benchChunkSectors, engineCOWBytes).Capacity()
	var nodes [2]*clusterized.Store
	setup := func() {
		for _, s := range nodes {
			if s != nil {
				_ = s.Close()
			}
		}
		dev := newMemDevice("cow", engineCOWBytes)
		formatCOW(b, dev, benchChunkSectors)
		id := benchClusterID()
		for i := range nodes {
			nodes[i] = engineNode(b, cluster, uint32(i+1), dev, id)
		}
	}
	setup()
	b.Cleanup(func() { // the last pair
		for _, s := range nodes {
			_ = s.Close()
		}
	})
	used := uint64(0)
	ctx := context.Background()
	return ratioOp{
		prepare: func(_, n int) {
			if used+uint64(n) >= capacity {
				setup()
				used = 0
			}
		},
		run: func(i int) {
			s := nodes[i%2]
			e, err := s.Prepare(ctx, exstore.Chunk(used))
			if err != nil {
				b.Fatal(err)
			}
			if err := s.Commit(ctx, e); err != nil {
				b.Fatal(err)
			}
			used++
		},
	}
}

// runOp times op.run(i) for i in [0, b.N), calling op.prepare, untimed,
// before each slice of ratioSlice operations.
func runOp(b *testing.B, op ratioOp) {
	b.ResetTimer()
	for done := 0; done < b.N; done += ratioSlice {
		n := min(ratioSlice, b.N-done)
		if op.prepare != nil {
			b.StopTimer()
			op.prepare(done, n)
			b.StartTimer()
		}
		for i := range n {
			op.run(done + i)
		}
	}
}

// BenchmarkEngine runs each operation on each engine alone.
func BenchmarkEngine(b *testing.B) {
	for _, e := range lockEngines() {
		b.Run(e.name, func(b *testing.B) {
			for _, o := range engineOps() {
				b.Run(o.name, func(b *testing.B) { runOp(b, o.op(b, e.newCluster(b))) })
			}
		})
	}
}

// BenchmarkEngineRatio runs each operation on the in-process engine and on
// each other engine alternately (BenchmarkEngineRatio/ENGINE/OPERATION);
// throughput-ratio is the other engine's throughput relative to the
// in-process engine's.
func BenchmarkEngineRatio(b *testing.B) {
	engines := lockEngines()
	ref := engines[0]
	for _, e := range engines[1:] {
		b.Run(e.name, func(b *testing.B) {
			for _, o := range engineOps() {
				b.Run(o.name, func(b *testing.B) {
					sides := [2]ratioOp{o.op(b, ref.newCluster(b)), o.op(b, e.newCluster(b))}
					runRatioOf(b, [2]string{ref.name, e.name}, sides)
				})
			}
		})
	}
}

// lockEngines are the engines the Engine benchmarks run on: the
// in-process engine first (BenchmarkEngineRatio's reference), the kernel
// DLM (in a guest only) and etcd.
func lockEngines() []lockEngine {
	return []lockEngine{inprocEngine(), {"dlm", newDLMCluster}, {"etcd", newEtcdCluster}}
}
