package exstore

import (
	"errors"
	"fmt"
)

// Table is the in-memory exception table: origin chunk → COW chunk. Runs of
// consecutive exceptions (Old and New both +1) are kept as one entry. It is
// not safe for concurrent use: the stores guard it. Lookup, Len, Entries and
// Range only read it, so they may run concurrently with each other (under a
// read lock); Insert, Remove and Reset need it to themselves. RulesOut alone
// may run without the lock, concurrently with Insert and Remove.
//
// Unlike the kernel, whose hash buckets hold 256 origin chunks and so keep
// (255,x) and (256,x+1) as two entries with at most 256 chunks each, a run
// here may cross any boundary and have any length: 1,000,000 consecutive
// exceptions are one entry. The on-disk format is unaffected; this is only
// the in-memory index.
//
// Two structures hold the exceptions, and every maximal run lives entirely in
// one of them:
//
//   - a bucketized cuckoo hash keyed by origin chunk, one 16-byte slot per
//     chunk, for singletons and runs shorter than promoteLen. Random
//     exceptions cost one slot each (about 18-27 bytes at the hash's load
//     of 0.6-0.9), and a lookup reads at most two cache lines, nearly
//     always one for a miss (see chunkHash);
//   - a B+ tree of extents for longer runs, searched (in O(log extents))
//     only when it is not empty, so a run of any length is one entry.
//
// In front of both, a filter with a bit per group of groupChunks chunks
// (groupFilter) answers most lookups of chunks without an exception from
// one word, which stays cached where the hash would not, and lets
// LookupRange skip whole groups.
//
// The zero Table is empty and ready to use, like NewTable's.
//
// Runs in the hash are maximal: no two of them, and no run and extent, could
// be joined. The first and last slots of a hash run carry its length and
// head/tail marks (slotMeta), so Insert joins runs at either end in O(1), and
// Remove finds a run's ends in O(promoteLen).
type Table struct {
	hash        chunkHash
	hashRuns    int // maximal runs in the hash
	extents     extentTree
	extentCount uint64 // exceptions in extents
	// filter tells which groups of chunks may have exceptions, for
	// LookupRange.
	filter groupFilter
}

const (
	// promoteLen is the length at which a run moves from the hash to the
	// extent tree. Runs in the hash are shorter, so their length fits the
	// six bits of slotMeta; at this length one extent (24 bytes in a tree
	// leaf, plus the leaf's slack) is much cheaper than 64 slots.
	promoteLen = 64
	// demoteLen is the length below which an extent cut by Remove moves
	// back to the hash. It is well below promoteLen so that alternately
	// removing and re-inserting a chunk at the edge does not move a whole
	// run back and forth every time.
	demoteLen = 16
)

// Slot value layout: the COW chunk in the low 56 bits, run marks in the top
// byte. Slots inside a run carry no marks.
const (
	newMask   = uint64(MaxChunk)
	metaShift = 56
	metaLen   = uint64(0x3f) << metaShift // run length (1..63), on head and tail slots
	metaHead  = uint64(1) << 62           // first chunk of its run
	metaTail  = uint64(1) << 63           // last chunk of its run
)

// slotMeta is the mark of the i-th slot of a hash run of n chunks.
func slotMeta(i, n uint64) uint64 {
	var m uint64
	if i == 0 {
		m |= metaHead | n<<metaShift
	}
	if i == n-1 {
		m |= metaTail | n<<metaShift
	}
	return m
}

// runLen is the run length a head or tail slot carries.
func runLen(val uint64) uint64 { return (val & metaLen) >> metaShift }

// errChunkMapped and errChunkRange say why Insert refused an exception.
var (
	errChunkMapped = errors.New("origin chunk already has an exception")
	errChunkRange  = errors.New("chunk number beyond the 56-bit limit")
)

// NewTable returns an empty table. Its filter exists from the start, so
// that RulesOut answers for a table that never had an exception.
func NewTable() *Table {
	t := &Table{hash: newChunkHash()}
	t.filter.reset(groupFilterMinBits)
	return t
}

// Len is the number of exceptions (chunks) in the table.
func (t *Table) Len() uint64 { return uint64(t.hash.count) + t.extentCount }

