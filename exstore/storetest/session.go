package storetest

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// session is one store under test, with the device it lives on. The current
// store is closed when the test ends unless the test closed it already.
type session struct {
	t     *testing.T
	h     Harness
	s     exstore.Store
	dev   blockdev.Device
	c     uint32
	bytes int64
}

// newSession makes a store with h.New and arranges for it to be closed.
func newSession(t *testing.T, h Harness, chunkSectors uint32, cowBytes int64) *session {
	t.Helper()
	s, dev := h.New(t, chunkSectors, cowBytes)
	require.NotNil(t, s, "%s: New returned no store", h.Name)
	require.NotNil(t, dev, "%s: New returned no device", h.Name)
	require.Equal(t, chunkSectors, s.ChunkSectors(), "%s: chunk size of a new store", h.Name)
	ss := &session{t: t, h: h, s: s, dev: dev, c: chunkSectors, bytes: cowBytes}
	t.Cleanup(func() {
		if ss.s != nil {
			assert.NoError(t, ss.s.Close(), "%s: Close", h.Name)
		}
	})
	return ss
}

// waitLimit is the harness's WaitLimit.
func (ss *session) waitLimit() time.Duration {
	if ss.h.WaitLimit > 0 {
		return ss.h.WaitLimit
	}
	return defaultWaitLimit
}

// close closes the store at once.
func (ss *session) close() {
	ss.t.Helper()
	s := ss.s
	ss.s = nil
	require.NoError(ss.t, s.Close(), "%s: Close", ss.h.Name)
}

// reopen replaces the store by h.Reopen's.
func (ss *session) reopen() {
	ss.t.Helper()
	s := ss.s
	ss.s = nil // Reopen closes it
	ss.s = ss.h.Reopen(ss.t, s, ss.dev)
	require.NotNil(ss.t, ss.s, "%s: Reopen returned no store", ss.h.Name)
	require.Equal(ss.t, ss.c, ss.s.ChunkSectors(), "%s: chunk size after Reopen", ss.h.Name)
}

// capacity is the harness's capacity of this session's COW.
func (ss *session) capacity() uint64 { return ss.h.Capacity(ss.c, ss.bytes) }

// wantUsage is the harness's usage after n exceptions on this session's COW.
func (ss *session) wantUsage(n uint64) exstore.Usage { return ss.h.WantUsage(ss.c, ss.bytes, n) }

// prepare prepares an exception for old and checks the chunk it got.
func (ss *session) prepare(old exstore.Chunk) exstore.Exception {
	ss.t.Helper()
	e, err := ss.s.Prepare(ss.t.Context(), old)
	require.NoError(ss.t, err, "%s: Prepare(%d)", ss.h.Name, old)
	ss.checkChunk(e, old)
	return e
}

// checkChunk asserts that e is for old and that its COW chunk is a data
// chunk inside the device. It is safe to call from several goroutines.
func (ss *session) checkChunk(e exstore.Exception, old exstore.Chunk) bool {
	ok := assert.Equal(ss.t, old, e.Old, "%s: Prepare(%d) returned an exception for another chunk", ss.h.Name, old)
	ok = assert.False(ss.t, ss.h.IsMetadata(ss.c, e.New), "%s: exception %v got metadata chunk %d", ss.h.Name, e, e.New) && ok
	chunks := uint64(ss.bytes / chunkBytes(ss.c)) // whole chunks on the COW
	ok = assert.Less(ss.t, uint64(e.New), chunks,
		"%s: exception %v: chunk %d is past the end of the %d-byte COW", ss.h.Name, e, e.New, ss.bytes) && ok
	return ok
}

// commit commits a prepared exception after writing its data.
func (ss *session) commit(e exstore.Exception) {
	ss.t.Helper()
	ss.writeData(e)
	require.True(ss.t, ss.commitBounded(e))
}

// add prepares and commits an exception for old, as a COW of old does.
func (ss *session) add(old exstore.Chunk) exstore.Exception {
	ss.t.Helper()
	e := ss.prepare(old)
	ss.commit(e)
	return e
}

// chunkData is the content the suite writes to the COW chunk of e: the
// exception itself, then bytes derived from it, so that each chunk differs.
func chunkData(e exstore.Exception, size, align int) []byte {
	p := blockdev.AlignedBuffer(size, align)
	for i := range p {
		p[i] = byte(uint64(e.Old)*31 + uint64(e.New)*7 + uint64(i))
	}
	if size >= 16 {
		binary.LittleEndian.PutUint64(p[0:], uint64(e.Old))
		binary.LittleEndian.PutUint64(p[8:], uint64(e.New))
	}
	return p
}

// writeData writes e's chunk data to the COW, as the caller of Prepare does
// before Commit. It is safe to call from several goroutines.
func (ss *session) writeData(e exstore.Exception) {
	p := chunkData(e, int(chunkBytes(ss.c)), ss.dev.Alignment())
	_, err := ss.dev.WriteAt(p, int64(e.New)*chunkBytes(ss.c))
	assert.NoError(ss.t, err, "%s: writing the data of %v", ss.h.Name, e)
}

