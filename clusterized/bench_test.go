package clusterized_test

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// The benchmarks compare the wrapper, uncontended on a one-node engine
// with its lock cached, with the bare persistent store on the same kind of
// device: the wrapper should cost under 5%. These run each side on its own
// and from parallel goroutines; the Ratio benchmarks (ratio_bench_test.go)
// alternate the two sides and report their ratio, for serial work.

const benchChunkSectors = 8 // 4 KiB chunks

// memDevice is a plain in-memory device for benchmarks: faultdev keeps
// every unsynced version of every sector, which would dominate them.
type memDevice struct {
	name string
	mu   sync.RWMutex
	b    []byte
}

// newMemDevice returns a zeroed device of size bytes, its memory faulted
// in: otherwise the first write to each page takes a page fault (a huge
// page's costs hundreds of microseconds to clear), which the benchmark
// would time, and which side gets huge pages differs from run to run.
func newMemDevice(name string, size int64) *memDevice {
	b := make([]byte, size)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 0
	}
	return &memDevice{name: name, b: b}
}

func (d *memDevice) ReadAt(p []byte, off int64) (int, error) {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if off < 0 || off+int64(len(p)) > int64(len(d.b)) {
		return 0, io.EOF
	}
	return copy(p, d.b[off:]), nil
}

func (d *memDevice) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off < 0 || off+int64(len(p)) > int64(len(d.b)) {
		return 0, io.ErrShortWrite
	}
	return copy(d.b[off:], p), nil
}

func (d *memDevice) WriteAtSync(p []byte, off int64) (int, error) { return d.WriteAt(p, off) }
func (d *memDevice) Name() string                                 { return d.name }
func (d *memDevice) Size() int64                                  { return int64(len(d.b)) }
func (d *memDevice) Alignment() int                               { return 1 }
func (d *memDevice) Sync() error                                  { return nil }
func (d *memDevice) Close() error                                 { return nil }

// newLocks returns the lock engine of a clustered benchmark store: one
// node of a cluster of its own, so that the store is uncontended and meets
// no lock state of another. A nil newLocks stands for the bare store.
type newLocks func(tb testing.TB) lockc.Engine

// inprocLocks is a one-node in-process engine.
func inprocLocks(testing.TB) lockc.Engine { return inproc.New() }

// benchStore returns a fresh COW of cowBytes with a persistent store and,
// if locks is not nil, the wrapper around it on a lock engine from locks
// (as the COW engine gets it: a LazyStore).
func benchStore(b *testing.B, locks newLocks, cowBytes int64) (exstore.Store, *memDevice) {
	b.Helper()
	dev := newMemDevice("cow", cowBytes)
	return benchStoreOn(b, locks, dev), dev
}

// benchStoreOn formats dev as a COW device and opens the bare store (nil
// locks) or the wrapper on it.
func benchStoreOn(b *testing.B, locks newLocks, dev blockdev.Device) exstore.Store {
	b.Helper()
	formatCOW(b, dev, benchChunkSectors)
	var s exstore.Store
	if locks != nil {
		cs, err := openPersistent(context.Background(), dev, locks(b), "bench")
		require.NoError(b, err)
		s = cs.Exstore()
	} else {
		var err error
		s, err = persistent.Open(context.Background(), dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
		require.NoError(b, err)
	}
	b.Cleanup(func() { _ = s.Close() })
	warmStore(b, s)
	return s
}

// warmStore prepares an exception and aborts it, outside the timing: the
// wrapper then holds its cluster lock in EX, cached, as the targets
// assume (a fresh wrapper's first Prepare converts it up from NL, a one-off
// per node that the Ratio benchmarks, which set up fresh stores as they
// fill, would otherwise charge to the operations after every set-up). The
// bare store gets the same, for symmetry.
func warmStore(b *testing.B, s exstore.Store) {
	b.Helper()
	e, err := s.Prepare(context.Background(), 0)
	require.NoError(b, err)
	require.True(b, s.Abort(e), "abort of the warm-up exception")
}

// forBoth runs fn on the bare store and on the wrapper over the
// in-process engine.
func forBoth(b *testing.B, fn func(b *testing.B, locks newLocks)) {
	b.Run("persistent", func(b *testing.B) { fn(b, nil) })
	b.Run("clusterized", func(b *testing.B) { fn(b, inprocLocks) })
}

// BenchmarkLookup looks up chunks half of which have an exception, and
// releases the answer, from parallel goroutines.
func BenchmarkLookup(b *testing.B) {
	forBoth(b, func(b *testing.B, locks newLocks) {
		const n = 4096
		s, _ := benchStore(b, locks, 64<<20)
		for i := range n / 2 {
			add(b, s, exstore.Chunk(2*i))
		}
		var starts atomic.Uint64
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			ctx := context.Background()
			// Goroutines read different chunks, as an NBD server's do.
			c := exstore.Chunk(starts.Add(1) * 977)
			for pb.Next() {
				_, _, release, err := s.Lookup(ctx, c%n)
				release()
				if err != nil {
					b.Error(err)
					return
				}
				c++
			}
		})
	})
}

