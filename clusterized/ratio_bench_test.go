package clusterized_test

import (
	"context"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/persistent"
)

// The Ratio benchmarks run the bare persistent store and the wrapper
// alternately, a slice of operations each (which goes first alternates
// too), and report the wrapper's throughput relative to the bare store's
// ("throughput-ratio", 1 means equal): the median over the slice pairs of
// each pair's ratio, which a burst of other load on the machine during one
// slice does not move, and the ratio of the totals
// ("throughput-ratio-total"). Setting up a fresh store or volume when one
// fills up is not timed.

// ratioSlice is how many operations each side runs before the other's turn.
const ratioSlice = 1000

// ratioOp is one side of a Ratio benchmark: run(i) does operation i;
// prepare(first, n), if set, readies the side for operations first to
// first+n-1 before they are timed (a fresh store when the last one is
// full).
type ratioOp struct {
	prepare func(first, n int)
	run     func(i int)
}

// runRatio times bare.run(i) and clustered.run(i) for i in [0, b.N), in
// alternating slices, and reports both costs and the throughput ratios.
func runRatio(b *testing.B, bare, clustered ratioOp) {
	runRatioOf(b, [2]string{"bare", "clustered"}, [2]ratioOp{bare, clustered})
}

// runRatioOf times sides[0].run(i) and sides[1].run(i) for i in [0, b.N),
// in alternating slices, and reports the cost of each side (metrics named
// after names) and the throughput of sides[1] relative to sides[0]'s.
func runRatioOf(b *testing.B, names [2]string, sides [2]ratioOp) {
	var total [2]time.Duration
	var ratios []float64
	b.ResetTimer()
	for done, k := 0, 0; done < b.N; done, k = done+ratioSlice, k+1 {
		n := min(ratioSlice, b.N-done)
		var took [2]time.Duration
		for j := range sides {
			side := (j + k) % 2
			op := sides[side]
			if op.prepare != nil {
				b.StopTimer()
				op.prepare(done, n)
				b.StartTimer()
			}
			t0 := time.Now()
			for i := range n {
				op.run(done + i)
			}
			took[side] = time.Since(t0)
			total[side] += took[side]
		}
		ratios = append(ratios, float64(took[0])/float64(took[1]))
	}
	b.StopTimer()
	reportRatio(b, names, total, ratios)
}

// reportRatio reports the costs per operation of the two sides, the
// median of the per-slice ratios and the ratio of the totals.
func reportRatio(b *testing.B, names [2]string, total [2]time.Duration, ratios []float64) {
	for i, name := range names {
		b.ReportMetric(float64(total[i].Nanoseconds())/float64(b.N), name+"-ns/op")
	}
	b.ReportMetric(float64(total[0])/float64(total[1]), "throughput-ratio-total")
	slices.Sort(ratios)
	b.ReportMetric(ratios[len(ratios)/2], "throughput-ratio")
}

// lookupOp returns an operation looking chunk i%n up.
func lookupOp(b *testing.B, s exstore.Store, base exstore.Chunk, n int) ratioOp {
	ctx := context.Background()
	return ratioOp{run: func(i int) {
		_, _, release, err := s.Lookup(ctx, base+exstore.Chunk(i%n))
		release()
		if err != nil {
			b.Fatal(err)
		}
	}}
}

// BenchmarkRatioLookupHit: lookups that find an exception.
func BenchmarkRatioLookupHit(b *testing.B) {
	const n = 4096
	bare, _ := benchStore(b, nil, 64<<20)
	clustered, _ := benchStore(b, inprocLocks, 64<<20)
	for i := range n {
		add(b, bare, exstore.Chunk(i))
		add(b, clustered, exstore.Chunk(i))
	}
	runRatio(b, lookupOp(b, bare, 0, n), lookupOp(b, clustered, 0, n))
}

// BenchmarkRatioLookupMiss: lookups that find none, held and released (the
// wrapper's CR entry).
func BenchmarkRatioLookupMiss(b *testing.B) {
	bare, _ := benchStore(b, nil, 16<<20)
	clustered, _ := benchStore(b, inprocLocks, 16<<20)
	add(b, bare, 1)
	add(b, clustered, 1) // the lock is cached in EX
	runRatio(b, lookupOp(b, bare, 1000, 4096), lookupOp(b, clustered, 1000, 4096))
}

