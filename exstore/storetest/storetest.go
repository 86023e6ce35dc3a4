// Package storetest is the conformance suite every exstore.Store type runs.
//
// A store package describes how to make its stores in a Harness and calls Run
// from its tests. The suite checks the Store contract documented in
// package exstore: unique in-device allocation up to exactly the store's
// capacity and then ErrNoSpace, commit visibility, in-order commits and
// aborts, reloading, usage accounting, invalidation, the merge primitives
// with the kernel's run counting, refreshing a second instance, and
// concurrent use (run it under -race).
//
// COW sizes are chosen around dm-snapshot's persistent layout (a metadata
// area every 1+chunkSectors*32 chunks after the header) so that they hit that
// layout's edge cases; stores without metadata just see varied sizes.
package storetest

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Harness describes how to make stores of one type for the suite.
type Harness struct {
	// Name names the store type in failure messages.
	Name string
	// New returns a new, empty store on a fresh COW device of cowBytes bytes
	// with the given chunk size. It also returns the device so the suite can
	// write chunk data and inspect it. The device must accept I/O of whole
	// 512-byte sectors (the suite uses chunks of 1, 8 and 16 sectors) and
	// stay open until the test ends (register its Close with t.Cleanup).
	New func(t *testing.T, chunkSectors uint32, cowBytes int64) (exstore.Store, blockdev.Device)
	// Reopen closes s and opens a new store on the same device, as after a
	// restart. nil: the type keeps no metadata.
	Reopen func(t *testing.T, s exstore.Store, dev blockdev.Device) exstore.Store
	// OpenShared opens a second, independent store instance on the same
	// device (another node). nil: unsupported. The suite closes it.
	OpenShared func(t *testing.T, dev blockdev.Device) exstore.Store
	// Capacity is how many exceptions a COW of that size holds.
	Capacity func(chunkSectors uint32, cowBytes int64) uint64
	// IsMetadata reports whether COW chunk c is a header/metadata chunk
	// (must never be handed out).
	IsMetadata func(chunkSectors uint32, c exstore.Chunk) bool
	// WantUsage is the usage the store must report after n committed
	// exceptions (and nothing else) on a fresh store.
	WantUsage func(chunkSectors uint32, cowBytes int64, n uint64) exstore.Usage
	// Merge: the store supports PrepareMerge/CommitMerge.
	Merge bool
	// WaitLimit bounds how long the suite waits for a Commit it expects to
	// return, so that a store that never wakes a waiter fails instead of
	// hanging; 0 means defaultWaitLimit.
	WaitLimit time.Duration
}

// defaultWaitLimit is Harness.WaitLimit's default.
const defaultWaitLimit = 30 * time.Second

// waitLimit is the harness's WaitLimit.
func (ss *session) waitLimit() time.Duration {
	if ss.h.WaitLimit > 0 {
		return ss.h.WaitLimit
	}
	return defaultWaitLimit
}

// Run runs the conformance suite against the stores h makes.
func Run(t *testing.T, h Harness) {
	require.NotEmpty(t, h.Name, "harness name")
	require.NotNil(t, h.New, "%s harness: New", h.Name)
	require.NotNil(t, h.Capacity, "%s harness: Capacity", h.Name)
	require.NotNil(t, h.IsMetadata, "%s harness: IsMetadata", h.Name)
	require.NotNil(t, h.WantUsage, "%s harness: WantUsage", h.Name)

	t.Run("allocation", func(t *testing.T) { testAllocation(t, h) })
	t.Run("order", func(t *testing.T) { testOrder(t, h) })
	t.Run("lookup", func(t *testing.T) { testLookup(t, h) })
	t.Run("walk", func(t *testing.T) { testWalk(t, h) })
	t.Run("in-order commit", func(t *testing.T) { testInOrderCommit(t, h) })
	t.Run("reload", func(t *testing.T) { testReload(t, h) })
	t.Run("usage", func(t *testing.T) { testUsage(t, h) })
	t.Run("invalidate", func(t *testing.T) { testInvalidate(t, h) })
	t.Run("merge", func(t *testing.T) { testMerge(t, h) })
	t.Run("refresh", func(t *testing.T) { testRefresh(t, h) })
	t.Run("concurrency", func(t *testing.T) { testConcurrency(t, h) })
	t.Run("conditional prepare", func(t *testing.T) { testConditionalPrepare(t, h) })
	t.Run("lazy commit", func(t *testing.T) { testLazyCommit(t, h) })
}

// areaStride is the distance in chunks between dm-snapshot persistent
// metadata areas: one area chunk plus the E = chunk bytes/16 data chunks it
// describes.
func areaStride(chunkSectors uint32) int64 { return int64(chunkSectors)*exstore.SectorSize/16 + 1 }

// chunkBytes is the chunk size in bytes.
func chunkBytes(chunkSectors uint32) int64 { return int64(chunkSectors) * exstore.SectorSize }

// cowOfChunks is the size of a COW of the given number of chunks.
func cowOfChunks(chunkSectors uint32, chunks int64) int64 { return chunks * chunkBytes(chunkSectors) }

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

// close closes the store now.
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

