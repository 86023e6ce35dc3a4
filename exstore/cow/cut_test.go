package cow

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/internal/cutcheck"
	"github.com/clustersnap/clustersnap/persistent"
)

// TestAddSnapshotIsACut adds snapshots while writers keep overwriting whole
// regions of several chunks, each write logged with when it was sent and
// acknowledged: each snapshot must read as a cut of that history (package
// cutcheck): every write acknowledged before AddSnapshot began, nothing
// sent after it returned, and a write in flight wholly or not at all.
func TestAddSnapshotIsACut(t *testing.T) {
	const (
		chunkSectors = 8
		regionBytes  = 4 * chunkSectors * 512 // a write covers four chunks
		regions      = 48
		writers      = 4
	)
	for round := range 6 {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			ctx := context.Background()
			o := NewOrigin(faultdev.New("origin", regions*regionBytes))
			// A snapshot from the start makes the writers copy, as they
			// do on a served origin, so that the cut lands among copies.
			addSnapshot(t, o, "before", chunkSectors, 2*regions*regionBytes, SnapshotOptions{}, nil)
			h := cutcheck.New(regionBytes)
			ctx, stop := context.WithCancel(ctx)
			var wg sync.WaitGroup
			started := make(chan struct{}, writers)
			for w := range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(uint64(round), uint64(w)))
					buf := make([]byte, regionBytes)
					for n := 0; ctx.Err() == nil && n < 5000; n++ {
						fua := rng.IntN(8) == 0
						err := h.Write(rng.IntN(regions), buf, func(p []byte, off int64) error { return o.WriteAt(ctx, p, off, fua) })
						if err != nil && !errors.Is(err, context.Canceled) {
							t.Errorf("origin write: %v", err)
						}
						if n == 50 {
							started <- struct{}{}
						}
					}
				}()
			}
			for range writers {
				<-started
			}
			cow := faultdev.New("cow-cut", 2*regions*regionBytes)
			store, err := persistent.Open(context.Background(), cow, persistent.Options{ChunkSectors: chunkSectors, Logger: testLogger(t)})
			require.NoError(t, err)
			t.Cleanup(func() { _ = store.Close() })
			h.CutBegins()
			s, err := o.AddSnapshot("cut", store, cow, SnapshotOptions{})
			h.CutEnds()
			require.NoError(t, err)
			// Let the writers overwrite what the snapshot must keep.
			buf := make([]byte, regionBytes)
			for range 200 {
				require.NoError(t, h.Write(rand.IntN(regions), buf, func(p []byte, off int64) error { return o.WriteAt(context.Background(), p, off, false) }))
			}
			stop()
			wg.Wait()
			sent, acked := h.Writes()
			assert.Greater(t, acked, 400, "writes acknowledged of %d", sent)
			assert.Empty(t, h.Check(readAll(t, s), 10))
		})
	}
}

// TestAddSnapshotFlushesTheOrigin writes the origin without FUA, adds a
// snapshot and cuts the power with no later flush: the snapshot, reopened
// from what survived, must still show the write acknowledged before it was
// taken. An AddSnapshot that skips its flush is caught.
func TestAddSnapshotFlushesTheOrigin(t *testing.T) {
	const chunkSectors, size = 8, 64 << 10
	run := func(t *testing.T, noFlush bool) []string {
		ctx := context.Background()
		origin := faultdev.New("origin", size)
		o := NewOrigin(origin)
		o.noCutFlush = noFlush
		h := cutcheck.New(chunkSectors * 512)
		buf := make([]byte, chunkSectors*512)
		write := func(p []byte, off int64) error { return o.WriteAt(ctx, p, off, false) }
		for r := range size / len(buf) {
			require.NoError(t, h.Write(r, buf, write))
		}
		cow := faultdev.New("cow", 2*size)
		store, err := persistent.Open(ctx, cow, persistent.Options{ChunkSectors: chunkSectors, Logger: testLogger(t)})
		require.NoError(t, err)
		h.CutBegins()
		_, err = o.AddSnapshot("cut", store, cow, SnapshotOptions{})
		h.CutEnds()
		require.NoError(t, err)
		// One write after the cut: its copy is committed durably.
		require.NoError(t, h.Write(0, buf, write))

		o2 := NewOrigin(origin.PowerCutDropAll())
		cow2 := cow.PowerCutDropAll()
		store2, err := persistent.Open(ctx, cow2, persistent.Options{Logger: testLogger(t)})
		require.NoError(t, err)
		defer store2.Close()
		s2, err := o2.AddSnapshot("cut", store2, cow2, SnapshotOptions{})
		require.NoError(t, err)
		return h.Check(readAll(t, s2), 3)
	}
	assert.Empty(t, run(t, false))
	assert.NotEmpty(t, run(t, true), "the check missed a cut without its flush")
}
