package cow

import (
	"context"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized/snapset"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// BenchmarkOriginWriteGate writes 4 KiB blocks at random to the origin,
// every chunk already copied (the common origin write: a lookup per
// snapshot and the write), in parallel, without a gate and behind the
// snapshot set's gate (package clusterized/snapset) over the in-process
// engine: the gate's cost on the origin write path.
func BenchmarkOriginWriteGate(b *testing.B) {
	for _, gated := range []bool{false, true} {
		name := "none"
		if gated {
			name = "snapset"
		}
		b.Run(name, func(b *testing.B) {
			ctx := context.Background()
			o, _ := benchSetup(b)
			buf := make([]byte, 1<<20)
			for off := int64(0); off < benchOriginSize; off += int64(len(buf)) {
				require.NoError(b, o.WriteAt(ctx, buf, off, false))
			}
			if gated {
				ls, err := inproc.New().Open(ctx, "bench")
				require.NoError(b, err)
				b.Cleanup(func() { _ = ls.Close() })
				set, err := snapset.NewSet(snapset.Snapshot{Name: "s", Identity: []byte("s")})
				require.NoError(b, err)
				m, err := snapset.Join(ctx, ls, "bench/origin", set)
				require.NoError(b, err)
				b.Cleanup(func() { _ = m.Close() })
				o.SetGate(m)
			}
			b.SetBytes(4096)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				rng := rand.New(rand.NewPCG(rand.Uint64(), 3))
				p := make([]byte, 4096)
				for pb.Next() {
					if err := o.WriteAt(ctx, p, 4096*rng.Int64N(benchOriginSize/4096), false); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}