// testAllocation fills COWs of several chunk and device sizes to capacity
// from many goroutines.
func testAllocation(t *testing.T, h Harness) {
	type size struct {
		name   string
		chunks int64 // whole chunks
		extra  int64 // bytes after them, less than a chunk
	}
	for _, c := range []uint32{1, 8, 16} {
		stride := areaStride(c)
		sizes := []size{
			{"3 chunks", 3, 0},
			{"areas end at the device end", 1 + 3*stride, 0},
			{"last chunk is an area", 1 + 3*stride + 1, 0},
			{"last chunk is the first data chunk", 1 + 3*stride + 2, 0},
			{"mid-area", 1 + 3*stride + stride/2, 0},
		}
		if c > 1 {
			sizes = append(sizes, size{"mid-area with a partial chunk", 1 + 3*stride + stride/2, chunkBytes(c) / 2})
		}
		for _, sz := range sizes {
			cowBytes := cowOfChunks(c, sz.chunks) + sz.extra
			t.Run(fmt.Sprintf("C=%d/%s", c, sz.name), func(t *testing.T) {
				fillConcurrently(t, newSession(t, h, c, cowBytes))
			})
		}
	}
}

// fillConcurrently prepares and commits exceptions from several goroutines
// until the store is full, then checks what was handed out.
func fillConcurrently(t *testing.T, ss *session) {
	const workers = 8
	want := ss.capacity()
	var (
		nextOld atomic.Uint64
		wg      sync.WaitGroup
		mu      sync.Mutex
		all     []exstore.Exception
	)
	for range workers {
		wg.Go(func() {
			var mine []exstore.Exception
			defer func() {
				mu.Lock()
				all = append(all, mine...)
				mu.Unlock()
			}()
			for {
				// Spread the origin chunks so that runs and gaps both occur.
				n := nextOld.Add(1) - 1
				old := exstore.Chunk(n + n/3*5)
				e, err := ss.s.Prepare(t.Context(), old)
				if errors.Is(err, exstore.ErrNoSpace) {
					return
				}
				if !assert.NoError(t, err, "%s: Prepare(%d)", ss.h.Name, old) {
					return
				}
				if !ss.checkChunk(e, old) {
					ss.s.Abort(e) // so that the other goroutines' commits go on
					return
				}
				ss.writeData(e)
				if !ss.commitBounded(e) {
					return
				}
				mine = append(mine, e)
				if uint64(len(mine)) > want {
					assert.Fail(t, "too many exceptions", "%s: one goroutine alone got %d exceptions, capacity is %d", ss.h.Name, len(mine), want)
					return
				}
			}
		})
	}
	wg.Wait()
	require.False(t, t.Failed(), "%s: filling failed", ss.h.Name)

	assert.EqualValues(t, want, len(all), "%s: exceptions that fit in %d bytes with %d-sector chunks", ss.h.Name, ss.bytes, ss.c)
	byChunk := make(map[exstore.Chunk]exstore.Exception, len(all))
	for _, e := range all {
		if prev, dup := byChunk[e.New]; dup {
			assert.Fail(t, "chunk handed out twice", "%s: chunk %d went to %v and %v", ss.h.Name, e.New, prev, e)
		}
		byChunk[e.New] = e
	}

	// An origin chunk no worker used: the workers spread n as n+n/3*5.
	n := nextOld.Add(1)
	_, err := ss.s.Prepare(t.Context(), exstore.Chunk(n+n/3*5))
	assert.ErrorIs(t, err, exstore.ErrNoSpace, "%s: Prepare on a full store", ss.h.Name)

	ss.checkWalk(ss.s, exceptionMap(all), "after filling")
	for i, e := range all {
		if !ss.checkFound(ss.s, e.Old, e.New) || !ss.checkData(e) {
			t.Logf("stopped checking after exception %d of %d", i+1, len(all))
			break
		}
	}
	assert.Equal(t, ss.wantUsage(want), ss.s.Usage(), "%s: usage when full", ss.h.Name)
}

// testOrder checks that Prepare hands out chunks in increasing order.
func testOrder(t *testing.T, h Harness) {
	const c = 1
	ss := newSession(t, h, c, cowOfChunks(c, 1+4*areaStride(c)))
	var prev exstore.Exception
	for i := range uint64(3 * areaStride(c)) {
		e := ss.prepare(exstore.Chunk(1000 - i))
		if i > 0 && !assert.Greater(t, e.New, prev.New, "%s: Prepare #%d after %v", h.Name, i, prev) {
			break
		}
		prev = e
		if i%5 == 0 {
			ss.s.Abort(e)
		} else {
			ss.commit(e)
		}
	}
}

// testLookup checks that an exception becomes visible at Commit, not before.
func testLookup(t *testing.T, h Harness) {
	const c = 8
	ss := newSession(t, h, c, cowOfChunks(c, 64))
	for _, old := range []exstore.Chunk{42, 0, exstore.MaxChunk, 1 << 40} {
		e := ss.prepare(old)
		ss.checkMissing(ss.s, old, "before Commit")
		ss.commit(e)
		ss.checkFound(ss.s, old, e.New)
	}
	for _, old := range []exstore.Chunk{41, 43, 1, exstore.MaxChunk - 1, 1<<40 - 1, 1<<40 + 1} {
		ss.checkMissing(ss.s, old, "for a chunk without an exception")
	}
	u := ss.s.Usage()
	assert.EqualValues(t, 4, u.Exceptions, "%s: usage exception count", h.Name)
}

// testWalk checks that Walk stops when its function returns false.
func testWalk(t *testing.T, h Harness) {
	const c = 8
	ss := newSession(t, h, c, cowOfChunks(c, 64))
	want := make(map[exstore.Chunk]exstore.Chunk)
	for _, old := range []exstore.Chunk{5, 6, 7, 100, 3} {
		want[old] = ss.add(old).New
	}
	ss.checkWalk(ss.s, want, "of five exceptions")
	calls := 0
	ss.s.Walk(func(exstore.Exception) bool {
		calls++
		return calls < 2
	})
	assert.Equal(t, 2, calls, "%s: Walk calls after the function returned false on the second", h.Name)
}

