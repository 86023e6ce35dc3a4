package cow

import (
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
)

// chunkLockStripes is how many stripes a snapshot's chunks share: chunk c
// uses stripe c mod chunkLockStripes. Two chunks on one stripe only wait
// for (or disturb) each other needlessly, which is rare with this many, and
// a fixed table costs no allocation, map or table mutex per I/O.
const chunkLockStripes = 1024

// chunkStripe is one stripe's lock, held by the COW path of a chunk from its
// lookup through its commit: the kernel's pending exception. Each is alone
// on its cache line, so that COW paths on different CPUs working on
// different chunks do not share lines.
type chunkStripe struct {
	mu sync.Mutex
	_  [64 - 8]byte
}

// chunkLocks is a snapshot's pending-exception table and the guard of its
// reads that go to the origin, striped. Its zero value is ready to use.
//
// The COW path holds a chunk exclusively (lock) from its lookup to its
// commit. Every origin change, once the snapshots' copies are committed and
// before it touches the origin, announces each chunk it covers
// (announceOverwrite, Origin.announceOverwrite). A snapshot read does not
// lock: it samples the announcements of its chunks' stripes
// (announcements) before its lookups and again after its I/O, and reads
// again if they changed, since an origin write may then have landed under
// a read that went to the origin. An announcement follows the exception it
// is about, so the second attempt finds it; a stripe shared with other
// chunks can disturb a read needlessly, so after a few attempts a read
// holds its chunks (lockRange), under which no exception for them can
// appear, and is not retried. Reads thus cost loads, not atomic writes on
// shared lines.
//
// The snapshot an origin merges (merge.go) gets no exceptions, so its
// table serves the merge instead: a merge run holds its chunks (lockRange)
// from before it reads them from the COW until their records are cleared,
// and an origin write to a chunk the snapshot still holds takes it in the
// COW holding that chunk (lock) from its lookup to its write, so that the
// run either copies the write or the write finds no exception and goes to
// the origin. Reads of the origin in merge mode read the snapshot's view
// as its own reads do, without locks.
//
// A goroutine holds at most one stripe (lock), or a run of consecutive
// chunks' stripes (lockRange), taken in ascending stripe order so that two
// runs cannot deadlock; it never takes a stripe twice. A merge run, which
// holds a run, takes other snapshots' chunks (their copies) but never
// another stripe of its own snapshot.
type chunkLocks struct {
	stripes [chunkLockStripes]chunkStripe
	// overwrites counts, per stripe, the origin overwrites announced on
	// its chunks. Reads only load them, so they are packed (4 KiB, which
	// stays in the CPU's caches between reads; padded lines would be
	// 64 KiB and miss after every read's copy), and a 32-bit counter may
	// wrap: only an exact multiple of 2^32 announcements during one read
	// would go unnoticed.
	overwrites [chunkLockStripes]atomic.Uint32
}

// stripe returns chunk c's stripe.
func (t *chunkLocks) stripe(c exstore.Chunk) *chunkStripe {
	return &t.stripes[uint64(c)%chunkLockStripes]
}

// lock holds chunk c exclusively until unlock(c).
func (t *chunkLocks) lock(c exstore.Chunk) { t.stripe(c).mu.Lock() }

// unlock releases chunk c, held by lock.
func (t *chunkLocks) unlock(c exstore.Chunk) { t.stripe(c).mu.Unlock() }

// announceOverwrite records that origin chunk c is about to be
// overwritten: reads of it that are in flight will read again.
func (t *chunkLocks) announceOverwrite(c exstore.Chunk) {
	t.overwrites[uint64(c)%chunkLockStripes].Add(1)
}

// announcements sums the announcements of chunks [first, end)'s stripes.
// The counters only grow (modulo 2^32), so an unchanged sum means no
// announcement. The run must not be longer than chunkLockStripes.
func (t *chunkLocks) announcements(first, end exstore.Chunk) uint64 {
	lo1, hi1, lo2, hi2 := stripeRanges(first, end)
	var sum uint64
	for i := lo1; i < hi1; i++ {
		sum += uint64(t.overwrites[i].Load())
	}
	for i := lo2; i < hi2; i++ {
		sum += uint64(t.overwrites[i].Load())
	}
	return sum
}

// stripeRanges returns the stripes of chunks [first, end) as at most two
// ascending index ranges [lo1, hi1) and [lo2, hi2), lo1 < hi1 <= lo2. The
// run must not be longer than chunkLockStripes.
func stripeRanges(first, end exstore.Chunk) (lo1, hi1, lo2, hi2 int) {
	n := int(end - first)
	s := int(uint64(first) % chunkLockStripes)
	if s+n <= chunkLockStripes {
		return s, s + n, s + n, s + n
	}
	// The run wraps around: its low stripes come first.
	return 0, s + n - chunkLockStripes, s, chunkLockStripes
}

// lockRange holds chunks [first, end) exclusively until unlockRange(first,
// end). The run must not be longer than chunkLockStripes.
func (t *chunkLocks) lockRange(first, end exstore.Chunk) {
	lo1, hi1, lo2, hi2 := stripeRanges(first, end)
	for i := lo1; i < hi1; i++ {
		t.stripes[i].mu.Lock()
	}
	for i := lo2; i < hi2; i++ {
		t.stripes[i].mu.Lock()
	}
}

// unlockRange releases chunks [first, end), held by lockRange.
func (t *chunkLocks) unlockRange(first, end exstore.Chunk) {
	lo1, hi1, lo2, hi2 := stripeRanges(first, end)
	for i := lo1; i < hi1; i++ {
		t.stripes[i].mu.Unlock()
	}
	for i := lo2; i < hi2; i++ {
		t.stripes[i].mu.Unlock()
	}
}

// held returns how many stripes someone holds; for tests, when no I/O is
// in flight.
func (t *chunkLocks) held() int {
	n := 0
	for i := range t.stripes {
		if !t.stripes[i].mu.TryLock() {
			n++
			continue
		}
		t.stripes[i].mu.Unlock()
	}
	return n
}
