package exstore

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// tableRun is one run Range reports.
type tableRun struct {
	Old, New Chunk
	N        uint64
}

// tableRuns returns every run of tab, sorted by Old.
func tableRuns(tab *Table) []tableRun {
	var runs []tableRun
	tab.Range(func(old, new Chunk, n uint64) bool {
		runs = append(runs, tableRun{old, new, n})
		return true
	})
	slices.SortFunc(runs, func(a, b tableRun) int {
		switch {
		case a.Old < b.Old:
			return -1
		case a.Old > b.Old:
			return 1
		}
		return 0
	})
	return runs
}

// maximalRuns is the number of maximal runs in model.
func maximalRuns(model map[Chunk]Chunk) int {
	runs := 0
	for old, new := range model {
		if old == 0 || new == 0 {
			runs++
			continue
		}
		if prev, ok := model[old-1]; !ok || prev != new-1 {
			runs++
		}
	}
	return runs
}

// requireMatchesModel checks everything the table reports against model:
// Len, Entries (the number of maximal runs), Lookup of every chunk, and that
// Range reproduces model exactly, with maximal, non-overlapping runs.
func requireMatchesModel(t *testing.T, tab *Table, model map[Chunk]Chunk) {
	t.Helper()
	require.Equal(t, uint64(len(model)), tab.Len(), "Len")
	require.Equal(t, maximalRuns(model), tab.Entries(), "Entries")
	for old, new := range model {
		if got, ok := tab.Lookup(old); !ok || got != new {
			t.Fatalf("Lookup(%d) = %d, %v; want %d, true", old, got, ok, new)
		}
	}
	var chunks uint64
	runs := tableRuns(tab)
	for i, r := range runs {
		if r.N == 0 {
			t.Fatalf("empty run %+v", r)
		}
		if i > 0 {
			p := runs[i-1]
			if r.Old <= p.Old+Chunk(p.N-1) {
				t.Fatalf("run %+v overlaps %+v", r, p)
			}
			if p.Old+Chunk(p.N) == r.Old && p.New+Chunk(p.N) == r.New {
				t.Fatalf("runs %+v and %+v should be one", p, r)
			}
		}
		for j := range Chunk(r.N) {
			if want, ok := model[r.Old+j]; !ok || want != r.New+j {
				t.Fatalf("run %+v maps chunk %d to %d; model: %d, %v", r, r.Old+j, r.New+j, want, ok)
			}
		}
		chunks += r.N
	}
	require.Equal(t, uint64(len(model)), chunks, "chunks in Range")
	require.Len(t, runs, tab.Entries(), "Range runs vs Entries")
	requireTableInvariants(t, tab)
}

// requireTableInvariants checks the internal structure: hash runs shorter
// than promoteLen with correct marks, extents at least demoteLen long, the
// counters, and the B+ tree's shape.
func requireTableInvariants(t *testing.T, tab *Table) {
	t.Helper()
	heads, slots, inRuns := 0, 0, 0
	tab.hash.each(func(s *chunkSlot) bool {
		slots++
		if s.val&metaHead == 0 {
			return true
		}
		heads++
		n := runLen(s.val)
		inRuns += int(n)
		old, new := s.chunk(), s.val&newMask
		require.True(t, n >= 1 && n < promoteLen, "hash run at %d has length %d", old, n)
		for i := range n {
			r := tab.hash.find(old + i + 1)
			if r == nil || r.val != new+i|slotMeta(i, n) {
				t.Fatalf("hash run at %d (%d long): chunk %d has slot %+v", old, n, old+i, r)
			}
		}
		return true
	})
	for b := range tab.hash.buckets {
		for _, s := range tab.hash.buckets[b] {
			if s.key&keyMask == 0 {
				continue
			}
			x := hashKey(s.key&keyMask, tab.hash.seed)
			c1, c2 := tab.hash.candidatesOf(x)
			if uint64(b) != c1 && uint64(b) != c2 {
				t.Fatalf("chunk %d in bucket %d, not one of its own (%d, %d)", s.chunk(), b, c1, c2)
			}
			if uint64(b) != c1 && tab.hash.buckets[c1][x&3].key&filterMask(x) == 0 {
				t.Fatalf("chunk %d lives in its second bucket but its first one's filter misses it", s.chunk())
			}
		}
	}
	require.Equal(t, tab.hash.count, slots, "hash count")
	require.Equal(t, slots, inRuns, "hash slots outside any run")
	require.Equal(t, heads, tab.hashRuns, "hash runs")
	require.LessOrEqual(t, tab.hash.count, tab.hash.limit, "hash load")

	var chunks uint64
	count := 0
	tab.extents.each(func(x *extent) bool {
		require.GreaterOrEqual(t, x.n, uint64(demoteLen), "extent %+v", *x)
		require.Nil(t, tab.hash.find(uint64(x.old)+1), "extent %+v also in the hash", *x)
		chunks += x.n
		count++
		return true
	})
	require.Equal(t, tab.extentCount, chunks, "extent chunks")
	require.Equal(t, tab.extents.count, count, "extent count")
	requireTreeShape(t, &tab.extents)
}

