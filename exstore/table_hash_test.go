package exstore

import (
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// requireHashHolds checks that h holds exactly keys(0)..keys(n-1), keys(i)
// with value i×3, each in one of its buckets with its overflow filter bit set
// when it is in its second (requireTableInvariants), and that keys(n) to
// keys(2n-1) are absent.
func requireHashHolds(t *testing.T, h *chunkHash, keys func(i uint64) uint64, n uint64) {
	t.Helper()
	require.Equal(t, int(n), h.count)
	for i := range n {
		s := h.find(keys(i))
		if s == nil || s.val != i*3 {
			t.Fatalf("key %d: slot %+v", keys(i), s)
		}
	}
	for i := n; i < 2*n; i++ {
		if s := h.find(keys(i)); s != nil {
			t.Fatalf("absent key %d found: %+v", keys(i), s)
		}
	}
	tab := &Table{hash: *h}
	for i := range n {
		tab.hash.find(keys(i)).val |= slotMeta(0, 1) // singleton runs, for the checker
	}
	tab.hashRuns = int(n)
	requireTableInvariants(t, tab)
	for i := range n {
		tab.hash.find(keys(i)).val &= newMask
	}
}

func TestTableHashFullTableRebuilds(t *testing.T) {
	// With growth disabled, insertions run into failed eviction walks:
	// the hash must rebuild (reseeding, then growing) and lose nothing.
	for _, tc := range []struct {
		name string
		keys func(i uint64) uint64
	}{
		{"scattered", func(i uint64) uint64 { return uint64(randomChunk(i)) + 1 }},
		{"dense", func(i uint64) uint64 { return i + 1 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newChunkHash()
			h.buckets = makeBuckets(1000)
			const n = 20_000
			for i := range uint64(n) {
				h.limit = 1 << 62 // never grow on load alone
				h.insert(tc.keys(i), i*3)
			}
			assert.Greater(t, len(h.buckets), 1000, "never rebuilt")
			// It grows (by 1.5×) only when nearly full.
			load := float64(n) / float64(len(h.buckets)*slotsPerBucket)
			assert.Greater(t, load, 0.6, "rebuilt into too large a table")
			h.limit = max(loadLimit(len(h.buckets)), h.count) // it may be fuller than a growing hash
			requireHashHolds(t, &h, tc.keys, n)
		})
	}
}

func TestTableHashReseedsUnluckyKeys(t *testing.T) {
	// Nine keys sharing both candidate buckets cannot fit their eight
	// slots: in an almost empty hash the failure is bad luck, answered
	// by rehashing with another seed, not by growing.
	h := newChunkHash()
	h.buckets = makeBuckets(1000)
	h.limit = loadLimit(len(h.buckets))
	b1, b2 := h.candidates(1)
	var keys []uint64
	for k := uint64(1); len(keys) < 9; k++ {
		if c1, c2 := h.candidates(k); (c1 == b1 && c2 == b2) || (c1 == b2 && c2 == b1) {
			keys = append(keys, k)
		}
	}
	seed, size := h.seed, len(h.buckets)
	for i, k := range keys {
		h.insert(k, uint64(i)*3)
	}
	assert.NotEqual(t, seed, h.seed, "not reseeded")
	assert.Equal(t, size, len(h.buckets), "grew instead of reseeding")
	requireHashHolds(t, &h, func(i uint64) uint64 {
		if i < uint64(len(keys)) {
			return keys[i]
		}
		return 1<<50 + i // absent
	}, uint64(len(keys)))
}

func TestTableHashReseed(t *testing.T) {
	h := newChunkHash()
	keys := func(i uint64) uint64 { return i*7 + 1 }
	const n = 50_000
	for i := range uint64(n) {
		h.insert(keys(i), i*3)
	}
	size, seed := len(h.buckets), h.seed
	h.rebuildSeeded(size, seed^0x5555)
	assert.Equal(t, size, len(h.buckets))
	assert.NotEqual(t, seed, h.seed)
	requireHashHolds(t, &h, keys, n)
}

func TestTableHashFilterSkipsSecondBucket(t *testing.T) {
	// Fill a hash to its growth point and count, for absent keys, how
	// often the filter lets a lookup skip the second bucket.
	h := newChunkHash()
	n := uint64(0)
	for h.count < h.limit {
		h.insert(uint64(randomChunk(n))+1, n)
		n++
	}
	skipped := 0
	const probes = 100_000
	for i := range uint64(probes) {
		x := hashKey(uint64(randomChunk(n+i))+1, h.seed)
		c1, _ := h.candidatesOf(x)
		if h.buckets[c1][x&3].key&filterMask(x) == 0 {
			skipped++
		}
	}
	t.Logf("load %.2f: %.1f%% of misses read one bucket", float64(h.count)/float64(len(h.buckets)*slotsPerBucket), 100*float64(skipped)/probes)
	assert.Greater(t, skipped, probes*85/100)
}

func TestTableHashShrink(t *testing.T) {
	h := newChunkHash()
	keys := func(i uint64) uint64 { return uint64(randomChunk(i)) + 1 }
	for i := range uint64(100_000) {
		h.insert(keys(i), i*3)
	}
	big := len(h.buckets)
	for i := uint64(1000); i < 100_000; i++ {
		h.remove(h.find(keys(i)))
	}
	h.shrinkIfSparse()
	assert.Less(t, len(h.buckets), big/50)
	load := float64(h.count) / float64(len(h.buckets)*slotsPerBucket)
	assert.InDelta(t, 0.6, load, 0.08, "load after shrinking")
	requireHashHolds(t, &h, keys, 1000)

	for range 1000 { // an empty hash shrinks to its minimum
		for i := range uint64(1000) {
			if s := h.find(keys(i)); s != nil {
				h.remove(s)
			}
		}
	}
	h.shrinkIfSparse()
	assert.Equal(t, hashMinBuckets, len(h.buckets))
	assert.Zero(t, h.count)
}

func TestTableHashGrownSize(t *testing.T) {
	for n := hashMinBuckets; n < 1<<22; n = grownSize(n) {
		g := grownSize(n)
		require.Greater(t, g, n)
		assert.LessOrEqual(t, g, n*3/2, "from %d", n)
		if n > 1000 {
			assert.GreaterOrEqual(t, g, n*13/10, "from %d", n)
		}
		if g < 1<<16 { // the allocator's rounding, where it is coarsest
			b := makeBuckets(g)
			assert.LessOrEqual(t, len(b), g*9/8, "from %d: allocation slack", n)
			assert.Zero(t, uintptr(unsafe.Pointer(&b[0]))%64, "%d buckets not cache-line aligned", len(b))
		}
	}
}
