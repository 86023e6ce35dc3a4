package exstore

import "math/bits"

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
	words []uint64
	// shift is 64 - log2(bits): the top bits of a group's hash index the
	// filter.
	shift uint
	// set counts the bits set, which decides when to grow.
	set int
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
func (f *groupFilter) bitOf(g uint64) (int, uint64) {
	x := (g ^ g>>29) * 0xbf58476d1ce4e5b9
	i := (x ^ x>>32) >> f.shift
	return int(i / 64), 1 << (i % 64)
}

// mayHave reports whether a chunk of group g may have an exception. An
// unallocated filter (of the zero Table) knows nothing, so it says yes.
func (f *groupFilter) mayHave(g uint64) bool {
	if f.words == nil {
		return true
	}
	w, m := f.bitOf(g)
	return f.words[w]&m != 0
}

// add notes that chunk old has an exception; t is the table that holds
// it, which a growth rebuilds from.
func (f *groupFilter) add(t *Table, old Chunk) {
	if f.words == nil {
		f.reset(groupFilterMinBits)
	}
	g := uint64(old) >> groupShift
	if f.addGroups(g, g) && f.set*groupFilterBitsPerGroup > len(f.words)*64 {
		f.rebuild(t, len(f.words)*64*2)
	}
}

// addGroups sets the bits of groups first to last and reports whether it
// set one that was clear. A span at least as long as the filter sets every
// bit.
func (f *groupFilter) addGroups(first, last uint64) bool {
	if last-first >= uint64(len(f.words))*64 {
		for i := range f.words {
			f.words[i] = ^uint64(0)
		}
		f.set = len(f.words) * 64
		return true
	}
	added := false
	for g := first; ; g++ {
		w, m := f.bitOf(g)
		if f.words[w]&m == 0 {
			f.words[w] |= m
			f.set++
			added = true
		}
		if g == last {
			return added
		}
	}
}

// reset empties the filter, with nbits bits (a power of two).
func (f *groupFilter) reset(nbits int) {
	*f = groupFilter{words: make([]uint64, nbits/64), shift: uint(64 - bits.TrailingZeros(uint(nbits)))}
}

// rebuild makes the filter nbits long and sets the bits of t's exceptions
// only, dropping those of removed ones.
func (f *groupFilter) rebuild(t *Table, nbits int) {
	f.reset(nbits)
	t.Range(func(old, _ Chunk, n uint64) bool {
		f.addGroups(uint64(old)>>groupShift, (uint64(old)+n-1)>>groupShift)
		return true
	})
}