// requireTreeShape checks the B+ tree: equal leaf depth, node sizes, sorted
// keys and separators that bound their subtrees.
func requireTreeShape(t *testing.T, tree *extentTree) {
	t.Helper()
	if tree.root == nil {
		require.Zero(t, tree.count, "extents without a tree")
		return
	}
	depth := -1
	var walk func(n *extentNode, lo, hi Chunk, level int, root bool) int
	walk = func(n *extentNode, lo, hi Chunk, level int, root bool) int {
		if !root {
			require.GreaterOrEqual(t, n.size(), extentNodeMin, "node underfull")
		}
		require.LessOrEqual(t, n.size(), extentNodeMax, "node overfull")
		if n.leaf() {
			if depth < 0 {
				depth = level
			}
			require.Equal(t, depth, level, "leaves at different depths")
			for i, x := range n.items {
				require.True(t, x.old >= lo && x.old < hi, "extent %+v outside [%d,%d)", x, lo, hi)
				if i > 0 {
					require.Greater(t, x.old, n.items[i-1].last(), "extents out of order")
				}
			}
			return len(n.items)
		}
		require.Len(t, n.keys, len(n.kids)-1, "separators")
		if root {
			require.GreaterOrEqual(t, len(n.kids), 2, "inner root with one child")
		}
		total := 0
		for i, k := range n.kids {
			l, h := lo, hi
			if i > 0 {
				l = n.keys[i-1]
			}
			if i < len(n.keys) {
				h = n.keys[i]
			}
			require.LessOrEqual(t, l, h, "separators out of order")
			total += walk(k, l, h, level+1, false)
		}
		return total
	}
	require.Equal(t, tree.count, walk(tree.root, 0, math.MaxUint64, 0, true), "extents in the tree")
}

func TestTableVector16(t *testing.T) {
	tab := NewTable()
	for _, e := range []Exception{{10, 2}, {11, 3}, {12, 4}} {
		require.NoError(t, tab.Insert(e))
	}
	assert.Equal(t, 1, tab.Entries())
	assert.Equal(t, uint64(3), tab.Len())
	got, ok := tab.Lookup(11)
	assert.True(t, ok)
	assert.Equal(t, Chunk(3), got)
	assert.Equal(t, []tableRun{{10, 2, 3}}, tableRuns(tab))

	// The kernel keeps (255,x) and (256,x+1) apart (its buckets hold 256
	// chunks and its run counts 8 bits); our runs cross that boundary.
	tab = NewTable()
	require.NoError(t, tab.Insert(Exception{255, 700}))
	require.NoError(t, tab.Insert(Exception{256, 701}))
	assert.Equal(t, 1, tab.Entries())
	assert.Equal(t, []tableRun{{255, 700, 2}}, tableRuns(tab))
}

func TestTableInsertErrors(t *testing.T) {
	tab := NewTable()
	require.NoError(t, tab.Insert(Exception{7, 100}))
	for i := range Chunk(200) { // an extent
		require.NoError(t, tab.Insert(Exception{1000 + i, 5000 + i}))
	}
	require.Equal(t, 2, tab.Entries())

	for _, tc := range []struct {
		name string
		e    Exception
		want error
	}{
		{"duplicate in the hash", Exception{7, 101}, errChunkMapped},
		{"same exception again", Exception{7, 100}, errChunkMapped},
		{"duplicate in an extent", Exception{1100, 1}, errChunkMapped},
		{"old beyond MaxChunk", Exception{MaxChunk + 1, 1}, errChunkRange},
		{"new beyond MaxChunk", Exception{1, MaxChunk + 1}, errChunkRange},
		{"old at 2^64-1", Exception{math.MaxUint64, 1}, errChunkRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tab.Insert(tc.e)
			require.Error(t, err)
			assert.True(t, errors.Is(err, tc.want), "error %v", err)
			assert.Contains(t, err.Error(), tc.e.String())
			assert.Equal(t, uint64(201), tab.Len())
			assert.Equal(t, 2, tab.Entries())
		})
	}
	got, ok := tab.Lookup(7)
	assert.True(t, ok)
	assert.Equal(t, Chunk(100), got, "a refused insert changed the table")

	// The extreme chunk numbers themselves are fine.
	require.NoError(t, tab.Insert(Exception{MaxChunk, MaxChunk}))
	require.NoError(t, tab.Insert(Exception{0, 0}))
	got, ok = tab.Lookup(MaxChunk)
	assert.True(t, ok)
	assert.Equal(t, MaxChunk, got)
	_, ok = tab.Lookup(math.MaxUint64) // would be key 0, the empty slot
	assert.False(t, ok)
}

// fillRun inserts length exceptions old..→new.. in increasing order and
// returns their model.
func fillRun(t *testing.T, tab *Table, model map[Chunk]Chunk, old, new Chunk, length uint64) {
	t.Helper()
	for i := range Chunk(length) {
		require.NoError(t, tab.Insert(Exception{old + i, new + i}))
		model[old+i] = new + i
	}
}