// Entries is the number of stored entries: every maximal run of consecutive
// exceptions counts once.
func (t *Table) Entries() int { return t.hashRuns + t.extents.count }

// Reset empties the table and gives its memory back.
func (t *Table) Reset() {
	t.hash, t.hashRuns = newChunkHash(), 0
	t.extents, t.extentCount = extentTree{}, 0
	t.filter.reset(groupFilterMinBits)
}

// RulesOut reports whether the table's filter rules out an exception for
// every chunk of old, old+1, ... old+n-1 (n > 0): true means none of them
// has one. A false answer says nothing (ask Lookup or LookupRange).
//
// Unlike the other methods it may run concurrently with Insert and Remove
// (not Reset), without the store's lock: its answer is true of the table
// at an instant during the call, because an insertion sets its group's
// bit (an atomic OR) and a growth of the filter publishes a complete new
// bit array (an atomic store), so every array a reader can load covers
// every exception inserted while it was current. Stores use it to answer
// snapshot reads of chunks without exceptions, the common case, without
// the read lock's atomic writes to a line that every CPU shares.
func (t *Table) RulesOut(old Chunk, n uint64) bool {
	if n == 0 || old > MaxChunk || n-1 > uint64(MaxChunk-old) {
		return false
	}
	first, last := uint64(old)>>groupShift, (uint64(old)+n-1)>>groupShift
	if first == last {
		// One group, as for most reads: inlined, one probe.
		return !t.filter.mayHave(first)
	}
	return !t.filter.mayHaveGroups(first, last)
}

// Lookup returns the COW chunk of origin chunk old, if it has an exception.
// It does not allocate.
func (t *Table) Lookup(old Chunk) (Chunk, bool) {
	if old > MaxChunk || !t.filter.mayHave(uint64(old)>>groupShift) {
		return 0, false
	}
	if s := t.hash.find(uint64(old) + 1); s != nil {
		return Chunk(s.val & newMask), true
	}
	if t.extents.count == 0 {
		return 0, false
	}
	if x := t.extents.find(old); x != nil {
		return x.new + (old - x.old), true
	}
	return 0, false
}

// LookupRange looks up chunks first, first+1, ... and puts chunk
// first+i's answer in into[i]. It answers a table without exceptions at
// once, the common case of a young snapshot, and groups of chunks the
// filter knows have none with one probe, rather than a hash probe per
// chunk.
func (t *Table) LookupRange(first Chunk, into []LookupResult) {
	if t.hash.count == 0 && t.extents.count == 0 {
		clear(into)
		return
	}
	for i := 0; i < len(into); {
		c := first + Chunk(i)
		g := uint64(c) >> groupShift
		// The chunks of c's group in the range.
		n := min(len(into)-i, int((g+1)<<groupShift-uint64(c)))
		if !t.filter.mayHave(g) {
			clear(into[i : i+n])
			i += n
			continue
		}
		for end := i + n; i < end; i++ {
			new, ok := t.Lookup(first + Chunk(i))
			into[i] = LookupResult{New: new, Found: ok}
		}
	}
}

// Insert adds exception e, joining it to the runs it extends at either end
// (and so bridging two runs into one). It fails if e.Old already has an
// exception or if a chunk is beyond MaxChunk.
func (t *Table) Insert(e Exception) error {
	if err := t.insert(e); err != nil {
		return err
	}
	t.filter.add(t, e.Old)
	return nil
}

