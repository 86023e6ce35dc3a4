package locktest

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/clustersnap/clustersnap/lockc"
)

// BenchmarkCachedConvert measures the uncontended cached path of a
// clustered client: a held NL lock converted to CR (reading the LVB) and
// back to NL. One iteration is both conversions.
func BenchmarkCachedConvert(b *testing.B, h Harness) {
	ctx := context.Background()
	ls, err := h.NewCluster(b).Node(1).Open(ctx, "bench")
	if err != nil {
		b.Fatal(err)
	}
	defer ls.Close()
	l, err := ls.Lock(ctx, []byte("r"), lockc.NL)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := l.Convert(ctx, lockc.CR); err != nil {
			b.Fatal(err)
		}
		if err := l.Convert(ctx, lockc.NL); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkUncached measures an acquisition the node has no lock for: a
// new lock on one resource in mode, granted at once (no other holder), and
// its unlock. One iteration is both. Where BenchmarkCachedConvert is what a
// clustered client pays once it holds a lock, this is what it pays to get
// one, and what every operation would pay without lock caching.
func BenchmarkUncached(b *testing.B, h Harness, mode lockc.Mode) {
	ctx := context.Background()
	ls, err := h.NewCluster(b).Node(1).Open(ctx, "bench")
	if err != nil {
		b.Fatal(err)
	}
	defer ls.Close()
	for b.Loop() {
		l, err := ls.Lock(ctx, []byte("r"), mode)
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Unlock(ctx); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkPingPong measures contended exclusive access: two nodes each
// hold NL on one resource and repeatedly convert to EX, publish the LVB and
// convert back to NL. One iteration is one EX acquisition by either node.
func BenchmarkPingPong(b *testing.B, h Harness) {
	ctx := context.Background()
	c := h.NewCluster(b)
	locks := make([]lockc.Lock, 2)
	for i := range locks {
		ls, err := c.Node(uint32(i+1)).Open(ctx, "bench")
		if err != nil {
			b.Fatal(err)
		}
		defer ls.Close()
		if locks[i], err = ls.Lock(ctx, []byte("r"), lockc.NL); err != nil {
			b.Fatal(err)
		}
	}
	var remaining atomic.Int64
	remaining.Store(int64(b.N))
	var wg sync.WaitGroup
	errs := make(chan error, len(locks))
	b.ResetTimer()
	for _, l := range locks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := uint64(0); remaining.Add(-1) >= 0; n++ {
				if err := l.Convert(ctx, lockc.EX); err != nil {
					errs <- err
					return
				}
				l.SetLVB(counter(n))
				if err := l.Convert(ctx, lockc.NL); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}