func TestTableRemoveSplitsRuns(t *testing.T) {
	// Runs stored in the hash (5, 40 chunks), as an extent (1000), and as an
	// extent whose cut parts fall below demoteLen and move to the hash (70).
	// Around the run: a singleton just before it (not joinable) and a run of
	// 3 after a one-chunk gap, so there are 3 entries to begin with.
	for _, length := range []int64{5, 40, 70, 1000} {
		for _, tc := range []struct {
			name        string
			from, n     int64 // relative to the run's first chunk
			wantEntries int
		}{
			{"first chunk", 0, 1, 3},
			{"last chunk", length - 1, 1, 3},
			{"middle chunk", length / 2, 1, 4},
			{"head half", 0, length / 2, 3},
			{"tail half", length / 2, length - length/2, 3},
			{"middle third", length / 3, length / 3, 4},
			{"whole run and the gap", 0, length + 1, 2},
			{"everything", -1, length + 5, 0},
			{"from before the singleton", -2, 3, 2},
			{"past the end", length - 2, 10, 2},
		} {
			t.Run(fmt.Sprintf("len%d/%s", length, tc.name), func(t *testing.T) {
				tab := NewTable()
				model := map[Chunk]Chunk{}
				const base, cow = 5000, 900
				fillRun(t, tab, model, base, cow, uint64(length))
				fillRun(t, tab, model, base-1, 7, 1)
				fillRun(t, tab, model, base+Chunk(length)+1, 20000, 3)
				require.Equal(t, 3, tab.Entries())

				start := Chunk(base + tc.from)
				tab.Remove(start, uint64(tc.n))
				for c := start; c < start+Chunk(tc.n); c++ {
					delete(model, c)
				}
				requireMatchesModel(t, tab, model)
				assert.Equal(t, tc.wantEntries, tab.Entries())
			})
		}
	}
}

func TestTableRemoveEdgeRanges(t *testing.T) {
	tab := NewTable()
	model := map[Chunk]Chunk{}
	fillRun(t, tab, model, 0, 0, 100)
	fillRun(t, tab, model, MaxChunk-99, MaxChunk-99, 100)
	fillRun(t, tab, model, 1<<40, 5, 3)
	requireMatchesModel(t, tab, model)

	tab.Remove(0, 0) // nothing
	tab.Remove(MaxChunk+1, 10)
	requireMatchesModel(t, tab, model)

	tab.Remove(MaxChunk-10, math.MaxUint64) // clipped at MaxChunk
	for c := MaxChunk - 10; c <= MaxChunk && c > 0; c++ {
		delete(model, c)
	}
	requireMatchesModel(t, tab, model)

	tab.Remove(0, math.MaxUint64) // everything, by scanning
	assert.Zero(t, tab.Len())
	assert.Zero(t, tab.Entries())
	assert.Empty(t, tableRuns(tab))
	requireTableInvariants(t, tab)
}

func TestTableRemoveManySparse(t *testing.T) {
	// A range much larger than the hash takes the scanning path; it must
	// cut runs that straddle its ends.
	tab := NewTable()
	model := map[Chunk]Chunk{}
	rng := rand.New(rand.NewPCG(1, 2))
	for range 5000 {
		old := Chunk(rng.Uint64N(1 << 30))
		if _, ok := model[old]; ok {
			continue
		}
		length := 1 + rng.Uint64N(100)
		new := Chunk(rng.Uint64N(1 << 40))
		for i := range Chunk(length) {
			if _, ok := model[old+i]; ok {
				break
			}
			require.NoError(t, tab.Insert(Exception{old + i, new + i}))
			model[old+i] = new + i
		}
	}
	requireMatchesModel(t, tab, model)
	from, n := Chunk(1<<28), uint64(1<<29)
	tab.Remove(from, n)
	for old := range model {
		if old >= from && old < from+Chunk(n) {
			delete(model, old)
		}
	}
	requireMatchesModel(t, tab, model)
}

func TestTableBridge(t *testing.T) {
	for _, tc := range []struct {
		name          string
		left, right   uint64 // run lengths either side of the gap chunk
		insertReverse bool
	}{
		{"singletons", 1, 1, false},
		{"short runs", 10, 20, false},
		{"short runs promoted", 40, 40, false},
		{"extent and short run", 100, 5, false},
		{"short run and extent", 5, 100, false},
		{"two extents", 100, 300, false},
		{"two extents, built backwards", 100, 300, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab := NewTable()
			model := map[Chunk]Chunk{}
			const old, new = 1 << 33, 77
			gap := Chunk(tc.left)
			insert := func(from, to Chunk) { // [from, to)
				for i := range to - from {
					c := from + i
					if tc.insertReverse {
						c = to - 1 - i
					}
					require.NoError(t, tab.Insert(Exception{old + c, new + c}))
					model[old+c] = new + c
				}
			}
			insert(0, gap)
			insert(gap+1, gap+1+Chunk(tc.right))
			require.Equal(t, 2, tab.Entries())
			requireMatchesModel(t, tab, model)

			insert(gap, gap+1)
			assert.Equal(t, 1, tab.Entries())
			assert.Equal(t, []tableRun{{old, new, tc.left + 1 + tc.right}}, tableRuns(tab))
			requireMatchesModel(t, tab, model)
		})
	}
}

func TestTableNonJoinableNeighbours(t *testing.T) {
	// Adjacent in Old but not in New (and vice versa) must not join.
	tab := NewTable()
	model := map[Chunk]Chunk{}
	for _, e := range []Exception{{100, 50}, {101, 52}, {102, 51}, {103, 53}, {200, 10}, {202, 11}} {
		require.NoError(t, tab.Insert(e))
		model[e.Old] = e.New
	}
	requireMatchesModel(t, tab, model)
	assert.Equal(t, 6, tab.Entries())
}

