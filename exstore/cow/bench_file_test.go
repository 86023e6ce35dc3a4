package cow

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// The File benchmarks run on real files in the test's temporary directory
// (buffered I/O, so mostly the page cache). Each pairs the engine with raw
// file I/O doing the same requests, alternating between the two in short
// phases so that both see the same background load, and reports
// engine/raw, the engine's throughput relative to the raw file's. The
// parallel variants run 16 goroutines (8 per GOMAXPROCS on 2 cores; an NBD
// client keeps about that many requests in flight), the serial ones one.
// The Overhead benchmarks run over a device that does nothing, to show the
// engine's own cost per request.

// fileBenchReadSize is the origin size the read benchmarks use.
const fileBenchReadSize = 64 << 20

// fileBenchParallelism times GOMAXPROCS is the goroutines of the parallel
// variants (16 on 2 cores).
const fileBenchParallelism = 8

// flushEvery is the flush policy of the "flush64" write variants: one
// Flush (engine) or Sync (raw file) after every 64 writes, counted across
// all goroutines.
const flushEvery = 64

// countingDevice counts the writes and syncs that reach a COW device,
// telling data chunk writes from header and metadata area writes.
type countingDevice struct {
	blockdev.Device
	chunkBytes int64
	// areaStride is the chunks from one metadata area to the next: the
	// area and its exceptionsPerArea data chunks.
	areaStride int64
	dataWrites atomic.Int64
	metaWrites atomic.Int64
	syncs      atomic.Int64
}

// newCountingDevice wraps dev, a COW device with chunks of chunkSectors.
func newCountingDevice(dev blockdev.Device, chunkSectors uint32) *countingDevice {
	chunkBytes := int64(chunkSectors) * exstore.SectorSize
	return &countingDevice{Device: dev, chunkBytes: chunkBytes, areaStride: chunkBytes/16 + 1}
}

// count records a write at off.
func (d *countingDevice) count(off int64) {
	c := off / d.chunkBytes
	if c == 0 || (c-1)%d.areaStride == 0 {
		d.metaWrites.Add(1)
	} else {
		d.dataWrites.Add(1)
	}
}

// WriteAt counts and forwards a write.
func (d *countingDevice) WriteAt(p []byte, off int64) (int, error) {
	d.count(off)
	return d.Device.WriteAt(p, off)
}

// WriteAtSync counts and forwards a durable write.
func (d *countingDevice) WriteAtSync(p []byte, off int64) (int, error) {
	d.count(off)
	d.syncs.Add(1)
	return d.Device.WriteAtSync(p, off)
}

// Sync counts and forwards a sync.
func (d *countingDevice) Sync() error {
	d.syncs.Add(1)
	return d.Device.Sync()
}

// openBenchFile creates a sparse file of size bytes in b's temporary
// directory and opens it; with fillWrite > 0 it first writes a pattern over
// all of it in writes of fillWrite bytes, so that reads and overwrites hit
// allocated, cached blocks. The write size matters: the page cache keeps
// large writes in large folios, and a 4 KiB overwrite of one costs several
// times one of a small folio, so a raw file compared with a COW device must
// be filled in writes of the size the COW device got.
func openBenchFile(b *testing.B, name string, size int64, fillWrite int) *blockdev.File {
	b.Helper()
	path := filepath.Join(b.TempDir(), name)
	require.NoError(b, blockdev.Create(path, size))
	f, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(b, err)
	b.Cleanup(func() { _ = f.Close() })
	if fillWrite > 0 {
		buf := make([]byte, fillWrite)
		for i := range buf {
			buf[i] = byte(i*7 + 1)
		}
		for off := int64(0); off < size; off += int64(len(buf)) {
			_, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off)
			require.NoError(b, err)
		}
	}
	return f
}

// fileSnapshot is an origin file with one snapshot on a counted COW file.
type fileSnapshot struct {
	originFile *blockdev.File
	origin     *Origin
	cow        *countingDevice
	snap       *Snapshot
}

