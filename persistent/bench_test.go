package persistent_test

import (
	"context"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// writeImage writes the metadata of a COW holding n exceptions with random
// origin chunks, as the kernel lays them out in order, to a sparse file.
func writeImage(tb testing.TB, path string, chunkSectors uint32, n uint64) {
	tb.Helper()
	cb := int64(chunkSectors) * 512
	e := uint64(cb / persistent.RecordSize)
	chunks := 2 + n + n/e + 2
	require.NoError(tb, blockdev.Create(path, int64(chunks)*cb))
	f, err := blockdev.Open(path, blockdev.Options{})
	require.NoError(tb, err)
	defer f.Close()
	g := persistent.NewGeometry(chunkSectors, int64(chunks)*cb)
	hdr := make([]byte, cb)
	persistent.Header{Magic: persistent.Magic, Valid: 1, Version: 1, ChunkSectors: chunkSectors}.Encode(hdr)
	_, err = f.WriteAt(hdr, 0)
	require.NoError(tb, err)
	rng := rand.New(rand.NewPCG(1, 2))
	area := make([]byte, cb)
	seen := make(map[uint64]bool, n)
	for i := uint64(0); i < n; i += e {
		clear(area)
		for j := uint64(0); j < e && i+j < n; j++ {
			old := rng.Uint64N(1 << 40)
			for seen[old] {
				old = rng.Uint64N(1 << 40)
			}
			seen[old] = true
			g := i + j
			persistent.EncodeRecord(area, int(j), exstore.Exception{Old: exstore.Chunk(old), New: exstore.Chunk(2 + g + g/e)})
		}
		_, err = f.WriteAt(area, int64(g.AreaLocation(i/e))*cb)
		require.NoError(tb, err)
	}
	require.NoError(tb, f.Sync())
}

// BenchmarkLoad1M opens a COW holding 1,000,000 exceptions with 4 KiB
// chunks from page cache. Target: under 1 s per open.
func BenchmarkLoad1M(b *testing.B) {
	path := filepath.Join(b.TempDir(), "cow")
	writeImage(b, path, 8, 1_000_000)
	f, err := blockdev.Open(path, blockdev.Options{ReadOnly: true})
	require.NoError(b, err)
	defer f.Close()
	ctx := context.Background()
	for b.Loop() {
		s, err := persistent.Open(ctx, f, persistent.Options{Logger: quietLogger()})
		require.NoError(b, err)
		require.Equal(b, uint64(1_000_000), s.Usage().Exceptions)
		s.Close()
	}
}

// syncCounter counts the flushes and durable writes a store issues.
type syncCounter struct {
	blockdev.Device
	syncs atomic.Uint64
}

func (d *syncCounter) Sync() error { d.syncs.Add(1); return d.Device.Sync() }
func (d *syncCounter) WriteAtSync(p []byte, off int64) (int, error) {
	d.syncs.Add(1)
	return d.Device.WriteAtSync(p, off)
}

// BenchmarkCommitBatched commits exceptions from many concurrent writers on
// a real file with real fdatasync, as the COW engine does with many requests
// in flight. Target: at least 20,000 exceptions/s; it reports syncs per
// exception.
func BenchmarkCommitBatched(b *testing.B) {
	for _, writers := range []int{1, 16, 256} {
		b.Run(map[int]string{1: "writers=1", 16: "writers=16", 256: "writers=256"}[writers], func(b *testing.B) {
			const cb = 4096
			path := filepath.Join(b.TempDir(), "cow")
			n := uint64(b.N)
			require.NoError(b, blockdev.Create(path, int64(2+n+n/256+4)*cb))
			f, err := blockdev.Open(path, blockdev.Options{})
			require.NoError(b, err)
			defer f.Close()
			dev := &syncCounter{Device: f}
			ctx := context.Background()
			s, err := persistent.Open(ctx, dev, persistent.Options{ChunkSectors: 8, Logger: quietLogger()})
			require.NoError(b, err)
			defer s.Close()
			dev.syncs.Store(0)
			data := make([]byte, cb)
			var next atomic.Uint64
			var wg sync.WaitGroup
			b.ResetTimer()
			for w := 0; w < writers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						old := next.Add(1) - 1
						if old >= n {
							return
						}
						e, err := s.Prepare(ctx, exstore.Chunk(old))
						if err != nil {
							b.Error(err)
							return
						}
						if _, err := f.WriteAt(data, int64(e.New)*cb); err != nil {
							b.Error(err)
							return
						}
						if err := s.Commit(ctx, e); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.StopTimer()
			b.ReportMetric(float64(n)/b.Elapsed().Seconds(), "exceptions/s")
			b.ReportMetric(float64(dev.syncs.Load())/float64(n), "syncs/exception")
		})
	}
}

// BenchmarkLookupParallel looks up chunks from every CPU in a store of
// 4,096 scattered exceptions, as snapshot reads do: "miss" chunks have
// none, and are answered by the table's filter without the store's read
// lock; "hit" chunks have one, and take the read lock.
func BenchmarkLookupParallel(b *testing.B) {
	path := filepath.Join(b.TempDir(), "cow")
	const n = 4096
	writeImage(b, path, 8, n)
	f, err := blockdev.Open(path, blockdev.Options{ReadOnly: true})
	require.NoError(b, err)
	defer f.Close()
	ctx := context.Background()
	s, err := persistent.Open(ctx, f, persistent.Options{Logger: quietLogger()})
	require.NoError(b, err)
	defer s.Close()
	var hits []exstore.Chunk
	s.Walk(func(e exstore.Exception) bool { hits = append(hits, e.Old); return true })
	require.Len(b, hits, n)
	for _, tc := range []struct {
		name  string
		chunk func(i uint64) exstore.Chunk
		found bool
	}{
		{"miss", func(i uint64) exstore.Chunk { return exstore.Chunk(1<<41 + i%(1<<20)) }, false},
		{"hit", func(i uint64) exstore.Chunk { return hits[i%n] }, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var seed atomic.Uint64
			b.RunParallel(func(pb *testing.PB) {
				i := seed.Add(1 << 32)
				for pb.Next() {
					i += 7919
					if _, found, _, err := s.Lookup(ctx, tc.chunk(i)); err != nil || found != tc.found {
						b.Errorf("Lookup(%d) = found %v, %v", tc.chunk(i), found, err)
						return
					}
				}
			})
		})
	}
}
