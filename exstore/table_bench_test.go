package exstore

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"
)

// randomChunk is the i-th of a sequence of distinct, scattered origin chunks:
// i times an odd constant is a bijection of the 56-bit chunk space, and no two
// consecutive terms are adjacent.
func randomChunk(i uint64) Chunk {
	return Chunk(i * 0x9e3779b97f4a7c15 & uint64(MaxChunk))
}

// randomTable returns a table of n exceptions at scattered origin chunks,
// with COW chunks allocated in order as a store does.
func randomTable(tb testing.TB, n uint64) *Table {
	tab := NewTable()
	for i := range n {
		if err := tab.Insert(Exception{randomChunk(i), Chunk(i)}); err != nil {
			tb.Fatal(err)
		}
	}
	return tab
}

// probeOrder is a shuffled order of 1<<20 indices, so that benchmark lookups
// do not walk the table in insertion order.
func probeOrder() []uint64 {
	p := make([]uint64, 1<<20)
	for i := range p {
		p[i] = uint64(i)
	}
	rand.New(rand.NewPCG(3, 4)).Shuffle(len(p), func(i, j int) { p[i], p[j] = p[j], p[i] })
	return p
}

func BenchmarkTableLookupHit(b *testing.B) {
	const n = 1_000_000
	tab := randomTable(b, n)
	order := probeOrder()
	keys := make([]Chunk, len(order))
	for i, o := range order {
		keys[i] = randomChunk(o % n)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, ok := tab.Lookup(keys[i&(len(keys)-1)]); !ok {
			b.Fatal("miss")
		}
		i++
	}
}

func BenchmarkTableLookupMiss(b *testing.B) {
	const n = 1_000_000
	tab := randomTable(b, n)
	order := probeOrder()
	keys := make([]Chunk, len(order))
	for i, o := range order {
		keys[i] = randomChunk(n + o) // never inserted
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if _, ok := tab.Lookup(keys[i&(len(keys)-1)]); ok {
			b.Fatal("hit")
		}
		i++
	}
}

// BenchmarkTableLookupMissWithExtents is the miss path when the table also
// holds long runs, so that the extent tree is searched too.
func BenchmarkTableLookupMissWithExtents(b *testing.B) {
	const n = 1_000_000
	tab := randomTable(b, n)
	for r := range Chunk(10_000) { // 10,000 runs of 100
		for i := range Chunk(100) {
			if err := tab.Insert(Exception{MaxChunk - r*1000 - i, 1<<50 + r*1000 - i}); err != nil {
				b.Fatal(err)
			}
		}
	}
	order := probeOrder()
	keys := make([]Chunk, len(order))
	for i, o := range order {
		keys[i] = randomChunk(n + o)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		tab.Lookup(keys[i&(len(keys)-1)])
		i++
	}
}

// benchInsert times building a table from the exceptions gen returns, n per
// iteration, reporting ns per exception and ms per table, in wall time and
// in process CPU time (which includes the garbage collector's).
func benchInsert(b *testing.B, n uint64, gen func(i uint64) Exception) {
	b.ReportAllocs()
	var elapsed, cpu time.Duration
	for b.Loop() {
		start, startCPU := time.Now(), processCPU()
		tab := NewTable()
		for i := range n {
			if err := tab.Insert(gen(i)); err != nil {
				b.Fatal(err)
			}
		}
		elapsed += time.Since(start)
		cpu += processCPU() - startCPU
		b.ReportMetric(float64(tab.Entries()), "entries")
	}
	b.ReportMetric(float64(elapsed.Nanoseconds())/float64(uint64(b.N)*n), "ns/exception")
	b.ReportMetric(float64(elapsed.Milliseconds())/float64(b.N), "ms/table")
	b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms/table")
}

func BenchmarkTableInsertRandom1M(b *testing.B) {
	benchInsert(b, 1_000_000, func(i uint64) Exception { return Exception{randomChunk(i), Chunk(i)} })
}

// BenchmarkTableInsert8KiBWrites1M is random 8 KiB writes with 4 KiB chunks:
// pairs of adjacent chunks at random places, COW chunks in order, so the
// table holds n/2 runs of 2.
func BenchmarkTableInsert8KiBWrites1M(b *testing.B) {
	benchInsert(b, 1_000_000, func(i uint64) Exception {
		pair := Chunk((i / 2 * 0x9e3779b97f4a7c15 & uint64(MaxChunk>>1)) << 1)
		return Exception{pair + Chunk(i&1), Chunk(i)}
	})
}

func BenchmarkTableInsertSequential1M(b *testing.B) {
	benchInsert(b, 1_000_000, func(i uint64) Exception { return Exception{Chunk(i), Chunk(i)} })
}

// BenchmarkTableInsertBackwards1M grows one run at its front.
func BenchmarkTableInsertBackwards1M(b *testing.B) {
	benchInsert(b, 1_000_000, func(i uint64) Exception { return Exception{Chunk(1e6 - i), Chunk(1e6 - i)} })
}

// BenchmarkTableInsertInterleaved1M is 16 sequential streams whose writes
// interleave: each stream's COW chunks are 16 apart, so nothing joins.
func BenchmarkTableInsertInterleaved1M(b *testing.B) {
	benchInsert(b, 1_000_000, func(i uint64) Exception {
		return Exception{Chunk(i%16)<<40 + Chunk(i/16), Chunk(i)}
	})
}

// BenchmarkTableInsertInterleavedRuns1M is 1,000 sequential streams, each
// with its own COW area, written round-robin: 1,000 growing extents.
func BenchmarkTableInsertInterleavedRuns1M(b *testing.B) {
	benchInsert(b, 1_000_000, func(i uint64) Exception {
		s, k := Chunk(i%1000), Chunk(i/1000)
		return Exception{s<<30 + k, s<<30 + k + 5}
	})
}

// BenchmarkTableRemoveTails1M is merge: 1,000 runs of 1,000 removed from their
// ends, 8 chunks at a time.
func BenchmarkTableRemoveTails1M(b *testing.B) {
	b.ReportAllocs()
	var elapsed time.Duration
	for b.Loop() {
		tab := NewTable()
		for r := range Chunk(1000) {
			for i := range Chunk(1000) {
				if err := tab.Insert(Exception{r*5000 + i, r*1000 + i}); err != nil {
					b.Fatal(err)
				}
			}
		}
		start := time.Now()
		for r := range Chunk(1000) {
			for end := r*5000 + 1000; end > r*5000; end -= 8 {
				tab.Remove(end-8, 8)
			}
		}
		elapsed += time.Since(start)
		if tab.Len() != 0 {
			b.Fatal("table not empty")
		}
	}
	b.ReportMetric(float64(elapsed.Milliseconds())/float64(b.N), "ms/table")
}

// BenchmarkTableBytesPerException reports the heap a table of random
// exceptions takes, per exception, at several sizes.
func BenchmarkTableBytesPerException(b *testing.B) {
	for _, n := range []uint64{1_000, 10_000, 100_000, 1_000_000, 3_000_000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			for b.Loop() {
				before := heapAlloc()
				tab := randomTable(b, n)
				after := heapAlloc()
				b.ReportMetric(float64(after-before)/float64(n), "B/exception")
				runtime.KeepAlive(tab)
			}
		})
	}
}

// heapAlloc is the live heap after full collections (two, so that objects
// pooled in sync.Pools before the first are gone).
func heapAlloc() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
