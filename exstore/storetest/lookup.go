package storetest

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/clustersnap/clustersnap/exstore"
)

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