// insert is Insert without the group filter.
func (t *Table) insert(e Exception) error {
	if e.Old > MaxChunk || e.New > MaxChunk {
		return fmt.Errorf("exception table: insert %v: %w", e, errChunkRange)
	}
	if cur, ok := t.Lookup(e.Old); ok {
		return fmt.Errorf("exception table: insert %v: chunk %d maps to %d: %w", e, e.Old, cur, errChunkMapped)
	}
	old, cow := uint64(e.Old), uint64(e.New)

	// The runs e extends: ending at old-1 → cow-1, starting at old+1 →
	// cow+1. Each is a hash run (length in its boundary slot) or an extent.
	var left, right uint64 // lengths of the hash runs, 0 if none
	var leftX, rightX *extent
	if old > 0 && cow > 0 {
		if s := t.hash.find(old); s != nil { // key of old-1
			if s.val&newMask == cow-1 {
				left = runLen(s.val)
			}
		} else if x := t.extents.find(e.Old - 1); x != nil && x.new+Chunk(x.n) == e.New {
			leftX = x
		}
	}
	if e.Old < MaxChunk && e.New < MaxChunk {
		if s := t.hash.find(old + 2); s != nil { // key of old+1
			if s.val&newMask == cow+1 {
				right = runLen(s.val)
			}
		} else if x := t.extents.find(e.Old + 1); x != nil && x.old == e.Old+1 && x.new == e.New+1 {
			rightX = x
		}
	}

	switch {
	case leftX != nil && rightX != nil: // bridge two extents
		n := rightX.n
		leftX.n += 1 + n
		t.extents.remove(e.Old + 1)
		t.extentCount++
	case leftX != nil: // extend an extent, absorbing a hash run after e
		t.dropHashRun(old+1, right)
		leftX.n += 1 + right
		t.extentCount += 1 + right
	case rightX != nil: // extend an extent backwards, absorbing a hash run before e
		t.dropHashRun(old-left, left)
		t.extents.moveStart(rightX.old, 1+left)
		t.extentCount += 1 + left
	default:
		n := left + 1 + right
		if n >= promoteLen {
			t.dropHashRun(old-left, left)
			t.dropHashRun(old+1, right)
			t.extents.insert(extent{old: e.Old - Chunk(left), new: e.New - Chunk(left), n: n})
			t.extentCount += n
			return nil
		}
		// The old boundary slots become inner ones (one of them may be
		// the new head or tail: remarkHashRun sets those).
		if left > 0 {
			t.hash.find(old).val &= newMask
		}
		if right > 0 {
			t.hash.find(old + 2).val &= newMask
		}
		t.hash.insert(old+1, cow|slotMeta(left, n))
		if left > 0 || right > 0 {
			t.remarkHashRun(old-left, n)
		}
		t.hashRuns++
		if left > 0 {
			t.hashRuns--
		}
		if right > 0 {
			t.hashRuns--
		}
	}
	return nil
}

// dropHashRun removes the n slots of the hash run starting at origin chunk
// old, on its way to the extent tree.
func (t *Table) dropHashRun(old, n uint64) {
	if n == 0 {
		return
	}
	for c := old; c < old+n; c++ {
		t.hash.remove(t.hash.find(c + 1))
	}
	t.hashRuns--
}

// remarkHashRun sets the head and tail marks of the hash run of n chunks
// starting at origin chunk old.
func (t *Table) remarkHashRun(old, n uint64) {
	head := t.hash.find(old + 1)
	head.val = head.val&newMask | slotMeta(0, n)
	if n > 1 {
		tail := t.hash.find(old + n)
		tail.val = tail.val&newMask | slotMeta(n-1, n)
	}
}

// addRun stores a run that joins nothing: as an extent if it is long enough,
// in the hash otherwise.
func (t *Table) addRun(old, cow Chunk, n uint64) {
	if n >= demoteLen {
		t.extents.insert(extent{old: old, new: cow, n: n})
		t.extentCount += n
		return
	}
	for i := range n {
		t.hash.insert(uint64(old)+i+1, uint64(cow)+i|slotMeta(i, n))
	}
	t.hashRuns++
}

// Remove removes the exceptions of origin chunks old..old+n-1 that are
// present, splitting the runs it cuts.
func (t *Table) Remove(old Chunk, n uint64) {
	if n == 0 || old > MaxChunk {
		return
	}
	last := MaxChunk
	if n-1 < uint64(MaxChunk-old) {
		last = old + Chunk(n-1)
	}
	// A range no larger than the hash is probed chunk by chunk, and only
	// where no extent covered it: runs live in one structure or the other,
	// so merge removing the end of a long run does not touch the hash. A
	// larger range is found by scanning the hash once.
	probe := uint64(last-old) < uint64(len(t.hash.buckets)*slotsPerBucket)
	t.removeExtents(old, last, probe)
	if !probe {
		t.scanHashed(uint64(old), uint64(last))
	}
	t.hash.shrinkIfSparse()
}

