package cow

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

const benchOriginSize = 16 << 20

// benchSetup returns an origin with one 4 KiB-chunk snapshot.
func benchSetup(b *testing.B) (*Origin, *Snapshot) {
	b.Helper()
	rng := rand.New(rand.NewPCG(1, 1))
	o := NewOrigin(newOriginDev(rng, benchOriginSize))
	cow := faultdev.New("cow", benchOriginSize*5/4)
	store, err := persistent.Open(context.Background(), cow, persistent.Options{ChunkSectors: 8})
	require.NoError(b, err)
	b.Cleanup(func() { _ = store.Close() })
	s, err := o.AddSnapshot("s", store, cow, SnapshotOptions{})
	require.NoError(b, err)
	return o, s
}

// benchReads reads 4 KiB blocks at random from v.
func benchReads(b *testing.B, v volume) {
	ctx := context.Background()
	b.SetBytes(4096)
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewPCG(rand.Uint64(), 2))
		buf := make([]byte, 4096)
		for pb.Next() {
			if err := v.ReadAt(ctx, buf, 4096*rng.Int64N(benchOriginSize/4096)); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkReadOrigin is the baseline: the origin read straight through.
func BenchmarkReadOrigin(b *testing.B) {
	o, _ := benchSetup(b)
	benchReads(b, o)
}

// BenchmarkReadSnapshotNoException reads snapshot chunks that have no
// exception: a lookup, the chunk lock held shared, and the origin read.
func BenchmarkReadSnapshotNoException(b *testing.B) {
	_, s := benchSetup(b)
	benchReads(b, s)
}

// BenchmarkReadSnapshotException reads snapshot chunks that all have an
// exception: a lookup and the COW read.
func BenchmarkReadSnapshotException(b *testing.B) {
	o, s := benchSetup(b)
	ctx := context.Background()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < benchOriginSize; off += int64(len(buf)) {
		require.NoError(b, o.WriteAt(ctx, buf, off, false))
	}
	b.ResetTimer()
	benchReads(b, s)
}

// BenchmarkOriginWriteCOW writes blocks to the origin, each the first write
// of its chunks: copy, commit, then the write. A 64 KiB block needs 16
// copies, which run in parallel and share commits.
func BenchmarkOriginWriteCOW(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("%dKiB", size>>10), func(b *testing.B) {
			o, _ := benchSetup(b)
			ctx := context.Background()
			b.SetBytes(int64(size))
			buf := make([]byte, size)
			off := int64(0)
			for b.Loop() {
				if off == benchOriginSize {
					b.StopTimer()
					o, _ = benchSetup(b)
					off = 0
					b.StartTimer()
				}
				if err := o.WriteAt(ctx, buf, off, false); err != nil {
					b.Fatal(err)
				}
				off += int64(size)
			}
		})
	}
}