// testInOrderCommit checks that a Commit waits for every exception prepared
// before it, and that an Abort or a cancelled wait does not break the order.
func testInOrderCommit(t *testing.T, h Harness) {
	const c = 8
	cowBytes := cowOfChunks(c, 64)

	t.Run("commit", func(t *testing.T) {
		ss := newSession(t, h, c, cowBytes)
		a, b, x := ss.prepare(100), ss.prepare(200), ss.prepare(300)
		ss.writeData(a)
		ss.writeData(b)
		ss.writeData(x)
		xDone := ss.commitAsync(t.Context(), x)
		bDone := ss.commitAsync(t.Context(), b)
		ss.notReturned(bDone, "Commit(b)")
		ss.notReturned(xDone, "Commit(x)")
		require.NoError(t, ss.s.Commit(t.Context(), a), "%s: Commit(a)", h.Name)
		assert.NoError(t, ss.result(bDone, "Commit(b)"), "%s: Commit(b)", h.Name)
		assert.NoError(t, ss.result(xDone, "Commit(x)"), "%s: Commit(x)", h.Name)
		ss.checkFound(ss.s, a.Old, a.New)
		ss.checkFound(ss.s, b.Old, b.New)
		ss.checkFound(ss.s, x.Old, x.New)
	})

	t.Run("abort", func(t *testing.T) {
		ss := newSession(t, h, c, cowBytes)
		a, b := ss.prepare(100), ss.prepare(200)
		ss.writeData(b)
		bDone := ss.commitAsync(t.Context(), b)
		ss.notReturned(bDone, "Commit(b)")
		ss.s.Abort(a)
		assert.NoError(t, ss.result(bDone, "Commit(b)"), "%s: Commit(b) after Abort(a)", h.Name)
		ss.checkMissing(ss.s, a.Old, "after Abort")
		ss.checkFound(ss.s, b.Old, b.New)
		next := ss.add(300)
		assert.NotEqual(t, a.New, next.New, "%s: the chunk of an aborted exception was handed out again", h.Name)
		assert.Greater(t, next.New, b.New, "%s: chunk order after an abort", h.Name)
		assert.EqualValues(t, 2, ss.s.Usage().Exceptions, "%s: usage exception count", h.Name)
	})

	t.Run("prepare again after abort", func(t *testing.T) {
		// An aborted exception's origin chunk may be prepared again at
		// once, also while an exception prepared before it is still
		// outstanding (a store that completes in order still has the
		// aborted one queued): a COW path that gave up on a chunk, for a
		// failed copy, retries with the next write.
		ss := newSession(t, h, c, cowBytes)
		a, b := ss.prepare(100), ss.prepare(200)
		require.True(t, ss.s.Abort(b), "%s: Abort(b)", h.Name)
		again := ss.prepare(200)
		assert.NotEqual(t, b.New, again.New, "%s: the chunk of an aborted exception was handed out again", h.Name)
		ss.writeData(a)
		ss.writeData(again)
		require.NoError(t, ss.s.Commit(t.Context(), a), "%s: Commit(a)", h.Name)
		require.NoError(t, ss.s.Commit(t.Context(), again), "%s: Commit of chunk %d prepared again", h.Name, again.Old)
		ss.checkFound(ss.s, a.Old, a.New)
		ss.checkFound(ss.s, again.Old, again.New)
		ss.checkData(again)
		assert.EqualValues(t, 2, ss.s.Usage().Exceptions, "%s: usage exception count", h.Name)
	})

	t.Run("not prepared", func(t *testing.T) {
		// Commit and Abort of an exception that is not (or no longer)
		// prepared change nothing and say so: a wrapper counts on it to
		// release what the Prepare took exactly once.
		ss := newSession(t, h, c, cowBytes)
		a, b, x := ss.prepare(100), ss.prepare(200), ss.prepare(300)
		// b is aborted while a, prepared before it, is outstanding: a
		// store that completes in order still has b queued.
		assert.True(t, ss.s.Abort(b), "%s: Abort(b)", h.Name)
		assert.False(t, ss.s.Abort(b), "%s: a second Abort(b)", h.Name)
		// In the background and bounded: a store that wrongly took it
		// would wait for a, which is not committed yet.
		bDone := ss.commitAsync(t.Context(), b)
		assert.ErrorIs(t, ss.result(bDone, "Commit(b) after its Abort"), exstore.ErrNotPrepared, "%s: Commit(b) after its Abort", h.Name)
		ss.writeData(a)
		require.NoError(t, ss.s.Commit(t.Context(), a), "%s: Commit(a)", h.Name)
		assert.ErrorIs(t, ss.s.Commit(t.Context(), a), exstore.ErrNotPrepared, "%s: a second Commit(a)", h.Name)
		assert.False(t, ss.s.Abort(a), "%s: Abort(a) after its Commit", h.Name)
		never := exstore.Exception{Old: 400, New: x.New + 5}
		assert.ErrorIs(t, ss.s.Commit(t.Context(), never), exstore.ErrNotPrepared, "%s: Commit of an exception never prepared", h.Name)
		assert.False(t, ss.s.Abort(never), "%s: Abort of an exception never prepared", h.Name)
		wrongOld := exstore.Exception{Old: x.Old + 1, New: x.New}
		assert.ErrorIs(t, ss.s.Commit(t.Context(), wrongOld), exstore.ErrNotPrepared, "%s: Commit of a prepared COW chunk with another origin chunk", h.Name)
		ss.writeData(x)
		require.NoError(t, ss.s.Commit(t.Context(), x), "%s: Commit(x)", h.Name)
		ss.checkFound(ss.s, a.Old, a.New)
		ss.checkMissing(ss.s, b.Old, "after Abort")
		ss.checkFound(ss.s, x.Old, x.New)
		ss.checkMissing(ss.s, never.Old, "never committed")
		assert.EqualValues(t, 2, ss.s.Usage().Exceptions, "%s: usage exception count", h.Name)
	})

	t.Run("cancelled", func(t *testing.T) {
		// A Commit whose context has ended while an earlier exception is
		// outstanding cannot have committed; it returns ctx.Err() and its
		// exception stays queued. This needs no timing: it is deterministic.
		ss := newSession(t, h, c, cowBytes)
		a, b := ss.prepare(100), ss.prepare(200)
		ss.writeData(b)
		cancelled, cancel := context.WithCancel(t.Context())
		cancel()
		err := ss.s.Commit(cancelled, b)
		require.ErrorIs(t, err, context.Canceled, "%s: Commit(b) with a cancelled context while a is outstanding", h.Name)
		ss.checkMissing(ss.s, b.Old, "whose Commit is waiting for an earlier exception")
		ss.commit(a)
		// Commit(x) returns only once b, queued before it, is complete.
		x := ss.add(300)
		ss.checkFound(ss.s, a.Old, a.New)
		ss.checkFound(ss.s, b.Old, b.New)
		ss.checkFound(ss.s, x.Old, x.New)
	})
}

