package storetest

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

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
	span := h.span(c)
	ss := newSession(t, h, c, h.cowHolding(t, c, 3*span))
	count := int(span) + 81 // more than one metadata unit's worth
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
