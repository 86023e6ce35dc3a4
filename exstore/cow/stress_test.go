package cow

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/persistent"
)

// stressOriginSize is a few MiB and not a multiple of any chunk size the
// stress test uses (1, 8 and 16 sectors), so the last chunk is partial.
const stressOriginSize = 2<<20 + 3*512

// stressRegionAlign is the largest chunk size of the stress test: regions
// owned by one goroutine are made of whole chunks of every snapshot.
const stressRegionAlign = 16 * 512

// pickRange returns a request inside [lo, hi): half the time sector-aligned,
// otherwise any byte range, up to a few chunks of the largest size long.
func pickRange(rng *rand.Rand, lo, hi int64) (off int64, n int) {
	maxLen := min(hi-lo, 3*stressRegionAlign)
	if rng.IntN(2) == 0 && (hi-lo) >= 512 {
		sectors := (hi - lo) / 512
		n := 1 + rng.Int64N(min(sectors, maxLen/512))
		off := lo + 512*rng.Int64N(sectors-n+1)
		return off, int(n * 512)
	}
	n = 1 + rng.IntN(int(maxLen))
	off = lo + rng.Int64N(hi-lo-int64(n)+1)
	return off, n
}

// TestStressModel runs random concurrent origin and snapshot I/O against
// three snapshots of different chunk sizes, taken one after another, and
// compares every read with a reference model: the origin's bytes, and for
// each snapshot the origin's bytes when it was taken plus its own writes.
// Each goroutine owns a region of whole chunks, so its reads have exactly
// one right answer while the others run elsewhere; the contention phases
// instead aim origin writers and snapshot readers at the same chunks of a
// fresh snapshot, where a read must never see the new origin data. At the
// end the devices lose every unflushed write and the stores are reloaded
// from them; the snapshots must still read as the model.
func TestStressModel(t *testing.T) {
	const seed = 20261121
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0))
	originDev := newOriginDev(rng, stressOriginSize)
	originModel := originDev.Bytes()
	o := NewOrigin(originDev)
	cowBytes := int64(stressOriginSize)*5/4 + 64<<10

	phases := []struct {
		name         string
		chunkSectors uint32
		contention   bool
	}{
		{"a", 8, false},
		{"b", 1, true},
		{"c", 16, true},
	}
	var snaps []*testSnap
	for i, ph := range phases {
		snaps = append(snaps, addSnapshot(t, o, ph.name, ph.chunkSectors, cowBytes, SnapshotOptions{}, originModel))
		if ph.contention {
			runContention(t, o, snaps, originModel, seed+uint64(i))
		}
		runRegions(t, o, snaps, originModel, seed+uint64(i))
		checkModel(t, o, snaps, originModel)
	}

	order := o.Snapshots()
	require.Len(t, order, 3)
	for i := 1; i < len(order); i++ {
		assert.GreaterOrEqual(t, order[i-1].ChunkSectors(), order[i].ChunkSectors(), "origin writes visit the largest chunk size first")
	}

	// Durability: flush, cut the power dropping every unflushed write, and
	// reload the stores from what survived.
	require.NoError(t, o.Flush(ctx))
	for _, s := range snaps {
		require.NoError(t, s.snap.Flush(ctx))
		require.NoError(t, s.store.Close())
	}
	reloaded := NewOrigin(originDev.PowerCutDropAll())
	requireSame(t, originModel, readAll(t, reloaded), "reloaded origin")
	for _, s := range snaps {
		cow := s.cow.PowerCutDropAll()
		store, err := persistent.Open(ctx, cow, persistent.Options{})
		require.NoError(t, err)
		t.Cleanup(func() { _ = store.Close() })
		require.NoError(t, store.Err())
		assert.Equal(t, s.snap.ChunkSectors(), store.ChunkSectors())
		snap, err := reloaded.AddSnapshot(s.snap.Name(), store, cow, SnapshotOptions{})
		require.NoError(t, err)
		requireSame(t, s.model, readAll(t, snap), "reloaded snapshot "+s.snap.Name())
		s.store, s.snap, s.cow = store, snap, cow
	}
	// The reloaded stores keep allocating after their old exceptions.
	data := randomBytes(rng, 3*stressRegionAlign+77)
	off := int64(stressOriginSize) - int64(len(data))
	require.NoError(t, reloaded.WriteAt(ctx, data, off, false))
	copy(originModel[off:], data)
	checkModel(t, reloaded, snaps, originModel)
}

// checkModel compares the origin and every snapshot with the model, and
// checks that no chunk lock is left behind.
func checkModel(t *testing.T, o *Origin, snaps []*testSnap, originModel []byte) {
	t.Helper()
	requireSame(t, originModel, readAll(t, o), "origin")
	for _, s := range snaps {
		require.NoError(t, s.snap.Err())
		requireSame(t, s.model, readAll(t, s.snap), "snapshot "+s.snap.Name())
		assert.Zero(t, s.snap.locks.held(), "snapshot %s: chunk locks left held", s.snap.Name())
	}
}