// tableWorkload generates the origin chunk and COW chunk of the next insert
// for one key distribution of the model test.
type tableWorkload struct {
	name string
	// insertPct and removePct are the shares of Insert and Remove
	// operations; the rest are Lookups.
	insertPct, removePct int
	// extents says the workload must create extents.
	extents bool
	insert  func(rng *rand.Rand, next *Chunk) (old, new Chunk)
	remove  func(rng *rand.Rand) (old Chunk, n uint64)
	lookup  func(rng *rand.Rand) Chunk
}

// tableWorkloads are the key distributions of the model test: random chunks
// of a big device, a small hot area where runs form, join, are cut and
// promoted and demoted, sequential streams (some growing backwards), and the
// edges of the chunk space.
func tableWorkloads() []tableWorkload {
	const span = 1 << 22
	var streams [6]Chunk // positions of the sequential streams
	var hot, edge Chunk  // last chunks of the clustered and edges bursts
	return []tableWorkload{{
		name:      "uniform",
		insertPct: 55, removePct: 15,
		insert: func(rng *rand.Rand, next *Chunk) (Chunk, Chunk) {
			*next++
			return Chunk(rng.Uint64N(span)), *next
		},
		remove: func(rng *rand.Rand) (Chunk, uint64) { return Chunk(rng.Uint64N(span)), 1 + rng.Uint64N(4) },
		lookup: func(rng *rand.Rand) Chunk { return Chunk(rng.Uint64N(span)) },
	}, {
		// A small hot area written in bursts: the next chunk is mostly
		// just after (sometimes just before) the last one, so runs grow at
		// both ends, bridge and get promoted; removals cut holes of all
		// sizes. COW chunk = origin chunk + an offset of its 1 Ki-chunk
		// region 99% of the time, so neighbours join.
		name:      "clustered",
		insertPct: 60, removePct: 3, extents: true,
		insert: func(rng *rand.Rand, next *Chunk) (Chunk, Chunk) {
			switch r := rng.IntN(100); {
			case r < 70:
				hot = (hot + 1) % (1 << 14)
			case r < 85:
				hot = (hot + 1<<14 - 1) % (1 << 14)
			default:
				hot = Chunk(rng.Uint64N(1 << 14))
			}
			if rng.IntN(100) == 0 {
				*next++
				return hot, *next
			}
			return hot, hot + (hot>>10)*3 + 1<<20
		},
		remove: func(rng *rand.Rand) (Chunk, uint64) {
			if rng.IntN(20) != 0 {
				return Chunk(rng.Uint64N(1 << 14)), 1 + rng.Uint64N(3)
			}
			return Chunk(rng.Uint64N(1 << 14)), 1 + rng.Uint64N(200)
		},
		lookup: func(rng *rand.Rand) Chunk { return Chunk(rng.Uint64N(1<<14 + 10)) },
	}, {
		// Streams write sequentially (two of them backwards) and jump
		// now and then; each stream's COW chunks follow its origin ones.
		name:      "sequential",
		insertPct: 80, removePct: 4, extents: true,
		insert: func(rng *rand.Rand, next *Chunk) (Chunk, Chunk) {
			i := rng.IntN(len(streams))
			if streams[i] < 1<<16 || rng.IntN(2000) == 0 {
				streams[i] = 1<<16 + Chunk(rng.Uint64N(span))
			}
			old := streams[i]
			if i < 2 {
				streams[i]--
			} else {
				streams[i]++
			}
			return old, old + Chunk(i)<<30
		},
		remove: func(rng *rand.Rand) (Chunk, uint64) {
			// Merge-like: cut the tail (or head) of where a stream is.
			i := rng.IntN(len(streams))
			n := 1 + rng.Uint64N(40)
			if i < 2 {
				return streams[i] + 1, n
			}
			return streams[i] - Chunk(n), n
		},
		lookup: func(rng *rand.Rand) Chunk { return streams[rng.IntN(len(streams))] - Chunk(rng.IntN(100)) },
	}, {
		name:      "edges",
		insertPct: 70, removePct: 3, extents: true,
		insert: func(rng *rand.Rand, next *Chunk) (Chunk, Chunk) {
			// Mostly runs at both ends of the space, written in bursts
			// like "clustered"; 2% that do not join.
			if rng.IntN(10) == 0 {
				edge = Chunk(rng.Uint64N(300))
			}
			edge = (edge + 1) % 300
			d := edge
			switch rng.IntN(100) {
			case 0:
				return d, MaxChunk - d
			case 1:
				return MaxChunk - d, d
			}
			if rng.IntN(2) == 0 {
				return d, d
			}
			return MaxChunk - d, MaxChunk - d
		},
		remove: func(rng *rand.Rand) (Chunk, uint64) {
			n := 1 + rng.Uint64N(3)
			if rng.IntN(20) == 0 {
				n = rng.Uint64() // up to the end of the space
			}
			if rng.IntN(2) == 0 {
				return Chunk(rng.Uint64N(300)), min(n, 100)
			}
			return MaxChunk - Chunk(rng.Uint64N(300)), n
		},
		lookup: func(rng *rand.Rand) Chunk {
			if rng.IntN(2) == 0 {
				return Chunk(rng.Uint64N(300))
			}
			return MaxChunk - Chunk(rng.Uint64N(300))
		},
	}}
}