// newFileSnapshot returns a fresh snapshot of chunkSectors over a new
// origin file of size bytes (filled in writes of fillWrite bytes unless it
// is 0), with a COW file big enough for every chunk.
func newFileSnapshot(b *testing.B, size int64, chunkSectors uint32, fillWrite int) *fileSnapshot {
	b.Helper()
	originFile := openBenchFile(b, "origin", size, fillWrite)
	chunkBytes := int64(chunkSectors) * exstore.SectorSize
	chunks := (size + chunkBytes - 1) / chunkBytes
	cowSize := (chunks + chunks/(chunkBytes/16) + 4) * chunkBytes
	cow := newCountingDevice(openBenchFile(b, "cow", cowSize, 0), chunkSectors)
	store, err := persistent.Open(context.Background(), cow, persistent.Options{ChunkSectors: chunkSectors, Logger: testLogger(b)})
	require.NoError(b, err)
	b.Cleanup(func() { _ = store.Close() })
	o := NewOrigin(originFile)
	s, err := o.AddSnapshot("bench", store, cow, SnapshotOptions{})
	require.NoError(b, err)
	return &fileSnapshot{originFile: originFile, origin: o, cow: cow, snap: s}
}

// rawVolume serves a device as a volume, the baseline the engine is
// compared with. In the write benchmarks it is a countingDevice of its own
// (whose counts nobody reads), so that both sides pay the counting the
// engine's COW device does.
type rawVolume struct{ f blockdev.Device }

// Size implements volume.
func (r rawVolume) Size() int64 { return r.f.Size() }

// ReadAt implements volume.
func (r rawVolume) ReadAt(_ context.Context, p []byte, off int64) error {
	n, err := r.f.ReadAt(p, off)
	if n == len(p) && err == io.EOF {
		err = nil
	}
	return err
}

// WriteAt implements volume.
func (r rawVolume) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	var err error
	if fua {
		_, err = r.f.WriteAtSync(p, off)
	} else {
		_, err = r.f.WriteAt(p, off)
	}
	return err
}

// Flush implements volume.
func (r rawVolume) Flush(context.Context) error { return r.f.Sync() }

// pairedTargets are what a paired benchmark compares: the raw file and
// the engine.
const pairedTargets = 2

// pairedRounds is how many times a paired benchmark switches between its
// targets each way.
const pairedRounds = 100