// testReload commits a random set of exceptions and checks that a reopened
// store holds exactly that set.
func testReload(t *testing.T, h Harness) {
	if h.Reopen == nil {
		t.Skipf("%s keeps no metadata", h.Name)
	}
	const c = 8
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(uint64(seed), 17))
	ss := newSession(t, h, c, cowOfChunks(c, 1+3*areaStride(c)+10))
	count := int(areaStride(c)) + 80 // more than one area's worth
	require.LessOrEqual(t, uint64(count)+1, ss.capacity(), "COW too small for the test")

	olds := []exstore.Chunk{0, exstore.MaxChunk, exstore.MaxChunk - 1, 1 << 32, 1<<32 - 1}
	seen := make(map[exstore.Chunk]bool)
	for _, o := range olds {
		seen[o] = true
	}
	for len(olds) < count {
		// A run of consecutive chunks, or a random chunk anywhere.
		start := exstore.Chunk(rng.Uint64N(uint64(exstore.MaxChunk) - 64))
		if rng.IntN(2) == 0 {
			start = exstore.Chunk(rng.Uint64N(1 << 20))
		}
		for i := range exstore.Chunk(rng.IntN(12) + 1) {
			if o := start + i; !seen[o] && len(olds) < count {
				seen[o] = true
				olds = append(olds, o)
			}
		}
	}
	rng.Shuffle(len(olds), func(i, j int) { olds[i], olds[j] = olds[j], olds[i] })
	want := make(map[exstore.Chunk]exstore.Chunk, count)
	used := make(map[exstore.Chunk]bool, count)
	for _, o := range olds {
		e := ss.add(o)
		want[o] = e.New
		used[e.New] = true
	}
	before := ss.s.Usage()

	ss.reopen()
	require.NoError(t, ss.s.Err(), "%s: Err after Reopen", h.Name)
	ss.checkWalk(ss.s, want, "after Reopen")
	assert.Equal(t, before, ss.s.Usage(), "%s: usage after Reopen", h.Name)
	for _, o := range olds {
		if !ss.checkFound(ss.s, o, want[o]) {
			break
		}
	}

	e := ss.add(exstore.Chunk(rng.Uint64N(1<<20) + 1<<21))
	assert.False(t, used[e.New], "%s: after Reopen, Prepare handed out chunk %d, which holds data", h.Name, e.New)
	want[e.Old] = e.New
	ss.reopen()
	ss.checkWalk(ss.s, want, "after a second Reopen")
	for o, n := range want {
		if !ss.checkData(exstore.Exception{Old: o, New: n}) {
			break
		}
	}
}

// testUsage checks the usage after every commit up to capacity.
func testUsage(t *testing.T, h Harness) {
	for _, c := range []uint32{1, 8} {
		t.Run(fmt.Sprintf("C=%d", c), func(t *testing.T) {
			stride := areaStride(c)
			ss := newSession(t, h, c, cowOfChunks(c, 1+2*stride+stride/2))
			capacity := ss.capacity()
			require.Positive(t, capacity, "COW too small for the test")
			checkUsage := func(n uint64) bool {
				t.Helper()
				want, got := ss.wantUsage(n), ss.s.Usage()
				ok := assert.Equal(t, want, got, "%s: usage after %d exceptions", h.Name, n)
				ok = assert.Equal(t, uint64(ss.bytes)/exstore.SectorSize, got.TotalSectors, "%s: total sectors", h.Name) && ok
				ok = assert.Equal(t, n, got.Exceptions, "%s: exception count", h.Name) && ok
				ok = assert.Zero(t, got.AllocatedSectors%uint64(c), "%s: allocation %d is not whole chunks", h.Name, got.AllocatedSectors) && ok
				ok = assert.LessOrEqual(t, got.MetadataSectors, got.AllocatedSectors, "%s: metadata beyond the allocation", h.Name) && ok
				ok = assert.LessOrEqual(t, got.AllocatedSectors, got.TotalSectors, "%s: allocation beyond the device", h.Name) && ok
				if n == 0 || n == 1 || n == capacity {
					ok = assert.Equal(t, fmt.Sprintf("%d/%d %d", want.AllocatedSectors, want.TotalSectors, want.MetadataSectors),
						got.String(), "%s: status after %d exceptions", h.Name, n) && ok
				}
				return ok
			}
			checkUsage(0)
			for n := uint64(1); n <= capacity; n++ {
				ss.add(exstore.Chunk(n * 2))
				if !checkUsage(n) {
					break
				}
			}
		})
	}
}