func TestTableModel(t *testing.T) {
	ops, checkEvery := 400_000, 100_000
	if testing.Short() || raceEnabled {
		ops, checkEvery = 80_000, 20_000
	}
	for _, seed := range []uint64{1, 2, 3} {
		for _, w := range tableWorkloads() {
			t.Run(fmt.Sprintf("%s/seed%d", w.name, seed), func(t *testing.T) {
				runTableModel(t, w, seed, ops, checkEvery)
			})
		}
	}
}

// runTableModel applies ops random Insert/Remove/Lookup operations to a
// Table and to a map, comparing each answer, and the whole table every
// checkEvery operations.
func runTableModel(t *testing.T, w tableWorkload, seed uint64, ops, checkEvery int) {
	rng := rand.New(rand.NewPCG(seed, 0x7ab1e))
	tab := NewTable()
	model := map[Chunk]Chunk{}
	var next Chunk
	inserts, refused, removed, maxExtents := 0, 0, 0, 0
	for op := 1; op <= ops; op++ {
		switch r := rng.IntN(100); {
		case r < w.insertPct:
			old, new := w.insert(rng, &next)
			err := tab.Insert(Exception{old, new})
			if _, dup := model[old]; dup {
				require.ErrorIs(t, err, errChunkMapped, "op %d: insert %d→%d over %d", op, old, new, model[old])
				refused++
				break
			}
			require.NoError(t, err, "op %d", op)
			model[old] = new
			inserts++
		case r < w.insertPct+w.removePct:
			old, n := w.remove(rng)
			tab.Remove(old, n)
			for i := uint64(0); i < n && old <= MaxChunk-Chunk(i); i++ {
				if _, ok := model[old+Chunk(i)]; ok {
					delete(model, old+Chunk(i))
					removed++
				}
			}
		default:
			old := w.lookup(rng)
			got, ok := tab.Lookup(old)
			want, wantOK := model[old]
			require.Equal(t, wantOK, ok, "op %d: Lookup(%d) found", op, old)
			require.Equal(t, want, got, "op %d: Lookup(%d)", op, old)
			if op%8 == 0 {
				requireLookupRange(t, tab, model, old, 1+rng.IntN(70))
			}
		}
		// Full checks cost O(len(model)): often while the table is small.
		if op%checkEvery == 0 || (op%2000 == 0 && len(model) < 20000) {
			requireMatchesModel(t, tab, model)
		}
		maxExtents = max(maxExtents, tab.extents.count)
	}
	requireMatchesModel(t, tab, model)
	// The workload must have exercised what it is for.
	require.Positive(t, inserts)
	require.Positive(t, removed)
	if w.extents {
		assert.Positive(t, maxExtents, "no run was ever long enough for an extent")
	}
	t.Logf("%d inserts (%d refused), %d removed, final %d exceptions in %d entries (%d extents, at most %d)",
		inserts, refused, removed, tab.Len(), tab.Entries(), tab.extents.count, maxExtents)
}

// requireLookupRange checks LookupRange of n chunks from first against the
// model, writing over stale answers so that each must be set.
func requireLookupRange(t *testing.T, tab *Table, model map[Chunk]Chunk, first Chunk, n int) {
	t.Helper()
	n = int(min(uint64(n), uint64(MaxChunk-first)+1))
	into := make([]LookupResult, n)
	for i := range into {
		into[i] = LookupResult{New: 12345, Found: true}
	}
	tab.LookupRange(first, into)
	for i, got := range into {
		want, ok := model[first+Chunk(i)]
		require.Equal(t, LookupResult{New: want, Found: ok}, got, "LookupRange(%d, %d): chunk %d", first, n, first+Chunk(i))
		require.False(t, ok && tab.RulesOut(first, uint64(n)), "RulesOut(%d, %d) with chunk %d mapped", first, n, first+Chunk(i))
	}
}

func TestTableLookupRangeEmpty(t *testing.T) {
	tab := NewTable()
	requireLookupRange(t, tab, nil, 100, 64)
	require.NoError(t, tab.Insert(Exception{Old: 130, New: 7}))
	requireLookupRange(t, tab, map[Chunk]Chunk{130: 7}, 100, 64)
	tab.Remove(130, 1)
	requireLookupRange(t, tab, nil, 100, 64)
}

func TestTableRulesOut(t *testing.T) {
	tab := NewTable()
	assert.True(t, tab.RulesOut(0, 1024), "a new table has no exceptions")
	assert.False(t, tab.RulesOut(0, 0), "an empty range")
	assert.False(t, tab.RulesOut(MaxChunk, 2), "a range past MaxChunk")
	assert.False(t, new(Table).RulesOut(0, 1), "the zero table has no filter yet")
	require.NoError(t, tab.Insert(Exception{Old: 1000, New: 7}))
	assert.False(t, tab.RulesOut(1000, 1))
	assert.False(t, tab.RulesOut(990, 64), "a range around the exception")
	assert.True(t, tab.RulesOut(1<<30, 64), "a range far from it")
	tab.Reset()
	assert.True(t, tab.RulesOut(1000, 1), "after Reset")
}