// BenchmarkPrepareCommitParallel prepares and commits from parallel
// goroutines, so that commits share metadata writes.
func BenchmarkPrepareCommitParallel(b *testing.B) {
	forBoth(b, func(b *testing.B, locks newLocks) {
		const cowBytes = 512 << 20
		capacity := persistent.NewGeometry(benchChunkSectors, cowBytes).Capacity()
		if uint64(b.N) >= capacity {
			b.Skipf("%d operations do not fit in the COW", b.N)
		}
		s, _ := benchStore(b, locks, cowBytes)
		ctx := context.Background()
		var next exstoreCounter
		b.SetParallelism(8)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				e, err := s.Prepare(ctx, next.take())
				if err != nil {
					b.Error(err)
					return
				}
				if err := s.Commit(ctx, e); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkCOWSnapshotRead reads 4 KiB from a snapshot through the COW
// engine, half the chunks from the COW and half from the origin.
func BenchmarkCOWSnapshotRead(b *testing.B) {
	forBoth(b, func(b *testing.B, locks newLocks) {
		const chunks = 4096
		s, dev := benchStore(b, locks, 64<<20)
		origin := cow.NewOrigin(newMemDevice("origin", chunks*4096))
		snap, err := origin.AddSnapshot("snap", s, dev, cow.SnapshotOptions{})
		require.NoError(b, err)
		ctx := context.Background()
		p := make([]byte, 4096)
		for c := 0; c < chunks; c += 2 {
			require.NoError(b, origin.WriteAt(ctx, p, int64(c)*4096, false))
		}
		var starts atomic.Int64
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			p := make([]byte, 4096)
			c := int(starts.Add(1) * 977)
			for pb.Next() {
				if err := snap.ReadAt(ctx, p, int64(c%chunks)*4096); err != nil {
					b.Error(err)
					return
				}
				c++
			}
		})
	})
}

// BenchmarkTwoWritersAlternating has two nodes take turns writing one
// exception each, so that every operation moves EX to the other node, and
// reports the lock engine round trips per operation.
func BenchmarkTwoWritersAlternating(b *testing.B) {
	dev := newMemDevice("cow", 512<<20)
	formatCOW(b, dev, benchChunkSectors)
	cluster := inproc.NewCluster()
	var nodes [2]*clusterized.Store
	for i := range nodes {
		s, err := openPersistent(context.Background(), dev, cluster.Node(uint32(i+1)), "alternate")
		require.NoError(b, err)
		b.Cleanup(func() { _ = s.Close() })
		nodes[i] = s
	}
	capacity := persistent.NewGeometry(benchChunkSectors, 512<<20).Capacity()
	if uint64(b.N) >= capacity {
		b.Skipf("%d operations do not fit in the COW", b.N)
	}
	roundTrips := func() uint64 {
		var n uint64
		for id := uint32(1); id <= 2; id++ {
			st := cluster.Stats(id)
			n += st.Requests + st.Converts + st.Unlocks
		}
		return n
	}
	before := roundTrips()
	ctx := context.Background()
	b.ResetTimer()
	for i := range b.N {
		s := nodes[i%2]
		e, err := s.Prepare(ctx, exstore.Chunk(i))
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Commit(ctx, e); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(roundTrips()-before)/float64(b.N), "lockops/op")
	var refreshes uint64
	for _, s := range nodes {
		refreshes += s.Stats().Refreshes
	}
	b.ReportMetric(float64(refreshes)/float64(b.N), "refreshes/op")
}

// exstoreCounter hands out distinct origin chunks to parallel goroutines.
type exstoreCounter struct{ n atomic.Uint64 }

func (c *exstoreCounter) take() exstore.Chunk { return exstore.Chunk(c.n.Add(1)) }
