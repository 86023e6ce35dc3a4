package cow

import (
	"sync"

	"github.com/clustersnap/clustersnap/exstore"
)

// chunkLocks is a table of per-chunk reader/writer locks, created on first
// use and dropped when nobody holds or waits for them, so it stays as small
// as the I/O in flight.
type chunkLocks struct {
	mu   sync.Mutex
	held map[exstore.Chunk]*chunkLock
}

type chunkLock struct {
	rw   sync.RWMutex
	refs int // holders and waiters; guarded by chunkLocks.mu
}

// ref returns c's lock with one more reference.
func (t *chunkLocks) ref(c exstore.Chunk) *chunkLock {
	t.mu.Lock()
	defer t.mu.Unlock()
	l := t.held[c]
	if l == nil {
		l = &chunkLock{}
		t.held[c] = l
	}
	l.refs++
	return l
}

// unref drops a reference to c's lock l.
func (t *chunkLocks) unref(c exstore.Chunk, l *chunkLock) {
	t.mu.Lock()
	defer t.mu.Unlock()
	l.refs--
	if l.refs == 0 {
		delete(t.held, c)
	}
}

// lock holds c exclusively until the returned function is called.
func (t *chunkLocks) lock(c exstore.Chunk) (unlock func()) {
	l := t.ref(c)
	l.rw.Lock()
	return func() {
		l.rw.Unlock()
		t.unref(c, l)
	}
}

// rlock holds c shared until the returned function is called.
func (t *chunkLocks) rlock(c exstore.Chunk) (unlock func()) {
	l := t.ref(c)
	l.rw.RLock()
	return func() {
		l.rw.RUnlock()
		t.unref(c, l)
	}
}

// len returns how many chunks have a lock in the table.
func (t *chunkLocks) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.held)
}
