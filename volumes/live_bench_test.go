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
