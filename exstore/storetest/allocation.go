package storetest

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// testAllocation fills COWs of several chunk sizes to capacity from many
// goroutines, in device sizes that end at the edges of the store's metadata
// units (Harness.Span) or, without them, in sizes of the suite's own.
func testAllocation(t *testing.T, h Harness) {
	for _, c := range []uint32{1, 8, 16} {
		sizes := []cowSize{{"3 chunks", cowOfChunks(c, 3)}}
		if edges := h.edgeSizes(c); edges != nil {
			sizes = append(sizes, edges...)
		} else {
			spans := cowOfChunks(c, 3*int64(h.span(c)))
			sizes = append(sizes, cowSize{"3 spans", spans})
			if c > 1 {
				sizes = append(sizes, cowSize{"3 spans and a partial chunk", spans + chunkBytes(c)/2})
			}
		}
		for _, sz := range sizes {
			t.Run(fmt.Sprintf("C=%d/%s", c, sz.name), func(t *testing.T) {
				fillConcurrently(t, newSession(t, h, c, sz.bytes))
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
	span := h.span(c)
	ss := newSession(t, h, c, h.cowHolding(t, c, 4*span))
	var prev exstore.Exception
	for i := range 3*span + 3 {
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
