package storetest

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// mergeRun is how many exceptions at the end of committed (in commit order)
// the kernel's prepare_merge returns: the last one and those before it whose
// old and new chunks both drop by one per step. New chunks jump over
// metadata chunks, so a run never crosses one.
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

	t.Run("units", func(t *testing.T) {
		const c = 1
		seed := time.Now().UnixNano()
		t.Logf("seed %d", seed)
		rng := rand.New(rand.NewPCG(uint64(seed), 29))
		span := int(h.span(c))
		ss := newSession(t, h, c, h.cowHolding(t, c, uint64(6*span)))
		target := 4*span + span/2 // records in five metadata units
		require.LessOrEqual(t, uint64(target), ss.capacity(), "COW too small for the test")

		// A run longer than a metadata unit, then runs of up to a unit and
		// a bit, singletons, and chunks going down, which are not runs.
		var committed []exstore.Exception
		old := exstore.Chunk(1000)
		for range span + 2 {
			committed = append(committed, ss.add(old))
			old++
		}
		for len(committed) < target {
			switch rng.IntN(3) {
			case 0:
				for range min(rng.IntN(span+8)+1, target-len(committed)) {
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
		// The first run spans more chunks than one metadata unit records:
		// if the store has metadata among its data, the run is split.
		metadataInside, split := false, false
		for ch := committed[0].New; ch <= committed[span+1].New; ch++ {
			metadataInside = metadataInside || h.IsMetadata(c, ch)
		}
		for i := 1; i <= span+1; i++ {
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