// testInvalidate checks that an invalidated store says why and refuses
// work, also after a Reopen.
func testInvalidate(t *testing.T, h Harness) {
	const c = 8
	ss := newSession(t, h, c, cowOfChunks(c, 64))
	ss.add(1)
	a, b := ss.prepare(2), ss.prepare(3)
	ss.writeData(b)
	bDone := ss.commitAsync(t.Context(), b)
	ss.notReturned(bDone, "Commit(b)")

	reason := errors.New("storetest: copying the origin chunk failed")
	require.NoError(t, ss.s.Invalidate(t.Context(), reason), "%s: Invalidate", h.Name)
	err := ss.s.Err()
	assert.ErrorIs(t, err, exstore.ErrInvalid, "%s: Err after Invalidate", h.Name)
	assert.ErrorIs(t, err, reason, "%s: Err after Invalidate", h.Name)
	var invalid *exstore.InvalidError
	assert.ErrorAs(t, err, &invalid, "%s: Err after Invalidate", h.Name)

	assert.ErrorIs(t, ss.s.Commit(t.Context(), a), exstore.ErrInvalid, "%s: Commit after Invalidate", h.Name)
	assert.ErrorIs(t, ss.result(bDone, "Commit(b)"), exstore.ErrInvalid, "%s: a Commit waiting during Invalidate", h.Name)
	_, err = ss.s.Prepare(t.Context(), 4)
	assert.ErrorIs(t, err, exstore.ErrInvalid, "%s: Prepare after Invalidate", h.Name)

	if h.Reopen == nil {
		return
	}
	ss.reopen()
	assert.ErrorIs(t, ss.s.Err(), exstore.ErrInvalid, "%s: Err after Reopen of an invalid store", h.Name)
	_, err = ss.s.Prepare(t.Context(), 5)
	assert.ErrorIs(t, err, exstore.ErrInvalid, "%s: Prepare after Reopen of an invalid store", h.Name)
}

// mergeRun is how many exceptions at the end of committed (in commit order)
// the kernel's prepare_merge returns: the last one and those before it whose
// old and new chunks both drop by one per step. New chunks jump over a
// metadata area, so a run never crosses one.
func mergeRun(committed []exstore.Exception) int {
	if len(committed) == 0 {
		return 0
	}
	last := committed[len(committed)-1]
	n := 1
	for i := len(committed) - 2; i >= 0; i-- {
		back := exstore.Chunk(n)
		if committed[i].Old != last.Old-back || committed[i].New != last.New-back {
			break
		}
		n++
	}
	return n
}

// mergeAll merges ss's store down to keep exceptions, checking each round
// against the kernel's, and returns what is left.
func mergeAll(ss *session, committed []exstore.Exception, keep int) []exstore.Exception {
	t := ss.t
	t.Helper()
	tooMany := false
	for len(committed) > keep {
		last, n, err := ss.s.PrepareMerge(t.Context())
		require.NoError(t, err, "%s: PrepareMerge with %d exceptions", ss.h.Name, len(committed))
		require.Equal(t, committed[len(committed)-1], last, "%s: PrepareMerge must return the last exception committed", ss.h.Name)
		require.Equal(t, mergeRun(committed), n, "%s: run length of PrepareMerge at %v", ss.h.Name, last)
		if !tooMany {
			tooMany = true
			err := ss.s.CommitMerge(t.Context(), n+1)
			require.ErrorIs(t, err, exstore.ErrMerge, "%s: CommitMerge(%d) after PrepareMerge returned %d", ss.h.Name, n+1, n)
		}
		require.NoError(t, ss.s.CommitMerge(t.Context(), n), "%s: CommitMerge(%d)", ss.h.Name, n)
		for _, e := range committed[len(committed)-n:] {
			ss.checkMissing(ss.s, e.Old, "after it was merged")
		}
		committed = committed[:len(committed)-n]
		require.True(t, ss.checkWalk(ss.s, exceptionMap(committed), "after CommitMerge"))
		require.Equal(t, ss.wantUsage(uint64(len(committed))), ss.s.Usage(), "%s: usage after merging down to %d", ss.h.Name, len(committed))
	}
	return committed
}

