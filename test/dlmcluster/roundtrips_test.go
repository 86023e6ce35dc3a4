package dlmcluster

import (
	"sync"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc"
)

// benchMillis is how long each round-trip measurement runs in the guests.
const benchMillis = 3000

// testRoundTrips measures, in the guests (timed there, so the host's link
// to the agents is no part of it), how many lock round trips the kernel
// DLM does in benchMillis: uncontended NL→CR→NL conversions on a resource
// mastered on the converting guest and on another guest, and contended
// NL→EX→NL handoffs between two owners on one guest and on two guests.
// Under TCG only the counts and their ratios mean anything.
func testRoundTrips(x *xnode) {
	cached := func(g int, res string) int {
		r, err := x.rm.Client(g).Extension(x.ctx, "cached", crossLockspace, []byte(res), benchMillis)
		require.NoError(x.t, err)
		return r.Counts[0]
	}
	localCached := cached(1, "rt-local") // guest 1 is the first requester: it masters it
	keep := x.lock(2, "rt-remote", lockc.NL)
	remoteCached := cached(1, "rt-remote")
	require.NoError(x.t, keep.Unlock(x.ctx))

	pingpong := func(res string, guests []int, owners int) int {
		counts := make([]int, len(guests))
		errs := make([]error, len(guests))
		var wg sync.WaitGroup
		for i, g := range guests {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := x.rm.Client(g).Extension(x.ctx, "pingpong", crossLockspace, []byte(res), owners, benchMillis)
				errs[i] = err
				if err == nil {
					counts[i] = r.Counts[0]
				}
			}()
		}
		wg.Wait()
		total := 0
		for i := range guests {
			require.NoError(x.t, errs[i], "guest %d", guests[i])
			assert.Positive(x.t, counts[i], "guest %d's owners got EX", guests[i])
			total += counts[i]
		}
		return total
	}
	onePP := pingpong("rt-pp-one", []int{1}, 2)
	twoPP := pingpong("rt-pp-two", []int{1, 2}, 1)

	assert.Positive(x.t, localCached)
	assert.Positive(x.t, remoteCached)
	per := func(n int) float64 { return float64(n) * 1000 / benchMillis }
	x.t.Logf("uncontended NL->CR->NL on the master's guest: %d in %d ms (%.0f/s)", localCached, benchMillis, per(localCached))
	x.t.Logf("uncontended NL->CR->NL, master on another guest: %d in %d ms (%.0f/s): %.1fx fewer",
		remoteCached, benchMillis, per(remoteCached), float64(localCached)/float64(max(remoteCached, 1)))
	x.t.Logf("EX handoffs between two owners on one guest: %d in %d ms (%.0f/s)", onePP, benchMillis, per(onePP))
	x.t.Logf("EX handoffs between owners on two guests: %d in %d ms (%.0f/s): %.1fx fewer",
		twoPP, benchMillis, per(twoPP), float64(onePP)/float64(max(twoPP, 1)))
}