// removeExtents cuts first..last out of the extent tree and, if probe is
// set, out of the hash in the gaps between the extents it cut.
func (t *Table) removeExtents(first, last Chunk, probe bool) {
	next := first // first chunk of the range not yet probed in the hash
	for t.extents.count > 0 {
		x := t.extents.floor(first)
		if x == nil || x.last() < first {
			x = t.extents.ceil(first)
		}
		if x == nil || x.old > last {
			break
		}
		cut := *x
		if probe && cut.old > next {
			t.probeHashed(uint64(next), uint64(cut.old-1))
		}
		next = cut.last() + 1
		headLen := uint64(0) // chunks of x before first
		if cut.old < first {
			headLen = uint64(first - cut.old)
		}
		tailLen := uint64(0) // chunks of x after last
		if cut.last() > last {
			tailLen = uint64(cut.last() - last)
		}
		t.extentCount -= cut.n - headLen - tailLen
		if headLen >= demoteLen {
			x.n = headLen // shrink in place: a merge cuts tails
		} else {
			t.extents.remove(cut.old)
			t.extentCount -= headLen
			if headLen > 0 {
				t.addRun(cut.old, cut.new, headLen)
			}
		}
		if tailLen > 0 {
			t.extentCount -= tailLen
			off := cut.n - tailLen
			t.addRun(cut.old+Chunk(off), cut.new+Chunk(off), tailLen)
		}
	}
	if probe && next <= last {
		t.probeHashed(uint64(next), uint64(last))
	}
}

// probeHashed cuts first..last out of the hash by looking each chunk up.
func (t *Table) probeHashed(first, last uint64) {
	for c := first; c <= last && t.hash.count > 0; c++ {
		if s := t.hash.find(c + 1); s != nil {
			c = t.cutHashRun(c, s, first, last)
		}
	}
}

// scanHashed cuts first..last out of the hash by scanning all of it.
func (t *Table) scanHashed(first, last uint64) {
	var hit []uint64
	t.hash.each(func(s *chunkSlot) bool {
		if c := s.chunk(); c >= first && c <= last {
			hit = append(hit, c)
		}
		return true
	})
	for _, c := range hit {
		if s := t.hash.find(c + 1); s != nil {
			t.cutHashRun(c, s, first, last)
		}
	}
}

// cutHashRun removes first..last from the hash run holding chunk c (slot s),
// keeps what is left of the run on either side marked as runs, and returns
// the last chunk removed.
func (t *Table) cutHashRun(c uint64, s *chunkSlot, first, last uint64) uint64 {
	// Find the run's head: s itself, or via the tail's length, or by
	// walking back over inner slots (fewer than promoteLen).
	head := c
	switch {
	case s.val&metaHead != 0:
	case s.val&metaTail != 0:
		head = c - runLen(s.val) + 1
	default:
		for head--; t.hash.find(head+1).val&metaHead == 0; head-- {
		}
	}
	n := runLen(t.hash.find(head + 1).val)
	tail := head + n - 1
	from, to := max(head, first), min(tail, last)
	for d := from; d <= to; d++ {
		t.hash.remove(t.hash.find(d + 1))
	}
	t.hashRuns--
	if from > head {
		t.remarkHashRun(head, from-head)
		t.hashRuns++
	}
	if to < tail {
		t.remarkHashRun(to+1, tail-to)
		t.hashRuns++
	}
	return to
}

// Range calls fn for every maximal run of exceptions, old..old+n-1 mapping
// to new..new+n-1, in no particular order, until fn returns false. fn must
// not change the table.
func (t *Table) Range(fn func(old, new Chunk, n uint64) bool) {
	if !t.extents.each(func(x *extent) bool { return fn(x.old, x.new, x.n) }) {
		return
	}
	t.hash.each(func(s *chunkSlot) bool {
		if s.val&metaHead == 0 {
			return true
		}
		return fn(Chunk(s.chunk()), Chunk(s.val&newMask), runLen(s.val))
	})
}