// testMerge checks PrepareMerge and CommitMerge.
func testMerge(t *testing.T, h Harness) {
	if !h.Merge {
		t.Skipf("%s has no merge", h.Name)
	}
	t.Run("runs", func(t *testing.T) {
		const c = 8
		ss := newSession(t, h, c, cowOfChunks(c, 64))
		var committed []exstore.Exception
		for _, old := range []exstore.Chunk{10, 11, 12, 20} {
			committed = append(committed, ss.add(old))
		}
		last, n, err := ss.s.PrepareMerge(t.Context())
		require.NoError(t, err, "%s: PrepareMerge", h.Name)
		assert.Equal(t, committed[3], last, "%s: PrepareMerge's exception", h.Name)
		assert.Equal(t, 1, n, "%s: PrepareMerge's run after a singleton", h.Name)
		require.NoError(t, ss.s.CommitMerge(t.Context(), 1))
		ss.checkMissing(ss.s, 20, "after it was merged")
		assert.Equal(t, ss.wantUsage(3), ss.s.Usage(), "%s: usage after merging one of four", h.Name)

		last, n, err = ss.s.PrepareMerge(t.Context())
		require.NoError(t, err, "%s: PrepareMerge", h.Name)
		assert.Equal(t, committed[2], last, "%s: PrepareMerge's exception", h.Name)
		assert.Equal(t, 3, n, "%s: PrepareMerge's run of 10, 11, 12", h.Name)
		require.ErrorIs(t, ss.s.CommitMerge(t.Context(), 4), exstore.ErrMerge, "%s: CommitMerge(4) of a run of 3", h.Name)
		ss.checkWalk(ss.s, exceptionMap(committed[:3]), "after a refused CommitMerge")
		require.NoError(t, ss.s.CommitMerge(t.Context(), 3))
		ss.checkWalk(ss.s, nil, "after merging everything")
		assert.Equal(t, ss.wantUsage(0), ss.s.Usage(), "%s: usage after merging everything", h.Name)

		_, n, err = ss.s.PrepareMerge(t.Context())
		require.NoError(t, err, "%s: PrepareMerge of an empty store", h.Name)
		assert.Zero(t, n, "%s: PrepareMerge of an empty store", h.Name)
	})

	t.Run("areas", func(t *testing.T) {
		const c = 1
		seed := time.Now().UnixNano()
		t.Logf("seed %d", seed)
		rng := rand.New(rand.NewPCG(uint64(seed), 29))
		stride := areaStride(c)
		ss := newSession(t, h, c, cowOfChunks(c, 1+6*stride))
		target := int(4*stride + stride/3) // metadata in five areas
		require.LessOrEqual(t, uint64(target), ss.capacity(), "COW too small for the test")

		// A run longer than an area's 32 exceptions, then runs of up to 40,
		// singletons, and chunks going down, which are not runs.
		var committed []exstore.Exception
		old := exstore.Chunk(1000)
		for range stride + 1 {
			committed = append(committed, ss.add(old))
			old++
		}
		for len(committed) < target {
			switch rng.IntN(3) {
			case 0:
				for range min(rng.IntN(40)+1, target-len(committed)) {
					committed = append(committed, ss.add(old))
					old++
				}
			case 1:
				committed = append(committed, ss.add(old))
			default:
				committed = append(committed, ss.add(old+5))
				if len(committed) < target {
					committed = append(committed, ss.add(old+4))
				}
				old += 6
			}
			old += exstore.Chunk(rng.IntN(3) + 1)
		}
		// The first run spans more chunks than lie between two metadata
		// areas: if the store has any among its data, the run is split.
		metadataInside, split := false, false
		for ch := committed[0].New; ch <= committed[stride].New; ch++ {
			metadataInside = metadataInside || h.IsMetadata(c, ch)
		}
		for i := 1; i <= int(stride); i++ {
			split = split || committed[i].New != committed[i-1].New+1
		}
		require.Equal(t, metadataInside, split, "%s: a run of origin chunks crosses metadata iff its COW chunks do", h.Name)

		committed = mergeAll(ss, committed, len(committed)/2)
		if h.Reopen != nil {
			ss.reopen()
			ss.checkWalk(ss.s, exceptionMap(committed), "after Reopen mid-merge")
			assert.Equal(t, ss.wantUsage(uint64(len(committed))), ss.s.Usage(), "%s: usage after Reopen mid-merge", h.Name)
		}
		committed = mergeAll(ss, committed, 0)
		require.Empty(t, committed)
		_, n, err := ss.s.PrepareMerge(t.Context())
		require.NoError(t, err, "%s: PrepareMerge after merging everything", h.Name)
		assert.Zero(t, n, "%s: PrepareMerge after merging everything", h.Name)
	})
}

// testRefresh checks that a second instance on the same device sees what
// the first commits and merges once it refreshes.
func testRefresh(t *testing.T, h Harness) {
	if h.OpenShared == nil {
		t.Skipf("%s cannot be opened twice", h.Name)
	}
	const c = 8
	stride := areaStride(c)
	ss := newSession(t, h, c, cowOfChunks(c, 1+3*stride))
	other := h.OpenShared(t, ss.dev)
	require.NotNil(t, other, "%s: OpenShared returned no store", h.Name)
	t.Cleanup(func() { assert.NoError(t, other.Close(), "%s: Close of the second instance", h.Name) })

	var committed []exstore.Exception
	addSome := func(k int) {
		for range k {
			committed = append(committed, ss.add(exstore.Chunk(3*len(committed)+7)))
		}
	}
	check := func(when string) {
		t.Helper()
		require.NoError(t, other.Refresh(t.Context()), "%s: Refresh %s", h.Name, when)
		ss.checkWalk(other, exceptionMap(committed), "of the second instance "+when)
		assert.Equal(t, ss.s.Usage(), other.Usage(), "%s: usage of the second instance %s", h.Name, when)
		for _, e := range committed {
			if !ss.checkFound(other, e.Old, e.New) {
				break
			}
		}
	}
	addSome(40)
	check("after 40 commits")
	addSome(int(stride) + 10)
	check("after commits that filled an area")
	if h.Merge {
		committed = mergeAll(ss, committed, len(committed)-int(stride)/2)
		check("after a merge")
		ss.checkMissing(other, exstore.Chunk(3*(len(committed))+7), "in the second instance after it was merged")
	}
}

