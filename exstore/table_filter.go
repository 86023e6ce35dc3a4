package exstore

import (
	"math/bits"
	"sync/atomic"
)

// groupFilter tells, for a group of groupChunks consecutive aligned origin
// chunks, whether any of them may have an exception: one bit per hash of the
// group, set when an exception of the group is inserted and cleared only
// when the filter is rebuilt. A clear bit means none of the group's chunks
// has one, so a range lookup (a snapshot read of up to 64 chunks) answers
// the group without a hash probe per chunk: a miss probes one word where it
// would otherwise touch a cache line per chunk, and right after a read's
// copy those lines are seldom cached.
//
// The filter keeps at least groupFilterBitsPerGroup bits per group it holds,
// so that about one group in that many that has no exception shares a bit
// with one that has: it doubles (and is rebuilt from the table) when it
// fills past that. It costs one or two bytes per scattered exception.
type groupFilter struct {
	// bits is the filter's current bit array. A growth publishes a new
	// one, complete, with one store, so a reader that does not hold the
	// table (Table.RulesOut) sees either array, each of which covers
	// every exception inserted before it stopped being current.
	bits atomic.Pointer[filterBits]
	// set counts the bits set, which decides when to grow.
	set int
}

// filterBits is one bit array of a groupFilter. Its words are set with
// atomic ORs by the table's writer and loaded atomically by readers.
type filterBits struct {
	words []atomic.Uint64
	// shift is 64 - log2(bits): the top bits of a group's hash index the
	// filter.
	shift uint
}

const (
	// groupShift is log2 of groupChunks.
	groupShift = 4
	// groupChunks is the chunks one filter bit covers: a 64 KiB read of
	// 4 KiB chunks, aligned.
	groupChunks = 1 << groupShift
	// groupFilterMinBits is the smallest filter's size.
	groupFilterMinBits = 1 << 12
	// groupFilterBitsPerGroup is the filter bits kept per set bit.
	groupFilterBitsPerGroup = 8
)

// bitOf returns the word and mask of group g's bit. The multiply and
// shifts (half of splitmix64's finaliser) spread consecutive groups, and
// groups whose numbers are multiples of some constant, over the filter.
func (b *filterBits) bitOf(g uint64) (int, uint64) {
	x := (g ^ g>>29) * 0xbf58476d1ce4e5b9
	i := (x ^ x>>32) >> b.shift
	return int(i / 64), 1 << (i % 64)
}

// mayHave reports whether a chunk of group g may have an exception. An
// unallocated filter (of the zero Table) knows nothing, so it says yes.
func (f *groupFilter) mayHave(g uint64) bool {
	b := f.bits.Load()
	if b == nil {
		return true
	}
	w, m := b.bitOf(g)
	return b.words[w].Load()&m != 0
}

// mayHaveGroups reports whether a chunk of groups first to last may have
// an exception. It may run concurrently with add: see Table.RulesOut.
func (f *groupFilter) mayHaveGroups(first, last uint64) bool {
	b := f.bits.Load()
	if b == nil || last-first >= uint64(len(b.words))*64 {
		return true
	}
	for g := first; ; g++ {
		w, m := b.bitOf(g)
		if b.words[w].Load()&m != 0 {
			return true
		}
		if g == last {
			return false
		}
	}
}

// nbits is the size of the current bit array, 0 before the first.
func (f *groupFilter) nbits() int {
	if b := f.bits.Load(); b != nil {
		return len(b.words) * 64
	}
	return 0
}

// add notes that chunk old has an exception; t is the table that holds
// it, which a growth rebuilds from.
func (f *groupFilter) add(t *Table, old Chunk) {
	if f.bits.Load() == nil {
		f.reset(groupFilterMinBits)
	}
	g := uint64(old) >> groupShift
	if f.addGroups(g, g) && f.set*groupFilterBitsPerGroup > f.nbits() {
		f.rebuild(t, f.nbits()*2)
	}
}

// addGroups sets the bits of groups first to last and reports whether it
// set one that was clear. A span at least as long as the filter sets every
// bit.
func (f *groupFilter) addGroups(first, last uint64) bool {
	return f.addGroupsTo(f.bits.Load(), first, last)
}

// addGroupsTo is addGroups on bit array b, current or about to be.
func (f *groupFilter) addGroupsTo(b *filterBits, first, last uint64) bool {
	if last-first >= uint64(len(b.words))*64 {
		for i := range b.words {
			b.words[i].Store(^uint64(0))
		}
		f.set = len(b.words) * 64
		return true
	}
	added := false
	for g := first; ; g++ {
		w, m := b.bitOf(g)
		if b.words[w].Load()&m == 0 {
			b.words[w].Or(m)
			f.set++
			added = true
		}
		if g == last {
			return added
		}
	}
}

// newFilterBits returns an empty bit array of nbits bits (a power of two).
func newFilterBits(nbits int) *filterBits {
	return &filterBits{words: make([]atomic.Uint64, nbits/64), shift: uint(64 - bits.TrailingZeros(uint(nbits)))}
}

// reset empties the filter, with nbits bits (a power of two). Readers that
// do not hold the table must not run meanwhile: it forgets exceptions.
func (f *groupFilter) reset(nbits int) {
	f.bits.Store(newFilterBits(nbits))
	f.set = 0
}

// rebuild makes the filter nbits long and sets the bits of t's exceptions
// only, dropping those of removed ones. The new array is published only
// once complete, so it may run concurrently with Table.RulesOut.
func (f *groupFilter) rebuild(t *Table, nbits int) {
	b := newFilterBits(nbits)
	f.set = 0
	t.Range(func(old, _ Chunk, n uint64) bool {
		f.addGroupsTo(b, uint64(old)>>groupShift, (uint64(old)+n-1)>>groupShift)
		return true
	})
	f.bits.Store(b)
}
