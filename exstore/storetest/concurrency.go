package storetest

import (
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// testConcurrency runs every kind of call at once; run it with -race.
func testConcurrency(t *testing.T, h Harness) {
	const (
		c       = 8
		writers = 6
		perEach = 80
		readers = 3
		oldSpan = 1000 // origin chunks of writer w are w*oldSpan upwards
	)
	ss := newSession(t, h, c, h.cowHolding(t, c, max(3*h.span(c), writers*perEach)))
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
