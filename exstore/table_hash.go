package exstore

import (
	"math/bits"
	"slices"
)

// chunkSlot is one slot of the chunk hash: 16 bytes, four to a cache line.
//
// The low 57 bits of key hold the origin chunk plus one, so that zeroed
// memory reads as empty (origin chunks are at most MaxChunk = 2^56-1, so the
// key fits). The top 7 bits of the four keys of a bucket form the bucket's
// 28-bit overflow filter (see chunkHash). val holds the COW chunk in its low
// 56 bits and, in its top byte, the run marks the Table keeps (see slotMeta).
type chunkSlot struct {
	key uint64
	val uint64
}

const (
	keyBits = 57
	keyMask = 1<<keyBits - 1
)

// chunk is the origin chunk of an occupied slot.
func (s *chunkSlot) chunk() uint64 { return s.key&keyMask - 1 }

// chunkBucket is one cache line of slots. A key lives in one of two buckets.
// Bucket arrays are at least 256 bytes, and from there up Go's size classes
// are multiples of 64 bytes carved from page-aligned spans, so every bucket
// is an aligned cache line.
type chunkBucket [slotsPerBucket]chunkSlot

const (
	slotsPerBucket = 4

	// hashMaxLoad is the fill (in 1/1024ths) at which the hash grows.
	// Bucketized cuckoo hashing with two choices of four slots reaches about
	// 0.95 before insertions start failing, so 0.9 keeps them short.
	hashMaxLoad = 922 // ≈ 0.9
	// hashGrowNum/hashGrowDen is the growth factor. 1.5 rather than the usual
	// 2 keeps the load right after a growth at 0.6, so a slot costs at most
	// 16/0.6 ≈ 27 bytes per exception at every size.
	hashGrowNum, hashGrowDen = 3, 2
	// hashShrinkLoad is the fill (in 1/1024ths) below which Remove shrinks
	// the hash back to the load it has right after a growth.
	hashShrinkLoad = 205 // ≈ 0.2
	// hashMinBuckets is the size of an empty hash.
	hashMinBuckets = 4
	// hashMaxKicks bounds a cuckoo eviction walk; hitting it rebuilds the
	// hash (reseeded, or grown if it is nearly full).
	hashMaxKicks = 500
)

// chunkHash is an open-addressing bucketized cuckoo hash from origin chunk to
// slot value. Every key has two candidate buckets, so a lookup reads at most
// two cache lines, and it never allocates. Bucket counts need not be powers
// of two: a 64-bit hash is mapped onto them with a multiply-high
// ("fastrange"), which lets the hash grow by 1.5×.
//
// Most lookups read one line. Insertion prefers a key's first bucket, and
// each bucket carries a filter of the keys whose first bucket it is but
// which live in their second: one bit of 28, set when such a key is placed,
// cleared only when the hash is rebuilt. A key not in its first bucket whose
// filter bit is clear is absent, without reading the second bucket; that is
// every miss but a few percent, and misses are the common case (every read
// of a chunk that was never copied).
type chunkHash struct {
	buckets []chunkBucket
	count   int    // occupied slots
	limit   int    // count at which the next insertion grows the hash
	seed    uint64 // mixed into every key; changed when a rebuild reseeds
	rng     uint64 // xorshift state picking eviction victims
}

// newChunkHash returns an empty hash with its minimum size.
func newChunkHash() chunkHash {
	h := chunkHash{seed: 0x9e3779b97f4a7c15, rng: 0x2545f4914f6cdd1d}
	h.buckets = makeBuckets(hashMinBuckets)
	h.limit = loadLimit(len(h.buckets))
	return h
}

// makeBuckets allocates at least n zeroed buckets and returns all that the
// allocation holds: the allocator rounds sizes up to its size classes, and
// the slack is free capacity.
func makeBuckets(n int) []chunkBucket {
	b := slices.Grow([]chunkBucket(nil), n)
	return b[:cap(b)]
}

// grownSize is the bucket count after growing from n buckets: 1.5×, rounded
// down to whole 8 KiB pages once the array is large. The allocator rounds
// large objects up to pages, and that slack, up to 1/6 of the array at its
// smallest, would lower the load after growth below 0.6.
func grownSize(n int) int {
	g := n * hashGrowNum / hashGrowDen
	const pageBuckets = 8 << 10 / (slotsPerBucket * 16)
	if g > 32<<10/(slotsPerBucket*16) {
		g &^= pageBuckets - 1
	}
	return max(g, n+1)
}

// loadLimit is the number of keys a hash of n buckets holds before growing.
func loadLimit(n int) int { return n * slotsPerBucket * hashMaxLoad / 1024 }