// runRegions gives each of several goroutines a region of whole chunks
// and has it issue random origin writes, snapshot writes, reads of both
// (checked at once against the model) and flushes in it.
func runRegions(t *testing.T, o *Origin, snaps []*testSnap, originModel []byte, seed uint64) {
	const workers, ops = 8, 250
	ctx := context.Background()
	regionSize := stressOriginSize / workers / stressRegionAlign * stressRegionAlign
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := range workers {
		lo := int64(w * regionSize)
		hi := lo + int64(regionSize)
		if w == workers-1 {
			hi = stressOriginSize
		}
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)+1))
			for i := range ops {
				if err := regionOp(ctx, rng, o, snaps, originModel, lo, hi); err != nil {
					errs <- fmt.Errorf("worker %d op %d: %w", w, i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.NoError(t, err)
	}
	require.False(t, t.Failed())
}

// regionOp issues one random operation inside [lo, hi).
func regionOp(ctx context.Context, rng *rand.Rand, o *Origin, snaps []*testSnap, originModel []byte, lo, hi int64) error {
	off, n := pickRange(rng, lo, hi)
	s := snaps[rng.IntN(len(snaps))]
	fua := rng.IntN(8) == 0
	switch op := rng.IntN(10); {
	case op < 3:
		data := randomBytes(rng, n)
		if err := o.WriteAt(ctx, data, off, fua); err != nil {
			return err
		}
		copy(originModel[off:], data)
	case op < 5:
		data := randomBytes(rng, n)
		if err := s.snap.WriteAt(ctx, data, off, fua); err != nil {
			return err
		}
		copy(s.model[off:], data)
	case op < 8:
		got := make([]byte, n)
		if err := s.snap.ReadAt(ctx, got, off); err != nil {
			return err
		}
		if !bytes.Equal(got, s.model[off:off+int64(n)]) {
			return fmt.Errorf("snapshot %s: read %d bytes at %d: %s", s.snap.Name(), n, off, firstDiff(got, s.model[off:off+int64(n)]))
		}
	case op < 9:
		got := make([]byte, n)
		if err := o.ReadAt(ctx, got, off); err != nil {
			return err
		}
		if !bytes.Equal(got, originModel[off:off+int64(n)]) {
			return fmt.Errorf("origin: read %d bytes at %d: %s", n, off, firstDiff(got, originModel[off:off+int64(n)]))
		}
	default:
		if rng.IntN(2) == 0 {
			return o.Flush(ctx)
		}
		return s.snap.Flush(ctx)
	}
	return nil
}

// runContention aims origin writers, snapshot writers and snapshot readers
// at the same chunks (the start of the volume, which the newest snapshot has
// no exception for yet). Origin writers own interleaved 512-byte slots of
// the origin, so every chunk is written by several of them. Snapshot
// writers write the newest snapshot, in the last 4 sectors of every 8 KiB
// block only, so their partial-chunk copies race the origin writers. Readers
// read across everything and check every byte that has one right answer:
// all of the older snapshots, and the newest outside the snapshot writers'
// sectors. A snapshot read must never see new origin data.
func runContention(t *testing.T, o *Origin, snaps []*testSnap, originModel []byte, seed uint64) {
	const (
		hot          = 128 << 10
		slot         = 512
		slotsInBlock = stressRegionAlign / slot
		firstSnapped = slotsInBlock - 4 // slots of a block that snapshot writers own
		writers      = 3
		snapWriters  = 2
		readers      = 3
		writeOps     = 400
		minReads     = 300
	)
	ctx := context.Background()
	newest := snaps[len(snaps)-1]
	snapSlot := func(s int64) bool { return s%slotsInBlock >= firstSnapped }
	var writing atomic.Int32
	writing.Store(writers + snapWriters)
	var reads atomic.Int64
	errs := make(chan error, writers+snapWriters+readers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			defer writing.Add(-1)
			rng := rand.New(rand.NewPCG(seed, 100+uint64(w)))
			for i := range writeOps {
				s := int64(rng.IntN(hot/slot/writers)*writers + w)
				n := 1 + rng.IntN(slot)
				off := s*slot + rng.Int64N(slot-int64(n)+1)
				data := randomBytes(rng, n)
				if err := o.WriteAt(ctx, data, off, false); err != nil {
					errs <- fmt.Errorf("writer %d op %d: %w", w, i, err)
					return
				}
				copy(originModel[off:], data)
			}
		})
	}
	for w := range snapWriters {
		wg.Go(func() {
			defer writing.Add(-1)
			rng := rand.New(rand.NewPCG(seed, 300+uint64(w)))
			for i := range writeOps {
				block := int64(rng.IntN(hot/stressRegionAlign/snapWriters)*snapWriters + w)
				s := block*slotsInBlock + firstSnapped + rng.Int64N(slotsInBlock-firstSnapped)
				n := 1 + rng.IntN(slot)
				off := s*slot + rng.Int64N(slot-int64(n)+1)
				data := randomBytes(rng, n)
				if err := newest.snap.WriteAt(ctx, data, off, false); err != nil {
					errs <- fmt.Errorf("snapshot writer %d op %d: %w", w, i, err)
					return
				}
				copy(newest.model[off:], data)
			}
		})
	}
	for r := range readers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, 200+uint64(r)))
			for i := 0; writing.Load() > 0 || i < minReads; i++ {
				s := snaps[rng.IntN(len(snaps))]
				off, n := pickRange(rng, 0, hot)
				got := make([]byte, n)
				if err := s.snap.ReadAt(ctx, got, off); err != nil {
					errs <- fmt.Errorf("reader %d op %d: %w", r, i, err)
					return
				}
				for pos := off; pos < off+int64(n); {
					end := min((pos/slot+1)*slot, off+int64(n))
					if s == newest && snapSlot(pos/slot) {
						pos = end
						continue
					}
					if g, want := got[pos-off:end-off], s.model[pos:end]; !bytes.Equal(g, want) {
						errs <- fmt.Errorf("reader %d: snapshot %s: read %d bytes at %d: at %d: %s",
							r, s.snap.Name(), n, off, pos, firstDiff(g, want))
						return
					}
					pos = end
				}
				reads.Add(1)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.NoError(t, err)
	}
	require.False(t, t.Failed())
	assert.GreaterOrEqual(t, reads.Load(), int64(readers*minReads))
}
