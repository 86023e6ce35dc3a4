package cow

import (
	"sync"

	"github.com/clustersnap/clustersnap/exstore"
)

// chunkLockStripes is how many reader/writer locks a snapshot's chunks
// share: chunk c uses stripe c mod chunkLockStripes. Two chunks on one
// stripe only wait for each other needlessly, which is rare with this many,
// and a fixed table costs no allocation, map or table mutex per I/O.
const chunkLockStripes = 1024

// chunkLocks are per-chunk reader/writer locks, striped. A goroutine holds
// at most one stripe exclusively (lock), or one chunk's stripe (rlock) or
// a run of consecutive chunks' stripes (rlockRange) shared, taken in ascending stripe order so that two
// runs cannot deadlock; it never takes a stripe twice. Its zero value is
// ready to use.
type chunkLocks struct {
	stripes [chunkLockStripes]sync.RWMutex
}

// lock holds chunk c exclusively until unlock(c).
func (t *chunkLocks) lock(c exstore.Chunk) {
	t.stripes[uint64(c)%chunkLockStripes].Lock()
}

// unlock releases chunk c, held by lock.
func (t *chunkLocks) unlock(c exstore.Chunk) {
	t.stripes[uint64(c)%chunkLockStripes].Unlock()
}

// rlock holds chunk c shared until runlock(c).
func (t *chunkLocks) rlock(c exstore.Chunk) {
	t.stripes[uint64(c)%chunkLockStripes].RLock()
}

// runlock releases chunk c, held by rlock.
func (t *chunkLocks) runlock(c exstore.Chunk) {
	t.stripes[uint64(c)%chunkLockStripes].RUnlock()
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

// rlockRange holds chunks [first, end) shared until runlockRange(first,
// end). The run must not be longer than chunkLockStripes.
func (t *chunkLocks) rlockRange(first, end exstore.Chunk) {
	lo1, hi1, lo2, hi2 := stripeRanges(first, end)
	for i := lo1; i < hi1; i++ {
		t.stripes[i].RLock()
	}
	for i := lo2; i < hi2; i++ {
		t.stripes[i].RLock()
	}
}

// runlockRange releases chunks [first, end), held by rlockRange.
func (t *chunkLocks) runlockRange(first, end exstore.Chunk) {
	lo1, hi1, lo2, hi2 := stripeRanges(first, end)
	for i := lo1; i < hi1; i++ {
		t.stripes[i].RUnlock()
	}
	for i := lo2; i < hi2; i++ {
		t.stripes[i].RUnlock()
	}
}

// held returns how many stripes someone holds, shared or exclusively; for
// tests, when no I/O is in flight.
func (t *chunkLocks) held() int {
	n := 0
	for i := range t.stripes {
		if !t.stripes[i].TryLock() {
			n++
			continue
		}
		t.stripes[i].Unlock()
	}
	return n
}