// mix64 is a strong 64-bit finalizer (the splitmix64 one). Chunk numbers are
// often sequential; every input bit must reach every output bit so that
// consecutive keys land in unrelated buckets.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// hashKey is the 64-bit hash of key with seed.
func hashKey(key, seed uint64) uint64 { return mix64(key ^ seed) }

// candidates returns the two buckets key may live in. They differ whenever
// there are two buckets or more.
func (h *chunkHash) candidates(key uint64) (b1, b2 uint64) {
	return h.candidatesOf(hashKey(key, h.seed))
}

// candidatesOf returns the two buckets of a key whose mixed hash is x.
func (h *chunkHash) candidatesOf(x uint64) (b1, b2 uint64) {
	n := uint64(len(h.buckets))
	b1, _ = bits.Mul64(x, n)
	b2, _ = bits.Mul64(bits.RotateLeft64(x, 32), n)
	if b2 == b1 {
		b2++
		if b2 == n {
			b2 = 0
		}
	}
	return b1, b2
}

// filterMask is the filter bit of a key hashed to x, within the key word of
// slot x&3 of the key's first bucket.
func filterMask(x uint64) uint64 { return 1 << (keyBits + ((x>>2)&0xff)*7>>8) }

// find returns key's slot, or nil. The pointer is valid until the next
// insertion or rebuild.
func (h *chunkHash) find(key uint64) *chunkSlot {
	if h.count == 0 {
		return nil
	}
	x := hashKey(key, h.seed)
	b1, b2 := h.candidatesOf(x)
	b := &h.buckets[b1]
	for i := range b {
		if b[i].key&keyMask == key {
			return &b[i]
		}
	}
	if b[x&3].key&filterMask(x) == 0 {
		return nil
	}
	b = &h.buckets[b2]
	for i := range b {
		if b[i].key&keyMask == key {
			return &b[i]
		}
	}
	return nil
}

// insert adds key, which must be absent, with val.
func (h *chunkHash) insert(key, val uint64) {
	if h.buckets == nil { // the zero Table
		*h = newChunkHash()
	}
	if h.count >= h.limit {
		h.rebuild(grownSize(len(h.buckets)))
	}
	for {
		k, v, ok := h.place(key, val)
		if ok {
			h.count++
			return
		}
		// The eviction walk gave up holding k, another key (everything
		// else is in place). Rebuild, then place k.
		key, val = k, v
		h.rebuildAfterFailure()
	}
}

// remove empties s, a slot of this hash. The filter bits stay.
func (h *chunkHash) remove(s *chunkSlot) {
	s.key &^= keyMask
	s.val = 0
	h.count--
}

// place puts key into one of its buckets, evicting others cuckoo-style when
// both are full. When the walk is too long it returns the key it is left
// holding (not necessarily the one it started with) and false.
func (h *chunkHash) place(key, val uint64) (uint64, uint64, bool) {
	x := hashKey(key, h.seed)
	c1, c2 := h.candidatesOf(x)
	return h.placeIn(key, val, x, c1, c2, c1, c2)
}

// placeIn is place for a key hashed to x, whose candidate buckets are c1 and
// c2, trying first and then second (c1 and c2 in either order).
func (h *chunkHash) placeIn(key, val, x, c1, c2, first, second uint64) (uint64, uint64, bool) {
	if h.putEmpty(first, key, val, x, c1) || h.putEmpty(second, key, val, x, c1) {
		return 0, 0, true
	}
	b := first
	if h.random()&1 != 0 {
		b = second
	}
	for range hashMaxKicks {
		victim := &h.buckets[b][h.random()%slotsPerBucket]
		vk, vv := victim.key&keyMask, victim.val
		victim.key, victim.val = victim.key&^keyMask|key, val
		if b != c1 {
			h.markOverflow(c1, x)
		}
		// The evicted key was in bucket b, one of its two: move it to
		// the other.
		key, val = vk, vv
		x = hashKey(key, h.seed)
		if c1, c2 = h.candidatesOf(x); c1 == b {
			b = c2
		} else {
			b = c1
		}
		if h.putEmpty(b, key, val, x, c1) {
			return 0, 0, true
		}
	}
	return key, val, false
}

// putEmpty stores key (hash x, first bucket c1) in an empty slot of bucket
// b, if it has one.
func (h *chunkHash) putEmpty(b, key, val, x, c1 uint64) bool {
	if !h.fill(b, key, val) {
		return false
	}
	if b != c1 {
		h.markOverflow(c1, x)
	}
	return true
}