// checkData asserts that e's chunk still holds the data writeData wrote:
// the store's metadata writes must never land on a data chunk.
func (ss *session) checkData(e exstore.Exception) bool {
	size := int(chunkBytes(ss.c))
	want := chunkData(e, size, 1)
	got := blockdev.AlignedBuffer(size, ss.dev.Alignment())
	_, err := ss.dev.ReadAt(got, int64(e.New)*chunkBytes(ss.c))
	if !assert.NoError(ss.t, err, "%s: reading the data of %v", ss.h.Name, e) {
		return false
	}
	return assert.True(ss.t, bytes.Equal(want, got), "%s: data chunk of %v was overwritten", ss.h.Name, e)
}

// lookup looks old up, checking that the release is usable, and releases it.
func (ss *session) lookup(s exstore.Store, old exstore.Chunk) (exstore.Chunk, bool) {
	ss.t.Helper()
	c, found, release, err := s.Lookup(ss.t.Context(), old)
	require.NotNil(ss.t, release, "%s: Lookup(%d) returned a nil release", ss.h.Name, old)
	release()
	require.NoError(ss.t, err, "%s: Lookup(%d)", ss.h.Name, old)
	if rl, ok := s.(exstore.RangeLookuper); ok {
		ss.checkRange(s, rl, old)
	}
	if ol, ok := s.(exstore.OptimisticLookuper); ok {
		ss.checkOptimistic(s, ol, old)
	}
	if ac, ok := s.(exstore.AbsenceChecker); ok {
		ss.checkAbsence(s, ac, old)
	}
	return c, found
}

// checkAbsence asserts that a store that says a run of chunks around old
// (or old alone) has no exceptions is right: Lookup misses each.
func (ss *session) checkAbsence(s exstore.Store, ac exstore.AbsenceChecker, old exstore.Chunk) {
	ss.t.Helper()
	first := old - min(old, 2)
	for _, run := range [][2]exstore.Chunk{{old, 1}, {first, min(exstore.MaxChunk-first, 4) + 1}} {
		if !ac.NoExceptions(run[0], uint64(run[1])) {
			continue
		}
		for c := run[0]; c < run[0]+run[1]; c++ {
			new, found, release, err := s.Lookup(ss.t.Context(), c)
			release()
			require.NoError(ss.t, err, "%s: Lookup(%d)", ss.h.Name, c)
			assert.False(ss.t, found, "%s: NoExceptions(%d, %d), but chunk %d has one (COW chunk %d)", ss.h.Name, run[0], run[1], c, new)
		}
	}
}

// checkOptimistic asserts that a store's optimistic lookups of old and of
// the chunks around it, when it gives them, answer as Lookup does, and
// that their tokens vouch for them while nothing changes.
func (ss *session) checkOptimistic(s exstore.Store, ol exstore.OptimisticLookuper, old exstore.Chunk) {
	ss.t.Helper()
	want := func(c exstore.Chunk) exstore.LookupResult {
		new, found, release, err := s.Lookup(ss.t.Context(), c)
		release()
		require.NoError(ss.t, err, "%s: Lookup(%d)", ss.h.Name, c)
		return exstore.LookupResult{New: new, Found: found}
	}
	if new, found, token, ok := ol.LookupOptimistic(old); ok {
		assert.Equal(ss.t, want(old), exstore.LookupResult{New: new, Found: found}, "%s: LookupOptimistic(%d)", ss.h.Name, old)
		assert.True(ss.t, ol.Unchanged(token), "%s: LookupOptimistic(%d): token void with nothing changed", ss.h.Name, old)
	}
	first := old - min(old, 2)
	into := make([]exstore.LookupResult, min(exstore.MaxChunk-first, 4)+1)
	if token, ok := ol.LookupRangeOptimistic(first, into); ok {
		for i, got := range into {
			c := first + exstore.Chunk(i)
			assert.Equal(ss.t, want(c), got, "%s: LookupRangeOptimistic(%d, %d) for chunk %d", ss.h.Name, first, len(into), c)
		}
		assert.True(ss.t, ol.Unchanged(token), "%s: LookupRangeOptimistic(%d, %d): token void with nothing changed", ss.h.Name, first, len(into))
	}
}

// checkRange asserts that a store's LookupRange of the chunks around old
// answers as Lookup of each does.
func (ss *session) checkRange(s exstore.Store, rl exstore.RangeLookuper, old exstore.Chunk) {
	ss.t.Helper()
	first := old - min(old, 2)
	into := make([]exstore.LookupResult, min(exstore.MaxChunk-first, 4)+1)
	release, err := rl.LookupRange(ss.t.Context(), first, into)
	require.NotNil(ss.t, release, "%s: LookupRange(%d, %d) returned a nil release", ss.h.Name, first, len(into))
	release()
	require.NoError(ss.t, err, "%s: LookupRange(%d, %d)", ss.h.Name, first, len(into))
	for i, got := range into {
		c := first + exstore.Chunk(i)
		new, found, release, err := s.Lookup(ss.t.Context(), c)
		release()
		require.NoError(ss.t, err, "%s: Lookup(%d)", ss.h.Name, c)
		assert.Equal(ss.t, exstore.LookupResult{New: new, Found: found}, got, "%s: LookupRange(%d, %d) for chunk %d", ss.h.Name, first, len(into), c)
	}
}