// TestTableRulesOutConcurrent checks that RulesOut, called without holding
// the table, never rules out an exception whose Insert returned before the
// call, while the inserts grow the filter several times over.
func TestTableRulesOutConcurrent(t *testing.T) {
	tab := NewTable()
	const n = 40_000
	chunks := make([]Chunk, n)
	for i := range chunks {
		chunks[i] = Chunk(mix64(uint64(i)) % (1 << 32))
	}
	var inserted atomic.Int64 // chunks[:inserted] are in the table
	var wg sync.WaitGroup
	for r := range 2 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(r), 9))
			for {
				k := inserted.Load()
				if k == 0 {
					continue
				}
				c := chunks[rng.Int64N(k)]
				if tab.RulesOut(c-c%8, 8) {
					t.Errorf("RulesOut(%d, 8) after chunk %d was inserted (%d inserted)", c-c%8, c, k)
					return
				}
				if k == n {
					return
				}
			}
		})
	}
	bitsBefore := tab.filter.nbits()
	for i, c := range chunks {
		if err := tab.Insert(Exception{Old: c, New: Chunk(i)}); err != nil {
			require.ErrorContains(t, err, "already has an exception")
		}
		inserted.Store(int64(i + 1))
	}
	wg.Wait()
	assert.Greater(t, tab.filter.nbits(), 4*bitsBefore, "the filter grew meanwhile")
}

func TestTableSequentialRunIsOneEntry(t *testing.T) {
	const n = 1_000_000
	for _, tc := range []struct {
		name string
		at   func(i Chunk) Chunk // i-th insert's offset in the run
	}{
		{"forwards", func(i Chunk) Chunk { return i }},
		{"backwards", func(i Chunk) Chunk { return n - 1 - i }},
		{"from the middle out", func(i Chunk) Chunk { // alternately after and before
			if i%2 == 0 {
				return n/2 + i/2
			}
			return n/2 - 1 - i/2
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const old, new = 1 << 40, 12345
			tab := NewTable()
			for i := range Chunk(n) {
				c := tc.at(i)
				require.NoError(t, tab.Insert(Exception{old + c, new + c}))
			}
			assert.Equal(t, 1, tab.Entries())
			assert.Equal(t, uint64(n), tab.Len())
			assert.Equal(t, []tableRun{{old, new, n}}, tableRuns(tab))
			for _, c := range []Chunk{0, 1, 255, 256, n / 2, n - 1} {
				got, ok := tab.Lookup(old + c)
				assert.True(t, ok, "chunk %d", old+c)
				assert.Equal(t, new+c, got, "chunk %d", old+c)
			}
			for _, c := range []Chunk{old - 1, old + n} {
				_, ok := tab.Lookup(c)
				assert.False(t, ok, "chunk %d", c)
			}
			requireTableInvariants(t, tab)
		})
	}
}

func TestTableCommonPatterns(t *testing.T) {
	t.Run("8KiB random writes", func(t *testing.T) {
		// Two 4 KiB chunks per write: n/2 runs of 2, each in the hash.
		tab := NewTable()
		model := map[Chunk]Chunk{}
		rng := rand.New(rand.NewPCG(5, 6))
		var next Chunk
		for len(model) < 200_000 {
			old := Chunk(rng.Uint64N(1<<30)) &^ 1
			if _, dup := model[old]; dup {
				continue
			}
			for i := range Chunk(2) {
				require.NoError(t, tab.Insert(Exception{old + i, next}))
				model[old+i] = next
				next++
			}
		}
		requireMatchesModel(t, tab, model)
		assert.Equal(t, 100_000, tab.Entries())
		assert.Zero(t, tab.extents.count)
	})
	t.Run("interleaved streams", func(t *testing.T) {
		// 8 streams written round-robin, each into its own COW area:
		// one extent each. With one shared COW allocator they join
		// nothing: one entry per chunk.
		tab, shared := NewTable(), NewTable()
		for i := range Chunk(80_000) {
			s, k := i%8, i/8
			require.NoError(t, tab.Insert(Exception{s<<32 + k, s<<33 + k}))
			require.NoError(t, shared.Insert(Exception{s<<32 + k, i}))
		}
		assert.Equal(t, 8, tab.Entries())
		assert.Equal(t, 8, tab.extents.count)
		assert.Equal(t, 80_000, shared.Entries())
		requireTableInvariants(t, tab)
		requireTableInvariants(t, shared)
	})
	t.Run("merge removes tails", func(t *testing.T) {
		// 1,000 runs of 1,000, removed from their ends a few chunks at
		// a time, as snapshot merge does.
		tab := NewTable()
		model := map[Chunk]Chunk{}
		for r := range Chunk(1000) {
			fillRun(t, tab, model, r*5000, r*1000, 1000)
		}
		require.Equal(t, 1000, tab.Entries())
		for r := range Chunk(1000) {
			for left := Chunk(1000); left > 0; {
				n := min(left, 7)
				left -= n
				from := r*5000 + left
				tab.Remove(from, uint64(n))
				for c := from; c < from+n; c++ {
					delete(model, c)
				}
			}
			if r%250 == 0 {
				requireMatchesModel(t, tab, model)
			}
		}
		assert.Zero(t, tab.Len())
		assert.Zero(t, tab.Entries())
		requireTableInvariants(t, tab)
	})
}