// fill stores key in an empty slot of bucket b, if it has one, leaving the
// filters alone.
func (h *chunkHash) fill(b, key, val uint64) bool {
	bk := &h.buckets[b]
	for i := range bk {
		if bk[i].key&keyMask == 0 {
			bk[i].key |= key
			bk[i].val = val
			return true
		}
	}
	return false
}

// markOverflow records in bucket c1's filter that a key hashed to x, whose
// first bucket c1 is, lives in its second.
func (h *chunkHash) markOverflow(c1, x uint64) { h.buckets[c1][x&3].key |= filterMask(x) }

// random returns the next value of the eviction-victim generator.
func (h *chunkHash) random() uint64 {
	x := h.rng
	x ^= x << 13
	x ^= x >> 7
	x ^= x << 17
	h.rng = x
	return x
}

// rebuildAfterFailure reacts to a failed eviction walk: a nearly full hash
// grows, an emptier one (unlucky hashing) is rehashed with another seed.
func (h *chunkHash) rebuildAfterFailure() {
	if (h.count+1)*1024 >= len(h.buckets)*slotsPerBucket*(hashMaxLoad-60) {
		h.rebuild(grownSize(len(h.buckets)))
		return
	}
	h.rebuildSeeded(len(h.buckets), h.random())
}

// rebuild rehashes every key into about n buckets.
func (h *chunkHash) rebuild(n int) { h.rebuildSeeded(n, h.seed) }

// rebuildSeeded rehashes every key into about n buckets with seed.
func (h *chunkHash) rebuildSeeded(n int, seed uint64) {
	n = max(n, hashMinBuckets)
	old, oldSeed := h.buckets, h.seed
	for {
		h.buckets, h.seed = makeBuckets(n), seed
		if h.rehash(old, oldSeed) {
			h.limit = loadLimit(len(h.buckets))
			return
		}
		// An eviction walk failed in the new table: retry with another
		// seed, and more room if this one was already tight.
		seed = h.random()
		if h.count*1024 >= n*slotsPerBucket*(hashMaxLoad-60) {
			n = grownSize(n)
		}
	}
}

// rehash places every key of old, a table hashed with oldSeed, into
// h.buckets, reporting false if one did not fit (h.buckets is then garbage).
//
// A key goes first to its new bucket of the same rank (first or second
// choice) as the old bucket it was in. With an unchanged seed, multiply-high
// keeps buckets in order across sizes (old bucket i maps to new buckets
// around i×new/old), so the writes stream through the new table instead of
// missing the cache for every key. The filter bits of keys placed in their
// second bucket land at random, so they are batched: a tight loop of
// independent writes keeps many cache misses in flight at once.
func (h *chunkHash) rehash(old []chunkBucket, oldSeed uint64) bool {
	type mark struct{ c1, x uint64 }
	var marks [256]mark
	pending := 0
	nOld := uint64(len(old))
	for i := range old {
		for _, s := range old[i] {
			key := s.key & keyMask
			if key == 0 {
				continue
			}
			x := hashKey(key, h.seed)
			c1, c2 := h.candidatesOf(x)
			xOld := x
			if oldSeed != h.seed {
				xOld = hashKey(key, oldSeed)
			}
			if b, _ := bits.Mul64(xOld, nOld); b != uint64(i) && h.fill(c2, key, s.val) {
				marks[pending] = mark{c1, x}
				if pending++; pending == len(marks) {
					for _, m := range marks {
						h.markOverflow(m.c1, m.x)
					}
					pending = 0
				}
				continue
			}
			if _, _, ok := h.placeIn(key, s.val, x, c1, c2, c1, c2); !ok {
				return false
			}
		}
	}
	for _, m := range marks[:pending] {
		h.markOverflow(m.c1, m.x)
	}
	return true
}

// shrinkIfSparse gives memory back after removals emptied most of the hash.
func (h *chunkHash) shrinkIfSparse() {
	if len(h.buckets) <= hashMinBuckets || h.count*1024 >= len(h.buckets)*slotsPerBucket*hashShrinkLoad {
		return
	}
	// Target the load right after a growth (0.6 of the slots).
	want := h.count * 1024 * hashGrowNum / (hashMaxLoad * hashGrowDen * slotsPerBucket)
	h.rebuild(max(want+1, hashMinBuckets))
}

// each calls fn for every occupied slot until fn returns false.
func (h *chunkHash) each(fn func(s *chunkSlot) bool) bool {
	for i := range h.buckets {
		b := &h.buckets[i]
		for j := range b {
			if b[j].key&keyMask != 0 && !fn(&b[j]) {
				return false
			}
		}
	}
	return true
}