// runPaired runs about b.N requests in 2*pairedRounds phases that
// alternate between raw and engine (starting with each in turn), each
// phase serially or from 16 goroutines, so that both targets see the same
// background load: the j-th request to a target is done by do(v, j, buf),
// and with flush set every flushEvery-th request to a target is followed
// by a Flush of it. It reports each target's wall time per request (the
// inverse of its throughput) and requests per second, and the engine's
// throughput relative to the raw file's: engine/raw is the median over the
// rounds of each round's ratio, which a burst of other load on the machine
// during one phase does not move, engine/raw-total the ratio of the totals.
func runPaired(b *testing.B, raw, engine volume, parallel, flush bool, bufSize int, do func(v volume, j int64, buf []byte) error) {
	ctx := context.Background()
	targets := [pairedTargets]volume{raw, engine}
	workers := 1
	if parallel {
		workers = fileBenchParallelism * runtime.GOMAXPROCS(0)
	}
	bufs := make([][]byte, workers)
	for w := range bufs {
		bufs[w] = blockdev.AlignedBuffer(bufSize, 4096)
	}
	perPhase := int64(max(b.N/(pairedTargets*pairedRounds), 1))
	var elapsed [pairedTargets]time.Duration
	var done [pairedTargets]int64
	// ratios[r] is raw's time over the engine's in round r: adjacent
	// phases, so both saw about the same load.
	ratios := make([]float64, pairedRounds)
	b.SetBytes(int64(bufSize))
	b.ResetTimer()
	for r := range pairedRounds {
		var phase [pairedTargets]time.Duration
		for k := range pairedTargets {
			t := (r + k) % pairedTargets
			v, base := targets[t], done[t]
			var next atomic.Int64
			var wg sync.WaitGroup
			start := time.Now()
			for w := range workers {
				wg.Go(func() {
					for i := next.Add(1) - 1; i < perPhase; i = next.Add(1) - 1 {
						j := base + i
						err := do(v, j, bufs[w])
						if err == nil && flush && (j+1)%flushEvery == 0 {
							err = v.Flush(ctx)
						}
						if err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			phase[t] = time.Since(start)
			elapsed[t] += phase[t]
			done[t] += perPhase
		}
		ratios[r] = phase[0].Seconds() / phase[1].Seconds()
	}
	b.StopTimer()
	for t, name := range [pairedTargets]string{"raw", "engine"} {
		b.ReportMetric(float64(elapsed[t].Microseconds())/float64(done[t]), name+"-µs/req")
		b.ReportMetric(float64(done[t])/elapsed[t].Seconds(), name+"-req/s")
	}
	b.ReportMetric(elapsed[0].Seconds()/elapsed[1].Seconds(), "engine/raw-total")
	slices.Sort(ratios)
	b.ReportMetric(ratios[len(ratios)/2], "engine/raw")
}

// concurrencies are the serial and parallel variants.
func concurrencies() []struct {
	name     string
	parallel bool
} {
	return []struct {
		name     string
		parallel bool
	}{{"serial", false}, {"parallel16", true}}
}

// BenchmarkFileRead compares random reads of a snapshot's chunks that have
// no exception (the origin read, checked against the origin writes'
// announcements) with the same reads of the origin file itself. The
// "fresh" snapshot has no exceptions at all; the "busy" one has
// busyExceptions, scattered over a second origin area that the reads do
// not touch, so that its lookups search a table of realistic size.
func BenchmarkFileRead(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10} {
		for _, conc := range concurrencies() {
			for _, busy := range []bool{false, true} {
				table := "fresh"
				if busy {
					table = "busy"
				}
				b.Run(fmt.Sprintf("%dKiB/%s/%s", size>>10, conc.name, table), func(b *testing.B) {
					originSize := int64(fileBenchReadSize)
					if busy {
						originSize *= 2
					}
					fs := newFileSnapshot(b, originSize, 8, 1<<20)
					if busy {
						addScatteredExceptions(b, fs.snap, fileBenchReadSize, busyExceptions)
					}
					blocks := uint64(fileBenchReadSize / size)
					seed := rand.Uint64()
					ctx := context.Background()
					runPaired(b, rawVolume{fs.originFile}, fs.snap, conc.parallel, false, size, func(v volume, j int64, buf []byte) error {
						blk := int64(mix(seed+uint64(j)) % blocks)
						return v.ReadAt(ctx, buf, blk*int64(size))
					})
				})
			}
		}
	}
}

// busyExceptions is how many exceptions the "busy" read benchmarks'
// snapshot has: a quarter of a fileBenchReadSize area in 4 KiB chunks.
const busyExceptions = fileBenchReadSize / (4 << 10) / 4

// addScatteredExceptions gives n random 4 KiB chunks of s from byte from on
// an exception, by writing them, in a random order so that they form no
// runs, and flushes.
func addScatteredExceptions(b *testing.B, s *Snapshot, from int64, n int) {
	b.Helper()
	ctx := context.Background()
	chunks := (s.Size() - from) / s.chunkBytes
	buf := make([]byte, s.chunkBytes)
	for _, c := range rand.Perm(int(chunks))[:n] {
		require.NoError(b, s.WriteAt(ctx, buf, from+int64(c)*s.chunkBytes, false))
	}
	require.NoError(b, s.Flush(ctx))
	require.Equal(b, uint64(n), s.Store().Usage().Exceptions)
}

// mix is a stateless 64-bit mixer (splitmix64's finaliser), so that
// goroutines pick random blocks without sharing a generator.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// flushPolicies are the flush policies of the write benchmarks: none, or
// a flush after every flushEvery writes.
func flushPolicies() []struct {
	name  string
	flush bool
} {
	return []struct {
		name  string
		flush bool
	}{{"noflush", false}, {"flush64", true}}
}

// reportCOWWrites reports the COW device's writes and syncs per engine
// request: data-writes/req to data chunks, meta-writes/req
// to the header and metadata areas, syncs/req for commits and flushes.
func reportCOWWrites(b *testing.B, cow *countingDevice) {
	reqs := float64(max(b.N/(pairedTargets*pairedRounds), 1) * pairedRounds)
	b.ReportMetric(float64(cow.dataWrites.Load())/reqs, "data-writes/req")
	b.ReportMetric(float64(cow.metaWrites.Load())/reqs, "meta-writes/req")
	b.ReportMetric(float64(cow.syncs.Load())/reqs, "syncs/req")
}

// resetCounts zeroes the device's counters.
func (d *countingDevice) resetCounts() {
	d.dataWrites.Store(0)
	d.metaWrites.Store(0)
	d.syncs.Store(0)
}

// BenchmarkFileFirstWrite writes 4 KiB to random chunks of a fresh snapshot,
// each chunk once, paired with the same writes to a fresh sparse file. With
// 4 KiB chunks a write replaces its chunk (one data write, no copy); with
// 16 KiB chunks the chunk is copied first (two). Every allocation commits
// a metadata area durably (a sync), batched with the commits in flight.
func BenchmarkFileFirstWrite(b *testing.B) {
	const writeSize = 4 << 10
	for _, policy := range flushPolicies() {
		for _, conc := range concurrencies() {
			for _, chunkSectors := range []uint32{8, 32} {
				b.Run(fmt.Sprintf("%s/%s/chunk%dKiB", policy.name, conc.name, chunkSectors/2), func(b *testing.B) {
					chunkBytes := int64(chunkSectors) * exstore.SectorSize
					// One chunk per request, in a random order.
					chunks := int64(max(b.N/(pairedTargets*pairedRounds), 1) * pairedRounds)
					perm := rand.Perm(int(chunks))
					size := chunks * chunkBytes
					raw := rawVolume{newCountingDevice(openBenchFile(b, "raw", size, 0), chunkSectors)}
					fs := newFileSnapshot(b, size, chunkSectors, 0)
					fs.cow.resetCounts()
					ctx := context.Background()
					runPaired(b, raw, fs.snap, conc.parallel, policy.flush, writeSize, func(v volume, j int64, buf []byte) error {
						// The write lands in the middle of its chunk.
						off := int64(perm[j])*chunkBytes + (chunkBytes-writeSize)/2
						return v.WriteAt(ctx, buf, off, false)
					})
					reportCOWWrites(b, fs.cow)
				})
			}
		}
	}
}

// BenchmarkFileRewrite writes 4 KiB to random 4 KiB chunks of a snapshot
// that all have an exception already (a lookup and the COW write), paired
// with raw writes of the same COW chunks straight to the COW file: the
// same file, blocks and page cache state, so the difference is the
// engine's. (A separately filled raw file is no fair baseline: how a file
// was written, e.g. in 1 MiB or 4 KiB writes, changes the cost of 4 KiB
// overwrites by several times on this kernel.)
func BenchmarkFileRewrite(b *testing.B) {
	const writeSize = 4 << 10
	const size = 32 << 20
	for _, policy := range flushPolicies() {
		for _, conc := range concurrencies() {
			b.Run(fmt.Sprintf("%s/%s", policy.name, conc.name), func(b *testing.B) {
				ctx := context.Background()
				fs := newFileSnapshot(b, size, 8, 0)
				fill := make([]byte, 1<<20)
				for off := int64(0); off < size; off += int64(len(fill)) {
					require.NoError(b, fs.snap.WriteAt(ctx, fill, off, false))
				}
				require.NoError(b, fs.snap.Flush(ctx))
				// Where each chunk's data is on the COW device.
				cowOffsets := make([]int64, size/writeSize)
				for c := range cowOffsets {
					newChunk, found, release, err := fs.snap.Store().Lookup(ctx, exstore.Chunk(c))
					release()
					require.NoError(b, err)
					require.True(b, found)
					cowOffsets[c] = int64(newChunk) * writeSize
				}
				raw := rawVolume{newCountingDevice(fs.cow.Device, 8)}
				fs.cow.resetCounts()
				seed := rand.Uint64()
				runPaired(b, raw, fs.snap, conc.parallel, policy.flush, writeSize, func(v volume, j int64, buf []byte) error {
					c := int64(mix(seed+uint64(j)) % (size / writeSize))
					if v == volume(raw) {
						return v.WriteAt(ctx, buf, cowOffsets[c], false)
					}
					return v.WriteAt(ctx, buf, c*writeSize, false)
				})
				reportCOWWrites(b, fs.cow)
			})
		}
	}
}

// nullDevice is a device whose I/O does nothing, so that a benchmark over
// it measures the engine's own cost per request.
type nullDevice struct{ size int64 }

// Name implements blockdev.Device.
func (d nullDevice) Name() string { return "null" }

// Size implements blockdev.Device.
func (d nullDevice) Size() int64 { return d.size }

// Alignment implements blockdev.Device.
func (d nullDevice) Alignment() int { return 1 }

// ReadAt implements blockdev.Device, leaving p as it is.
func (d nullDevice) ReadAt(p []byte, _ int64) (int, error) { return len(p), nil }

// WriteAt implements blockdev.Device, dropping p.
func (d nullDevice) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

// WriteAtSync implements blockdev.Device, dropping p.
func (d nullDevice) WriteAtSync(p []byte, _ int64) (int, error) { return len(p), nil }

// Sync implements blockdev.Device.
func (d nullDevice) Sync() error { return nil }

// Close implements blockdev.Device.
func (d nullDevice) Close() error { return nil }

// BenchmarkReadOverhead measures what a snapshot read of chunks without an
// exception costs on top of the device read itself, over a device whose
// reads do nothing: "device" is the bare device call, "snapshot" the whole
// engine path (window lookup, shared chunk locks, validity check).
func BenchmarkReadOverhead(b *testing.B) {
	const size = 64 << 20
	for _, reqSize := range []int{4 << 10, 64 << 10} {
		dev := nullDevice{size: size}
		o := NewOrigin(dev)
		cow := faultdev.New("cow", 1<<20)
		store, err := persistent.Open(context.Background(), cow, persistent.Options{ChunkSectors: 8, Logger: testLogger(b)})
		require.NoError(b, err)
		b.Cleanup(func() { _ = store.Close() })
		s, err := o.AddSnapshot("s", store, cow, SnapshotOptions{})
		require.NoError(b, err)
		ctx := context.Background()
		blocks := uint64(size / reqSize)
		buf := make([]byte, reqSize)
		b.Run(fmt.Sprintf("%dKiB/device", reqSize>>10), func(b *testing.B) {
			var i uint64
			for b.Loop() {
				i++
				if _, err := dev.ReadAt(buf, int64(mix(i)%blocks)*int64(reqSize)); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(fmt.Sprintf("%dKiB/snapshot", reqSize>>10), func(b *testing.B) {
			var i uint64
			for b.Loop() {
				i++
				if err := s.ReadAt(ctx, buf, int64(mix(i)%blocks)*int64(reqSize)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkRewriteOverhead measures what a 4 KiB snapshot write to a chunk
// that has an exception costs on top of the device write, over a COW data
// device whose writes do nothing (the store's metadata lives on a memory
// device): "device" is the bare device call, "snapshot" the engine path.
func BenchmarkRewriteOverhead(b *testing.B) {
	const size = 16 << 20
	const reqSize = 4 << 10
	ctx := context.Background()
	var dev blockdev.Device = nullDevice{size: size * 2}
	o := NewOrigin(nullDevice{size: size})
	meta := faultdev.New("cow", size*2)
	store, err := persistent.Open(ctx, meta, persistent.Options{ChunkSectors: 8, Logger: testLogger(b)})
	require.NoError(b, err)
	b.Cleanup(func() { _ = store.Close() })
	s, err := o.AddSnapshot("s", store, dev, SnapshotOptions{})
	require.NoError(b, err)
	fill := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(fill)) {
		require.NoError(b, s.WriteAt(ctx, fill, off, false))
	}
	blocks := uint64(size / reqSize)
	buf := make([]byte, reqSize)
	b.Run("device", func(b *testing.B) {
		var i uint64
		for b.Loop() {
			i++
			if _, err := dev.WriteAt(buf, int64(mix(i)%blocks)*reqSize); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("snapshot", func(b *testing.B) {
		var i uint64
		for b.Loop() {
			i++
			if err := s.WriteAt(ctx, buf, int64(mix(i)%blocks)*reqSize, false); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkRewriteFanOut measures what a snapshot write of several chunks
// that all have an exception costs in the engine, over null devices as
// BenchmarkRewriteOverhead: mostly the fan-out of its chunks to goroutines
// (2, 16 and 256 chunks of 4 KiB).
func BenchmarkRewriteFanOut(b *testing.B) {
	const size = 16 << 20
	ctx := context.Background()
	o := NewOrigin(nullDevice{size: size})
	meta := faultdev.New("cow", size*2)
	store, err := persistent.Open(ctx, meta, persistent.Options{ChunkSectors: 8, Logger: testLogger(b)})
	require.NoError(b, err)
	b.Cleanup(func() { _ = store.Close() })
	s, err := o.AddSnapshot("s", store, nullDevice{size: size * 2}, SnapshotOptions{})
	require.NoError(b, err)
	fill := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(fill)) {
		require.NoError(b, s.WriteAt(ctx, fill, off, false))
	}
	for _, reqSize := range []int{8 << 10, 64 << 10, 1 << 20} {
		buf := make([]byte, reqSize)
		blocks := uint64(size / reqSize)
		b.Run(fmt.Sprintf("%dKiB", reqSize>>10), func(b *testing.B) {
			var i uint64
			for b.Loop() {
				i++
				if err := s.WriteAt(ctx, buf, int64(mix(i)%blocks)*int64(reqSize), false); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkOriginOverhead measures what the engine adds to a 4 KiB origin
// read and to an origin write of chunks every snapshot has copied (the
// common origin write), over an origin device whose I/O does nothing and
// one snapshot: the path a served origin takes when no merge runs.
func BenchmarkOriginOverhead(b *testing.B) {
	const size = 16 << 20
	const reqSize = 4 << 10
	ctx := context.Background()
	o := NewOrigin(nullDevice{size: size})
	cow := faultdev.New("cow", size*5/4)
	store, err := persistent.Open(ctx, cow, persistent.Options{ChunkSectors: 8, Logger: testLogger(b)})
	require.NoError(b, err)
	b.Cleanup(func() { _ = store.Close() })
	_, err = o.AddSnapshot("s", store, cow, SnapshotOptions{})
	require.NoError(b, err)
	fill := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(fill)) {
		require.NoError(b, o.WriteAt(ctx, fill, off, false))
	}
	blocks := uint64(size / reqSize)
	buf := make([]byte, reqSize)
	b.Run("read", func(b *testing.B) {
		var i uint64
		for b.Loop() {
			i++
			if err := o.ReadAt(ctx, buf, int64(mix(i)%blocks)*reqSize); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("write", func(b *testing.B) {
		var i uint64
		for b.Loop() {
			i++
			if err := o.WriteAt(ctx, buf, int64(mix(i)%blocks)*reqSize, false); err != nil {
				b.Fatal(err)
			}
		}
	})
}