func TestTableGrowth(t *testing.T) {
	// Insert scattered chunks, checking at every growth of the hash (and
	// after Remove shrinks it) that every exception is still found and
	// that absent chunks are not.
	const n = 300_000
	tab := NewTable()
	growths := 0
	buckets := len(tab.hash.buckets)
	check := func(present uint64) {
		t.Helper()
		for i := range present {
			if got, ok := tab.Lookup(randomChunk(i)); !ok || got != Chunk(i) {
				t.Fatalf("after %d inserts: Lookup(%d) = %d, %v", present, randomChunk(i), got, ok)
			}
		}
		for i := present; i < present+1000; i++ {
			if _, ok := tab.Lookup(randomChunk(i)); ok {
				t.Fatalf("after %d inserts: Lookup(%d) hit", present, randomChunk(i))
			}
		}
	}
	for i := range uint64(n) {
		require.NoError(t, tab.Insert(Exception{randomChunk(i), Chunk(i)}))
		if len(tab.hash.buckets) != buckets {
			growths++
			buckets = len(tab.hash.buckets)
			check(i + 1)
		}
	}
	require.Equal(t, uint64(n), tab.Len())
	require.Greater(t, growths, 15, "the hash grew too few times to test growth")
	requireTableInvariants(t, tab)

	// Remove nearly everything, one chunk at a time: the hash shrinks.
	for i := uint64(1000); i < n; i++ {
		tab.Remove(randomChunk(i), 1)
	}
	assert.Less(t, len(tab.hash.buckets), buckets/10, "the hash did not shrink")
	assert.Equal(t, uint64(1000), tab.Len())
	check(1000)
	requireTableInvariants(t, tab)
}

func TestTableMemoryPerException(t *testing.T) {
	if testing.Short() {
		t.Skip("builds tables of up to 3,000,000 exceptions")
	}
	// Heap after a full GC, per exception, for scattered (non-consecutive)
	// chunks: right after every growth of the hash (where the load is
	// lowest, so the cost per exception highest) and at sizes in between,
	// from 1,000 to 3,000,000. Below 50,000 exceptions, 32 identical
	// tables are measured together so that a few kilobytes of unrelated
	// heap noise do not swamp them.
	const limit = 32
	worst, worstAt, checks := 0.0, uint64(0), 0
	measure := func(from, to uint64, copies int) {
		base := heapAlloc()
		tabs := make([]*Table, copies)
		for k := range tabs {
			tabs[k] = NewTable()
		}
		buckets := len(tabs[0].hash.buckets)
		next := from
		for i := range to {
			for _, tab := range tabs {
				if err := tab.Insert(Exception{randomChunk(i), Chunk(i)}); err != nil {
					t.Fatal(err)
				}
			}
			n := i + 1
			grew := len(tabs[0].hash.buckets) != buckets
			buckets = len(tabs[0].hash.buckets)
			if n < from || !(grew || n == next || n == to) {
				continue
			}
			if n == next {
				next = next * 5 / 4
			}
			perException := float64(int64(heapAlloc()-base)) / float64(n*uint64(copies))
			checks++
			if perException > worst {
				worst, worstAt = perException, n
			}
			assert.LessOrEqual(t, perException, float64(limit), "%d exceptions (just grew: %v)", n, grew)
		}
		runtime.KeepAlive(tabs)
	}
	maxN := uint64(3_000_000)
	if raceEnabled {
		maxN = 300_000
	}
	measure(1000, 50_000, 32)
	measure(50_000, maxN, 1)
	t.Logf("%d sizes from 1,000 to %d: at most %.1f bytes per exception (at %d)", checks, maxN, worst, worstAt)
}

func TestTableReset(t *testing.T) {
	tab := NewTable()
	for i := range uint64(100_000) {
		require.NoError(t, tab.Insert(Exception{randomChunk(i), Chunk(i)}))
	}
	model := map[Chunk]Chunk{}
	fillRun(t, tab, model, 7, 7, 500) // an extent too
	require.Equal(t, uint64(100_500), tab.Len())

	tab.Reset()
	assert.Zero(t, tab.Len())
	assert.Zero(t, tab.Entries())
	assert.Empty(t, tableRuns(tab))
	_, ok := tab.Lookup(randomChunk(5))
	assert.False(t, ok)
	_, ok = tab.Lookup(100)
	assert.False(t, ok)
	assert.Equal(t, hashMinBuckets, len(tab.hash.buckets), "Reset kept the memory")

	// The table works as new.
	model = map[Chunk]Chunk{}
	fillRun(t, tab, model, 7, 9, 100)
	fillRun(t, tab, model, randomChunk(5), 1, 1)
	requireMatchesModel(t, tab, model)
}

func TestTableLookupDoesNotAllocate(t *testing.T) {
	tab := randomTable(t, 10_000)
	for i := range Chunk(1000) {
		require.NoError(t, tab.Insert(Exception{1<<50 + i, i}))
	}
	for _, tc := range []struct {
		name string
		old  Chunk
		want bool
	}{
		{"hash hit", randomChunk(7), true},
		{"hash miss", randomChunk(20_000), false},
		{"extent hit", 1<<50 + 500, true},
		{"miss past an extent", 1<<50 + 1000, false},
		{"beyond MaxChunk", MaxChunk + 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			allocs := testing.AllocsPerRun(1000, func() {
				if _, ok := tab.Lookup(tc.old); ok != tc.want {
					t.Fatalf("Lookup(%d) found = %v", tc.old, ok)
				}
			})
			assert.Zero(t, allocs)
		})
	}
}