// prepareCommitOp returns an operation that prepares and commits an
// exception on the bare store (nil locks) or the wrapper, starting over on
// a fresh store when the COW fills up.
func prepareCommitOp(b *testing.B, locks newLocks) ratioOp {
	const cowBytes = 128 << 20
	capacity := persistent.NewGeometry(benchChunkSectors, cowBytes).Capacity()
	s, _ := benchStore(b, locks, cowBytes)
	used := uint64(0)
	ctx := context.Background()
	return ratioOp{
		prepare: func(_, n int) {
			if used+uint64(n) >= capacity {
				_ = s.Close()
				s, _ = benchStore(b, locks, cowBytes)
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

// BenchmarkRatioPrepareCommit: one exception prepared and committed at a
// time (a metadata write each).
func BenchmarkRatioPrepareCommit(b *testing.B) {
	runRatio(b, prepareCommitOp(b, nil), prepareCommitOp(b, inprocLocks))
}

// snapshotReadOp returns a 4 KiB snapshot read through the COW engine,
// chunks alternately from the COW and from the origin. The devices are
// files (so mostly the page cache), as snapd serves them: on memory
// devices a read is a copy whose speed depends on where the allocator put
// each side's devices, which moved the ratio by 10% from run to run.
func snapshotReadOp(b *testing.B, locks newLocks) ratioOp {
	const chunks = 4096
	origin, originDev, snap := fileSnapshot(b, locks, chunks)
	ctx := context.Background()
	p := make([]byte, 4096)
	for c := range chunks {
		_, err := originDev.WriteAt(p, int64(c)*4096)
		require.NoError(b, err)
	}
	for c := 0; c < chunks; c += 2 {
		require.NoError(b, origin.WriteAt(ctx, p, int64(c)*4096, false))
	}
	// Nothing left for writeback to write while the other side is timed.
	require.NoError(b, snap.Flush(ctx))
	return ratioOp{run: func(i int) {
		if err := snap.ReadAt(ctx, p, int64(i%chunks)*4096); err != nil {
			b.Fatal(err)
		}
	}}
}

// snapshotRewriteOp returns a 4 KiB snapshot write through the COW engine
// to a chunk that has its exception already (a lookup and the COW write),
// on files as snapshotReadOp's.
func snapshotRewriteOp(b *testing.B, locks newLocks) ratioOp {
	const chunks = 4096
	_, _, snap := fileSnapshot(b, locks, chunks)
	ctx := context.Background()
	p := make([]byte, 4096)
	for c := range chunks {
		require.NoError(b, snap.WriteAt(ctx, p, int64(c)*4096, false))
	}
	require.NoError(b, snap.Flush(ctx))
	return ratioOp{run: func(i int) {
		// Chunks in a scattered order, the same for both sides.
		c := (i * 2654435761) % chunks
		if err := snap.WriteAt(ctx, p, int64(c)*4096, false); err != nil {
			b.Fatal(err)
		}
	}}
}

// BenchmarkRatioCOWSnapshotRewrite: snapshot writes to chunks that have
// their exception, through the COW engine.
func BenchmarkRatioCOWSnapshotRewrite(b *testing.B) {
	runRatio(b, snapshotRewriteOp(b, nil), snapshotRewriteOp(b, inprocLocks))
}

// fileSnapshot returns an origin of chunks 4 KiB chunks on a fresh sparse
// file, its device, and a snapshot of it on a fresh 64 MiB COW file with
// the bare store (nil locks) or the wrapper.
func fileSnapshot(b *testing.B, locks newLocks, chunks int64) (*cow.Origin, *blockdev.File, *cow.Snapshot) {
	dir := b.TempDir()
	dev := benchFile(b, dir, "cow", 64<<20)
	s := benchStoreOn(b, locks, dev)
	originDev := benchFile(b, dir, "origin", chunks*4096)
	origin := cow.NewOrigin(originDev)
	snap, err := origin.AddSnapshot("snap", s, dev, cow.SnapshotOptions{})
	require.NoError(b, err)
	return origin, originDev, snap
}

// benchFile creates a sparse file of size bytes in dir and opens it until
// the benchmark ends.
func benchFile(b *testing.B, dir, name string, size int64) *blockdev.File {
	path := filepath.Join(dir, name)
	require.NoError(b, blockdev.Create(path, size))
	f, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(b, err)
	b.Cleanup(func() { _ = f.Close() })
	return f
}

// BenchmarkRatioCOWSnapshotRead: snapshot reads through the COW engine.
func BenchmarkRatioCOWSnapshotRead(b *testing.B) {
	runRatio(b, snapshotReadOp(b, nil), snapshotReadOp(b, inprocLocks))
}

// originWriteOp returns a 4 KiB origin write through the COW engine to a
// chunk without exception: lookup, allocation, copy, commit, write.
func originWriteOp(b *testing.B, locks newLocks) ratioOp {
	const chunks = 16384
	var origin *cow.Origin
	var store exstore.Store
	base := 0 // the operation that writes chunk 0 of origin
	setup := func() {
		if store != nil {
			_ = store.Close()
		}
		var dev *memDevice
		store, dev = benchStore(b, locks, 80<<20)
		origin = cow.NewOrigin(newMemDevice("origin", chunks*4096))
		_, err := origin.AddSnapshot("snap", store, dev, cow.SnapshotOptions{})
		require.NoError(b, err)
	}
	setup()
	ctx := context.Background()
	p := make([]byte, 4096)
	return ratioOp{
		prepare: func(first, n int) {
			if first+n-base > chunks {
				setup()
				base = first
			}
		},
		run: func(i int) {
			if err := origin.WriteAt(ctx, p, int64(i-base)*4096, false); err != nil {
				b.Fatal(err)
			}
		},
	}
}

// BenchmarkRatioCOWOriginWrite: origin writes that copy a chunk into the
// snapshot through the COW engine.
func BenchmarkRatioCOWOriginWrite(b *testing.B) {
	runRatio(b, originWriteOp(b, nil), originWriteOp(b, inprocLocks))
}

// BenchmarkRatioCOWEtcd runs the RatioCOW benchmarks with the wrapper on
// lockc/etcd (an embedded server on a unix socket; each store one node of
// a cluster of its own, uncontended, its lock cached in EX) instead of the
// in-process engine: with the lock held, no operation should wait for
// etcd, which "etcd-writes/op" counts.
func BenchmarkRatioCOWEtcd(b *testing.B) {
	locks, server := etcdLocks(b)
	benches := []struct {
		name string
		run  func(b *testing.B)
	}{
		{"SnapshotRead", func(b *testing.B) { runRatio(b, snapshotReadOp(b, nil), snapshotReadOp(b, locks)) }},
		{"SnapshotRewrite", func(b *testing.B) { runRatio(b, snapshotRewriteOp(b, nil), snapshotRewriteOp(b, locks)) }},
		{"OriginWrite", func(b *testing.B) { runRatio(b, originWriteOp(b, nil), originWriteOp(b, locks)) }},
		{"SnapshotFirstWrite", func(b *testing.B) { benchFirstWrites(b, locks, false) }},
	}
	for _, bench := range benches {
		b.Run(bench.name, func(b *testing.B) { reportEtcdWrites(b, server, bench.run) })
	}
}

// Snapshot first writes: the parameters of the target (at least
// 0.95 of the bare store's throughput).
const (
	firstWriteWorkers    = 16   // goroutines writing
	firstWriteFlushEvery = 64   // a snapshot flush after every this many writes
	firstWriteChunks     = 8192 // chunks of a snapshot before a fresh one is set up
	firstWriteSlice      = 256  // writes each side runs before the other's turn
)

// firstWriter does snapshot first writes of whole 4 KiB chunks through the
// COW engine: each allocates, and (without FUA) commits lazily when the
// store can; every firstWriteFlushEvery-th write is followed by a flush.
type firstWriter struct {
	b       *testing.B
	locks   newLocks // nil: the bare store
	durable bool     // clustered, but handed to the COW engine as a plain Store
	snap    *cow.Snapshot
	store   exstore.Store
	next    int // the next chunk without exception
}

func newFirstWriter(b *testing.B, locks newLocks, durable bool) *firstWriter {
	w := &firstWriter{b: b, locks: locks, durable: durable}
	w.setup()
	return w
}

// setup gives the writer a fresh snapshot (outside the timing), closing
// the store of the last one.
func (w *firstWriter) setup() {
	if w.store != nil {
		require.NoError(w.b, w.store.Close())
	}
	dev := newMemDevice("cow", (firstWriteChunks+firstWriteChunks/64+64)*4096)
	formatCOW(w.b, dev, benchChunkSectors)
	var err error
	if w.locks != nil {
		var cs *clusterized.Store
		cs, err = openPersistent(context.Background(), dev, w.locks(w.b), "bench")
		require.NoError(w.b, err)
		w.store = cs.Exstore()
		if w.durable {
			w.store = cs
		}
		_, ok := w.store.(exstore.LazyCommitter)
		require.Equal(w.b, !w.durable, ok, "the clustered store commits lazily")
	} else {
		w.store, err = persistent.Open(context.Background(), dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
		require.NoError(w.b, err)
	}
	s := w.store
	w.b.Cleanup(func() { _ = s.Close() })
	warmStore(w.b, s)
	origin := cow.NewOrigin(newMemDevice("origin", firstWriteChunks*4096))
	w.snap, err = origin.AddSnapshot("snap", s, dev, cow.SnapshotOptions{})
	require.NoError(w.b, err)
	w.next = 0
}

// run does n writes, in rounds of firstWriteFlushEvery shared by
// firstWriteWorkers goroutines with a flush after each, and returns how
// long they took; a fresh snapshot is set up first if this one lacks room.
func (w *firstWriter) run(n int) time.Duration {
	if w.next+n > firstWriteChunks {
		w.setup()
	}
	ctx := context.Background()
	base := w.next
	w.next += n
	start := time.Now()
	for round := 0; round < n; round += firstWriteFlushEvery {
		k := min(firstWriteFlushEvery, n-round)
		var taken atomic.Int64
		var wg sync.WaitGroup
		for range firstWriteWorkers {
			wg.Go(func() {
				p := make([]byte, 4096)
				for {
					i := int(taken.Add(1)) - 1
					if i >= k {
						return
					}
					if err := w.snap.WriteAt(ctx, p, int64(base+round+i)*4096, false); err != nil {
						w.b.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		if err := w.snap.Flush(ctx); err != nil {
			w.b.Fatal(err)
		}
	}
	return time.Since(start)
}

// BenchmarkRatioCOWSnapshotFirstWrite: snapshot writes that allocate, 16
// goroutines, a flush every 64 writes, through the COW engine on the bare
// persistent store and on the wrapper (inproc.New(), uncontended), in
// alternating slices; "throughput-ratio" is the wrapper's relative to the
// bare store's (the target is at least 0.95). In "durable" the engine gets
// the wrapper as a plain Store, as before it was a LazyCommitter, and so
// commits every exception durably.
func BenchmarkRatioCOWSnapshotFirstWrite(b *testing.B) {
	b.Run("lazy", func(b *testing.B) { benchFirstWrites(b, inprocLocks, false) })
	b.Run("durable", func(b *testing.B) { benchFirstWrites(b, inprocLocks, true) })
}

// benchFirstWrites runs the first writes on the bare store and on the
// wrapper over engines from locks, alternately.
func benchFirstWrites(b *testing.B, locks newLocks, durable bool) {
	bare := newFirstWriter(b, nil, false)
	clustered := newFirstWriter(b, locks, durable)
	var tBare, tClustered time.Duration
	var ratios []float64
	b.ResetTimer()
	for done, k := 0, 0; done < b.N; done, k = done+firstWriteSlice, k+1 {
		n := min(firstWriteSlice, b.N-done)
		var took [2]time.Duration
		for j := range 2 {
			side := (j + k) % 2
			took[side] = [2]*firstWriter{bare, clustered}[side].run(n)
		}
		tBare += took[0]
		tClustered += took[1]
		ratios = append(ratios, float64(took[0])/float64(took[1]))
	}
	b.StopTimer()
	reportRatio(b, [2]string{"bare", "clustered"}, [2]time.Duration{tBare, tClustered}, ratios)
}