// checkFound asserts that old maps to want in s.
func (ss *session) checkFound(s exstore.Store, old, want exstore.Chunk) bool {
	ss.t.Helper()
	c, found := ss.lookup(s, old)
	ok := assert.True(ss.t, found, "%s: Lookup(%d) missed a committed exception", ss.h.Name, old)
	return ok && assert.Equal(ss.t, want, c, "%s: Lookup(%d)", ss.h.Name, old)
}

// checkMissing asserts that old has no exception in s.
func (ss *session) checkMissing(s exstore.Store, old exstore.Chunk, why string) bool {
	ss.t.Helper()
	c, found := ss.lookup(s, old)
	return assert.False(ss.t, found, "%s: Lookup(%d) found chunk %d %s", ss.h.Name, old, c, why)
}

// walk collects s's exceptions, asserting that no origin chunk comes twice.
func (ss *session) walk(s exstore.Store) map[exstore.Chunk]exstore.Chunk {
	ss.t.Helper()
	got := make(map[exstore.Chunk]exstore.Chunk)
	s.Walk(func(e exstore.Exception) bool {
		if prev, dup := got[e.Old]; dup {
			assert.Fail(ss.t, "Walk repeated an origin chunk", "%s: %d→%d and %d→%d", ss.h.Name, e.Old, prev, e.Old, e.New)
		}
		got[e.Old] = e.New
		return true
	})
	return got
}

// checkWalk asserts that s holds exactly want.
func (ss *session) checkWalk(s exstore.Store, want map[exstore.Chunk]exstore.Chunk, when string) bool {
	ss.t.Helper()
	got := ss.walk(s)
	if maps.Equal(got, want) {
		return true
	}
	var missing, extra []string
	for old, c := range want {
		if g, ok := got[old]; !ok || g != c {
			missing = append(missing, exstore.Exception{Old: old, New: c}.String())
		}
	}
	for old, c := range got {
		if w, ok := want[old]; !ok || w != c {
			extra = append(extra, exstore.Exception{Old: old, New: c}.String())
		}
	}
	slices.Sort(missing)
	slices.Sort(extra)
	return assert.Fail(ss.t, "Walk differs", "%s: Walk %s: %d exceptions, want %d; missing or wrong: %v; unexpected: %v",
		ss.h.Name, when, len(got), len(want), firstFew(missing), firstFew(extra))
}

// firstFew shortens a long list of differences for a failure message.
func firstFew(s []string) []string {
	const few = 8
	if len(s) <= few {
		return s
	}
	return append(s[:few:few], fmt.Sprintf("… %d more", len(s)-few))
}

// exceptionMap indexes es by origin chunk.
func exceptionMap(es []exstore.Exception) map[exstore.Chunk]exstore.Chunk {
	m := make(map[exstore.Chunk]exstore.Chunk, len(es))
	for _, e := range es {
		m[e.Old] = e.New
	}
	return m
}

// commitAsync starts Commit(e) in a goroutine and returns where its result
// arrives. The channel is buffered, so an abandoned Commit never leaks.
func (ss *session) commitAsync(ctx context.Context, e exstore.Exception) <-chan error {
	done := make(chan error, 1)
	go func() { done <- ss.s.Commit(ctx, e) }()
	return done
}

// notReturned asserts that a Commit started with commitAsync has not
// returned. A correct store cannot have returned, so this never fails one;
// a store that does not wait fails whenever its goroutine got that far.
func (ss *session) notReturned(done <-chan error, what string) {
	ss.t.Helper()
	select {
	case err := <-done:
		assert.Fail(ss.t, "Commit returned early", "%s: %s returned (%v) before the earlier exception was complete", ss.h.Name, what, err)
	default:
	}
}

// result waits, for at most waitLimit, for a Commit started with commitAsync.
func (ss *session) result(done <-chan error, what string) error {
	ss.t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(ss.waitLimit()):
		require.FailNow(ss.t, "Commit never returned", "%s: %s still blocked after %v", ss.h.Name, what, ss.waitLimit())
		return nil
	}
}

// commitBounded commits e, failing the test if that takes longer than
// the wait limit rather than hanging it. It is safe to call from several
// goroutines.
func (ss *session) commitBounded(e exstore.Exception) bool {
	ctx, cancel := context.WithTimeout(ss.t.Context(), ss.waitLimit())
	defer cancel()
	return assert.NoError(ss.t, ss.s.Commit(ctx, e), "%s: Commit(%v)", ss.h.Name, e)
}