// testConcurrency runs every kind of call at once; run it with -race.
func testConcurrency(t *testing.T, h Harness) {
	const (
		c       = 8
		writers = 6
		perEach = 80
		readers = 3
		oldSpan = 1000 // origin chunks of writer w are w*oldSpan upwards
	)
	ss := newSession(t, h, c, cowOfChunks(c, 1+3*areaStride(c)))
	require.GreaterOrEqual(t, ss.capacity(), uint64(writers*perEach), "COW too small for the test")

	var prepared, committed sync.Map // origin chunk → COW chunk
	stop := make(chan struct{})
	var readersWG, writersWG sync.WaitGroup
	for r := range readers {
		readersWG.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(r), 3))
			var lastExceptions, lastAllocated uint64
			for iter := 0; ; iter++ {
				select {
				case <-stop:
					if iter > 0 {
						return
					}
				default:
				}
				old := exstore.Chunk(rng.IntN(writers)*oldSpan + rng.IntN(3*perEach))
				got, found, release, err := ss.s.Lookup(t.Context(), old)
				if assert.NotNil(t, release, "%s: nil release", h.Name) {
					release()
				}
				assert.NoError(t, err, "%s: Lookup(%d)", h.Name, old)
				if found {
					want, ok := prepared.Load(old)
					assert.True(t, ok && want == got, "%s: Lookup(%d) found %d, which Prepare never returned for it", h.Name, old, got)
				}
				u := ss.s.Usage()
				assert.GreaterOrEqual(t, u.Exceptions, lastExceptions, "%s: exception count went down", h.Name)
				assert.GreaterOrEqual(t, u.AllocatedSectors, lastAllocated, "%s: allocation went down", h.Name)
				lastExceptions, lastAllocated = u.Exceptions, u.AllocatedSectors
				if iter%16 == 0 {
					ss.s.Walk(func(e exstore.Exception) bool {
						want, ok := prepared.Load(e.Old)
						return assert.True(t, ok && want == e.New, "%s: Walk gave %v, which Prepare never returned", h.Name, e)
					})
				}
			}
		})
	}
	for w := range writers {
		writersWG.Go(func() {
			for i := range perEach {
				old := exstore.Chunk(w*oldSpan + i*3)
				e, err := ss.s.Prepare(t.Context(), old)
				if !assert.NoError(t, err, "%s: Prepare(%d)", h.Name, old) {
					return
				}
				prepared.Store(old, e.New)
				if i%9 == 4 {
					ss.s.Abort(e)
					continue
				}
				if !ss.commitBounded(e) {
					return
				}
				committed.Store(old, e.New)
			}
		})
	}
	writersWG.Wait()
	close(stop)
	readersWG.Wait()

	want := make(map[exstore.Chunk]exstore.Chunk)
	committed.Range(func(k, v any) bool {
		want[k.(exstore.Chunk)] = v.(exstore.Chunk)
		return true
	})
	ss.checkWalk(ss.s, want, "after concurrent use")
	assert.EqualValues(t, len(want), ss.s.Usage().Exceptions, "%s: exception count after concurrent use", h.Name)
	chunks := make(map[exstore.Chunk]bool)
	prepared.Range(func(_, v any) bool {
		assert.False(t, chunks[v.(exstore.Chunk)], "%s: chunk %d handed out twice", h.Name, v)
		chunks[v.(exstore.Chunk)] = true
		return true
	})
}

