package volumes

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkLiveCreate creates and deletes a snapshot (a fresh 4 MiB COW
// file each time) while a writer keeps writing the origin, and reports how
// long the writer's longest write took: the pause the cut puts on origin
// writes.
func BenchmarkLiveCreate(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	origin := filepath.Join(dir, "origin")
	if err := os.WriteFile(origin, make([]byte, originSize), 0o600); err != nil {
		b.Fatal(err)
	}
	v, err := Open(ctx, Config{Origin: origin})
	if err != nil {
		b.Fatal(err)
	}
	defer v.Close()
	var stop atomic.Bool
	var longest atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, chunk)
		for i := 0; !stop.Load(); i++ {
			start := time.Now()
			if err := v.Origin.WriteAt(ctx, buf, int64(i%(originSize/chunk))*chunk, false); err != nil {
				b.Error(err)
				return
			}
			if d := int64(time.Since(start)); d > longest.Load() {
				longest.Store(d)
			}
		}
	}()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		name := fmt.Sprintf("s%d", i)
		if _, err := v.CreateSnapshot(ctx, CreateRequest{Name: name, COW: filepath.Join(dir, name), CreateBytes: 4 << 20}); err != nil {
			b.Fatal(err)
		}
		if err := v.DeleteSnapshot(ctx, name); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	stop.Store(true)
	wg.Wait()
	b.ReportMetric(float64(longest.Load())/1e6, "max-write-ms")
}

// BenchmarkLiveMerge merges a snapshot of a 16 MiB origin whose every
// chunk (contiguous: runs of up to 8 MiB) or every other chunk (runs of
// one) changed, on one node, and reports MiB merged per second.
func BenchmarkLiveMerge(b *testing.B) {
	for _, tc := range []struct {
		name  string
		every int
	}{{"contiguous", 1}, {"every-other-chunk", 2}} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := context.Background()
			const size = 16 << 20
			var merged int64
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				dir := b.TempDir()
				origin := filepath.Join(dir, "origin")
				if err := os.WriteFile(origin, make([]byte, size), 0o600); err != nil {
					b.Fatal(err)
				}
				v, err := Open(ctx, Config{Origin: origin})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := v.CreateSnapshot(ctx, CreateRequest{Name: "s", COW: filepath.Join(dir, "s.cow"), CreateBytes: 2 * size}); err != nil {
					b.Fatal(err)
				}
				buf := make([]byte, chunk)
				for c := 0; c < size/chunk; c += tc.every {
					if err := v.Origin.WriteAt(ctx, buf, int64(c*chunk), false); err != nil {
						b.Fatal(err)
					}
				}
				b.StartTimer()
				if _, err := v.StartMerge(ctx, "s"); err != nil {
					b.Fatal(err)
				}
				if st, err := v.WaitMerge(ctx); err != nil || st.State != MergeDone {
					b.Fatal(err, st)
				}
				merged += size / int64(tc.every)
				b.StopTimer()
				v.Close()
			}
			b.ReportMetric(float64(merged)/(1<<20)/b.Elapsed().Seconds(), "MiB/s")
		})
	}
}