func TestTableRangeStops(t *testing.T) {
	tab := NewTable()
	model := map[Chunk]Chunk{}
	for r := range Chunk(5) {
		fillRun(t, tab, model, r*1000, r*1000, 100) // extents
		fillRun(t, tab, model, r*1000+500, 7+r, 1)  // singletons
	}
	require.Equal(t, 10, tab.Entries())
	for _, stopAfter := range []int{1, 3, 5, 6, 9} {
		calls := 0
		tab.Range(func(old, new Chunk, n uint64) bool {
			calls++
			return calls < stopAfter
		})
		assert.Equal(t, stopAfter, calls)
	}
}

func TestTableZeroValue(t *testing.T) {
	var tab Table
	_, ok := tab.Lookup(5)
	assert.False(t, ok)
	tab.Remove(0, 100)
	assert.Empty(t, tableRuns(&tab))
	model := map[Chunk]Chunk{}
	fillRun(t, &tab, model, 10, 20, 3)
	fillRun(t, &tab, model, 100, 200, 100)
	requireMatchesModel(t, &tab, model)
}

func TestTableRemoveAcrossRuns(t *testing.T) {
	// One range over extents, hash runs and singletons, cutting an extent
	// and a hash run at its ends. With a small hash the range is larger
	// than the hash, which is then scanned; with a big one it is probed in
	// the gaps between extents.
	for _, bigHash := range []bool{false, true} {
		t.Run(fmt.Sprintf("bigHash=%v", bigHash), func(t *testing.T) {
			tab := NewTable()
			model := map[Chunk]Chunk{}
			if bigHash {
				for i := range Chunk(10_000) {
					fillRun(t, tab, model, 1<<30+2*i, i, 1)
				}
			}
			fillRun(t, tab, model, 1000, 0, 100)    // extent 1000-1099
			fillRun(t, tab, model, 1100, 5000, 5)   // hash run 1100-1104
			fillRun(t, tab, model, 1106, 6000, 1)   // singleton
			fillRun(t, tab, model, 1110, 9000, 100) // extent 1110-1209
			fillRun(t, tab, model, 1210, 7, 3)      // hash run 1210-1212
			requireMatchesModel(t, tab, model)
			slots := uint64(len(tab.hash.buckets) * slotsPerBucket)
			require.Equal(t, bigHash, slots > 162, "hash size for this case")

			tab.Remove(1050, 162) // 1050-1211
			for c := Chunk(1050); c <= 1211; c++ {
				delete(model, c)
			}
			requireMatchesModel(t, tab, model)
			got, ok := tab.Lookup(1212)
			assert.True(t, ok)
			assert.Equal(t, Chunk(9), got)
			_, ok = tab.Lookup(1100)
			assert.False(t, ok)
		})
	}
}

func TestTableConcurrentReaders(t *testing.T) {
	// Stores call the read-only methods under a read lock, from many
	// goroutines at once; under -race this fails if any of them writes.
	tab := randomTable(t, 20_000)
	model := map[Chunk]Chunk{}
	fillRun(t, tab, model, 1<<50, 3, 1000)
	var wg sync.WaitGroup
	for g := range uint64(4) {
		wg.Go(func() {
			for i := range uint64(5000) {
				if got, ok := tab.Lookup(randomChunk(i)); !ok || got != Chunk(i) {
					t.Errorf("Lookup(%d) = %d, %v", randomChunk(i), got, ok)
					return
				}
				tab.Lookup(randomChunk(1_000_000 + g*5000 + i))
				tab.Lookup(1<<50 + Chunk(i%2000))
			}
			runs := 0
			tab.Range(func(Chunk, Chunk, uint64) bool { runs++; return true })
			if runs != tab.Entries() || tab.Len() != 21_000 {
				t.Errorf("Range saw %d runs of %d, Len %d", runs, tab.Entries(), tab.Len())
			}
		})
	}
	wg.Wait()
}

func TestTableGroupFilterSelective(t *testing.T) {
	// Scattered exceptions in the first 2^20 chunks: the filter must say
	// "maybe" for every group that has one, and "no" for most groups of
	// the next 2^20 chunks, which have none.
	tab := NewTable()
	rng := rand.New(rand.NewPCG(5, 6))
	const area = 1 << 20
	groups := map[uint64]bool{}
	for i := range 20_000 {
		c := Chunk(rng.Uint64N(area))
		if tab.Insert(Exception{Old: c, New: Chunk(i)}) == nil {
			groups[uint64(c)>>groupShift] = true
		}
	}
	for g := range groups {
		require.True(t, tab.filter.mayHave(g), "group %d has an exception", g)
	}
	maybe := 0
	const probed = area >> groupShift
	for g := uint64(area >> groupShift); g < 2*area>>groupShift; g++ {
		if tab.filter.mayHave(g) {
			maybe++
		}
	}
	assert.Less(t, float64(maybe)/probed, 1.0/4, "%d of %d empty groups may have exceptions", maybe, probed)
	assert.LessOrEqual(t, tab.filter.nbits()/8, 2*len(groups), "filter bytes per group")
	t.Logf("%d groups with exceptions, filter %d bits, %d of %d empty groups pass", len(groups), tab.filter.nbits(), maybe, probed)
}