// testConditionalPrepare checks an exstore.ConditionalPreparer:
// PrepareIfUnchanged allocates only while the word has the value asked
// for, Unsettled counts the exceptions prepared (either way) until they
// are aborted, committed lazily or written by Commit, and a word changed
// while other goroutines prepare under it, followed by Unsettled, counts
// exactly the allocations admitted under the old value.
func testConditionalPrepare(t *testing.T, h Harness) {
	const c = 8
	ss := newSession(t, h, c, cowOfChunks(c, 4096))
	cp, ok := ss.s.(exstore.ConditionalPreparer)
	if !ok {
		t.Skipf("%s is no exstore.ConditionalPreparer", h.Name)
	}
	ctx := t.Context()
	var word atomic.Uint64
	word.Store(7)
	_, err := cp.PrepareIfUnchanged(ctx, 1, &word, 6)
	require.ErrorIs(t, err, exstore.ErrChanged, "%s: prepare under a stale word", h.Name)
	assert.Zero(t, cp.Unsettled(), "%s: a refused prepare is counted", h.Name)
	// Chunk 1 was not left half-prepared by the refusal.
	a, err := cp.PrepareIfUnchanged(ctx, 1, &word, 7)
	require.NoError(t, err, "%s: prepare under the current word", h.Name)
	ss.checkChunk(a, 1)
	ss.commit(a)
	assert.Zero(t, cp.Unsettled(), "%s: after a Commit returned", h.Name)
	// A Commit waiting behind earlier exceptions leaves its exception
	// unsettled until it is written. Whether the waiting Commit has been
	// called yet when the count is read cannot be seen from here, so the
	// scenario is repeated: a store that settles at the call fails most.
	for i := range 20 {
		base := exstore.Chunk(10 + 3*i)
		a := ss.prepare(base)
		b := ss.prepare(base + 1)
		d := ss.prepare(base + 2)
		require.Equal(t, 3, cp.Unsettled(), "%s: prepared, either way", h.Name)
		ss.writeData(d)
		dDone := ss.commitAsync(ctx, d)
		// Most often lets the Commit's goroutine run up to its wait; a
		// correct store passes whether it does or not.
		runtime.Gosched()
		ss.commit(a)
		ss.notReturned(dDone, "Commit of the exception behind an unsettled one")
		assert.Equal(t, 2, cp.Unsettled(), "%s: after the first Commit returned, the last one waiting", h.Name)
		require.True(t, ss.s.Abort(b))
		require.NoError(t, ss.result(dDone, "Commit of the last exception"))
		assert.Zero(t, cp.Unsettled(), "%s: after the Abort and the last Commit", h.Name)
		if t.Failed() {
			break
		}
	}
	if lazy, ok := ss.s.(exstore.LazyCommitter); ok {
		f := ss.prepare(4)
		assert.Equal(t, 1, cp.Unsettled())
		ss.writeData(f)
		require.NoError(t, lazy.CommitLazy(ctx, f))
		assert.Zero(t, cp.Unsettled(), "%s: after a lazy commit", h.Name)
	}
	assert.ErrorIs(t, ss.s.Commit(ctx, a), exstore.ErrNotPrepared)
	assert.False(t, ss.s.Abort(a))
	assert.Zero(t, cp.Unsettled(), "%s: after commits and aborts it refused", h.Name)

	// Preparers race a change of the word; the count read after the
	// change must hold every allocation admitted under the old value.
	const (
		rounds     = 40
		preparers  = 4
		perRound   = 16 // per preparer: bounds the COW used
		admitFirst = 3  // allocations admitted before the change
	)
	next := exstore.Chunk(1000)
	var nextMu sync.Mutex
	take := func() exstore.Chunk {
		nextMu.Lock()
		defer nextMu.Unlock()
		next++
		return next
	}
	for round := range rounds {
		want := word.Add(1)
		var admitted atomic.Int64
		var mu sync.Mutex
		var got []exstore.Exception
		firstIn := make(chan struct{})
		var once sync.Once
		var wg sync.WaitGroup
		for range preparers {
			wg.Go(func() {
				for range perRound {
					e, err := cp.PrepareIfUnchanged(ctx, take(), &word, want)
					if errors.Is(err, exstore.ErrChanged) {
						return
					}
					if !assert.NoError(t, err, "%s: round %d", h.Name, round) {
						return
					}
					mu.Lock()
					got = append(got, e)
					mu.Unlock()
					if admitted.Add(1) >= admitFirst {
						once.Do(func() { close(firstIn) })
					}
				}
			})
		}
		allDone := make(chan struct{})
		go func() { wg.Wait(); close(allDone) }()
		select {
		case <-firstIn:
		case <-allDone:
		}
		word.Add(1)
		counted := cp.Unsettled()
		<-allDone
		assert.EqualValues(t, admitted.Load(), counted, "%s: round %d: allocations admitted under the old word, and the count read after the change", h.Name, round)
		for _, e := range got {
			require.True(t, ss.s.Abort(e))
		}
		require.Zero(t, cp.Unsettled())
	}
}

// testLazyCommit checks an exstore.LazyCommitter: a lazily committed
// exception is visible at once and durable after Sync, and committing
// lazily the exception that a durable Commit or a Sync waits behind lets
// them finish.
func testLazyCommit(t *testing.T, h Harness) {
	ss := newSession(t, h, 8, cowOfChunks(8, 1024))
	lazy, ok := ss.s.(exstore.LazyCommitter)
	if !ok {
		t.Skipf("%s is no exstore.LazyCommitter", h.Name)
	}
	ctx := t.Context()
	commitLazy := func(e exstore.Exception) {
		t.Helper()
		ss.writeData(e)
		require.NoError(t, lazy.CommitLazy(ctx, e), "%s: CommitLazy(%v)", h.Name, e)
	}
	syncAsync := func() <-chan error {
		done := make(chan error, 1)
		go func() { done <- lazy.Sync(ctx) }()
		return done
	}

	// A durable Commit behind an unfinished exception.
	head := ss.prepare(1)
	second := ss.prepare(2)
	ss.writeData(second)
	done := ss.commitAsync(ctx, second)
	runtime.Gosched() // most often lets the Commit start waiting first
	ss.notReturned(done, "Commit behind an unfinished exception")
	commitLazy(head)
	require.NoError(t, ss.result(done, "Commit behind an exception then committed lazily"))
	ss.checkFound(ss.s, 1, head.New)
	ss.checkFound(ss.s, 2, second.New)

	// A Sync behind an unfinished exception, with a lazy commit after it.
	head = ss.prepare(3)
	after := ss.prepare(4)
	commitLazy(after)
	ss.checkFound(ss.s, 4, after.New)
	assert.False(t, lazy.Durable(after.New), "%s: a lazy commit behind an unfinished exception is durable already", h.Name)
	done = syncAsync()
	runtime.Gosched()
	ss.notReturned(done, "Sync behind an unfinished exception")
	commitLazy(head)
	require.NoError(t, ss.result(done, "Sync behind an exception then committed lazily"))
	assert.True(t, lazy.Durable(head.New), "%s: after Sync", h.Name)
	assert.True(t, lazy.Durable(after.New), "%s: after Sync", h.Name)
	if ss.h.Reopen != nil {
		ss.reopen()
		ss.checkFound(ss.s, 3, head.New)
		ss.checkFound(ss.s, 4, after.New)
	}
}
