package cow

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// mergeScenario is an origin with the snapshot to merge (target) and
// another snapshot (other) of a different chunk size, taken later, with
// their models, all flushed: what an offline merge starts from.
type mergeScenario struct {
	originDev   *faultdev.Device
	origin      *Origin
	originModel []byte
	target      *testSnap
	other       *testSnap
}

// applyWrite writes p at off to v and to the models the write changes.
func applyWrite(t *testing.T, v volume, p []byte, off int64, models ...[]byte) {
	t.Helper()
	require.NoError(t, v.WriteAt(context.Background(), p, off, false))
	for _, m := range models {
		copy(m[off:], p)
	}
}

// randomWrite writes random data to v: a run of whole chunks (which makes
// runs of consecutive exceptions) or an unaligned range.
func randomWrite(t *testing.T, rng *rand.Rand, v volume, chunkBytes int64, models ...[]byte) {
	t.Helper()
	size := v.Size()
	var off, n int64
	if rng.IntN(2) == 0 {
		off = rng.Int64N(size/chunkBytes+1) * chunkBytes
		n = min((1+rng.Int64N(6))*chunkBytes, size-off)
	} else {
		off = rng.Int64N(size)
		n = min(1+rng.Int64N(2*chunkBytes), size-off)
	}
	if n <= 0 {
		return
	}
	applyWrite(t, v, randomBytes(rng, int(n)), off, models...)
}

// newMergeScenario builds, deterministically from seed, an origin of
// chunks target chunks plus a partial one, a target snapshot of
// chunkSectors whose exceptions come from origin and snapshot writes and
// cover about coverage of its chunks, and another snapshot taken midway.
func newMergeScenario(t *testing.T, seed uint64, chunkSectors uint32, chunks int, coverage float64) *mergeScenario {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, uint64(chunkSectors)))
	chunkBytes := int64(chunkSectors) * exstore.SectorSize
	// The origin's size is not a multiple of the chunk size: with 1-sector
	// chunks only a size that is not a multiple of a sector can do that.
	partial := int64(3 * exstore.SectorSize)
	if chunkSectors <= 3 {
		partial = exstore.SectorSize / 2
	}
	size := int64(chunks)*chunkBytes + partial
	originDev := newOriginDev(rng, int(size))
	originModel := originDev.Bytes()
	o := NewOrigin(originDev)
	cowBytes := size*3/2 + 256<<10
	target := addSnapshot(t, o, "target", chunkSectors, cowBytes, SnapshotOptions{}, originModel)
	otherSectors := uint32(8)
	if chunkSectors == 8 {
		otherSectors = 16
	}
	var other *testSnap
	want := uint64(coverage * float64(chunks))
	for i := 0; target.store.Usage().Exceptions < want; i++ {
		if other == nil && target.store.Usage().Exceptions >= want/2 {
			other = addSnapshot(t, o, "other", otherSectors, cowBytes, SnapshotOptions{}, originModel)
		}
		switch {
		case i%3 == 2:
			randomWrite(t, rng, target.snap, chunkBytes, target.model)
		case other != nil && i%7 == 0:
			randomWrite(t, rng, other.snap, chunkBytes, other.model)
		default:
			randomWrite(t, rng, o, chunkBytes, originModel)
		}
	}
	if other == nil {
		other = addSnapshot(t, o, "other", otherSectors, cowBytes, SnapshotOptions{}, originModel)
	}
	ctx := context.Background()
	require.NoError(t, o.Flush(ctx))
	require.NoError(t, target.snap.Flush(ctx))
	require.NoError(t, other.snap.Flush(ctx))
	requireSame(t, originModel, readAll(t, o), "origin before the merge")
	requireSame(t, target.model, readAll(t, target.snap), "target before the merge")
	requireSame(t, other.model, readAll(t, other.snap), "other snapshot before the merge")
	return &mergeScenario{originDev: originDev, origin: o, originModel: originModel, target: target, other: other}
}

// checkMerged checks the state after a complete merge: the origin reads as
// the target did, the other snapshot as before, and the target is gone.
func checkMerged(t *testing.T, o *Origin, target *Snapshot, targetModel []byte, other *Snapshot, otherModel []byte) {
	t.Helper()
	got := readAll(t, o)
	requireSame(t, targetModel, got, "origin after the merge")
	assert.Equal(t, sha256.Sum256(targetModel), sha256.Sum256(got), "sha256 of the origin after the merge")
	requireSame(t, otherModel, readAll(t, other), "other snapshot after the merge")

	assert.Zero(t, target.Store().Usage().Exceptions)
	target.Store().Walk(func(e exstore.Exception) bool {
		assert.Fail(t, "exception left after the merge", "%v", e)
		return true
	})
	assert.NotContains(t, o.Snapshots(), target)
	assert.Contains(t, o.Snapshots(), other)
	err := target.ReadAt(context.Background(), make([]byte, 1), 0)
	assert.ErrorIs(t, err, ErrMerged)
	assert.ErrorIs(t, target.Err(), ErrMerged)
	assert.ErrorIs(t, o.Merge(context.Background(), target, nil), ErrMerged)
}

// checkMergedStore reopens the merged target's store from its COW device:
// every metadata area is zero, status shows only the header and area 0.
func checkMergedStore(t *testing.T, cow *faultdev.Device, chunkSectors uint32) {
	t.Helper()
	store, err := persistent.Open(context.Background(), cow, persistent.Options{NoFormat: true, Logger: testLogger(t)})
	require.NoError(t, err)
	defer func() { _ = store.Close() }()
	u := store.Usage()
	assert.Zero(t, u.Exceptions)
	assert.Equal(t, 2*uint64(chunkSectors), u.AllocatedSectors, "allocated sectors after the merge")
	assert.Equal(t, 2*uint64(chunkSectors), u.MetadataSectors, "metadata sectors after the merge")
}

// TestMergeResult merges snapshots of 1-, 8- and 16-sector chunks whose
// exceptions span several metadata areas; another snapshot is read
// concurrently throughout.
func TestMergeResult(t *testing.T) {
	for _, tc := range []struct {
		chunkSectors uint32
		chunks       int
	}{{1, 300}, {8, 700}, {16, 1100}} {
		t.Run(fmt.Sprintf("chunk%d", tc.chunkSectors), func(t *testing.T) {
			ms := newMergeScenario(t, 1, tc.chunkSectors, tc.chunks, 0.9)
			u := ms.target.store.Usage()
			perArea := uint64(tc.chunkSectors) * exstore.SectorSize / persistent.RecordSize
			require.Greater(t, u.Exceptions, perArea, "the exceptions must span several metadata areas")
			require.GreaterOrEqual(t, u.MetadataSectors, 3*uint64(tc.chunkSectors), "metadata areas in use")
			require.NotEqual(t, ms.target.model, ms.originModel)

			// The other snapshot is served during the merge: its reads
			// never see the merged data.
			ctx := context.Background()
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var reads atomic.Int64
			for r := range 2 {
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(7, uint64(r)))
					for {
						select {
						case <-stop:
							return
						default:
						}
						off := rng.Int64N(ms.other.snap.Size())
						n := min(1+rng.Int64N(64<<10), ms.other.snap.Size()-off)
						buf := make([]byte, n)
						if !assert.NoError(t, ms.other.snap.ReadAt(ctx, buf, off)) {
							return
						}
						if !bytes.Equal(buf, ms.other.model[off:off+n]) {
							assert.Failf(t, "other snapshot read during the merge", "%d bytes at %d: %s", n, off, firstDiff(buf, ms.other.model[off:off+n]))
							return
						}
						reads.Add(1)
					}
				})
			}
			var rounds int
			err := ms.origin.Merge(ctx, ms.target.snap, func(MergeProgress) { rounds++ })
			close(stop)
			wg.Wait()
			require.NoError(t, err)
			t.Logf("%d exceptions merged in %d rounds; %d concurrent reads of the other snapshot", u.Exceptions, rounds, reads.Load())
			assert.Less(t, rounds, int(u.Exceptions), "runs of exceptions merge in one round")

			checkMerged(t, ms.origin, ms.target.snap, ms.target.model, ms.other.snap, ms.other.model)
			checkMergedStore(t, ms.target.cow, tc.chunkSectors)
		})
	}
}

// TestMergeVector15 is vector 15 of the format spec through the engine:
// area 0 = [(10,2),(11,3),(12,4),(20,5)] merges as a run of 1, then a run
// of 3, with the records and status the kernel shows after each commit.
func TestMergeVector15(t *testing.T) {
	const chunkSectors = 8
	const chunkBytes = chunkSectors * exstore.SectorSize
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(15, 15))
	originDev := newOriginDev(rng, 32*chunkBytes)
	o := NewOrigin(originDev)
	ts := addSnapshot(t, o, "s", chunkSectors, 1<<20, SnapshotOptions{}, originDev.Bytes())
	for _, c := range []int64{10, 11, 12, 20} {
		require.NoError(t, o.WriteAt(ctx, randomBytes(rng, chunkBytes), c*chunkBytes, false))
	}
	require.NoError(t, o.Flush(ctx))
	cowBefore := ts.cow.Bytes()
	for i, want := range []exstore.Exception{{Old: 10, New: 2}, {Old: 11, New: 3}, {Old: 12, New: 4}, {Old: 20, New: 5}} {
		rec := cowBefore[4096+16*i:]
		require.Equal(t, want, exstore.Exception{Old: exstore.Chunk(binary.LittleEndian.Uint64(rec)), New: exstore.Chunk(binary.LittleEndian.Uint64(rec[8:]))}, "record %d", i)
	}
	total := ts.cow.Size() / exstore.SectorSize
	require.Equal(t, fmt.Sprintf("48/%d 16", total), ts.store.Usage().String())

	originDev.ResetStats()
	var got []MergeProgress
	err := o.Merge(ctx, ts.snap, func(p MergeProgress) {
		got = append(got, p)
		cow, origin := ts.cow.Bytes(), originDev.Bytes()
		switch len(got) {
		case 1:
			assert.Equal(t, cowBefore[4096:4144], cow[4096:4144], "records left after the first commit")
			assert.Equal(t, make([]byte, 4096-48), cow[4144:8192], "area 0 after the first commit")
			assert.Equal(t, fmt.Sprintf("40/%d 16", total), ts.store.Usage().String())
			assert.Equal(t, cowBefore[5*chunkBytes:6*chunkBytes], origin[20*chunkBytes:21*chunkBytes], "origin chunk 20")
		case 2:
			assert.Equal(t, make([]byte, 4096), cow[4096:8192], "area 0 after the second commit")
			assert.Equal(t, fmt.Sprintf("16/%d 16", total), ts.store.Usage().String())
			assert.Equal(t, cowBefore[8192:20480], origin[40960:53248], "origin chunks 10-12")
		}
	})
	require.NoError(t, err)
	assert.Equal(t, []MergeProgress{{Done: 1, Total: 4}, {Done: 4, Total: 4}}, got)
	st := originDev.Stats()
	assert.Equal(t, uint64(2), st.Writes, "one origin write per run")
	assert.Equal(t, uint64(2), st.Syncs, "one origin flush per run")
	requireSame(t, ts.model, originDev.Bytes(), "origin after the merge")
}

// TestMergeProgress checks that Done increases with every round and ends
// at Total, the exception count when the merge started, and that another
// merge of the origin is refused meanwhile.
func TestMergeProgress(t *testing.T) {
	ms := newMergeScenario(t, 3, 8, 200, 0.7)
	total := ms.target.store.Usage().Exceptions
	var got []MergeProgress
	require.NoError(t, ms.origin.Merge(context.Background(), ms.target.snap, func(p MergeProgress) {
		got = append(got, p)
		// A second merge of the origin is refused while this one runs.
		assert.ErrorIs(t, ms.origin.Merge(context.Background(), ms.other.snap, nil), ErrMergeInProgress)
	}))
	require.NotEmpty(t, got)
	for i, p := range got {
		assert.Equal(t, total, p.Total, "progress %d", i)
		if i > 0 {
			assert.Greater(t, p.Done, got[i-1].Done, "progress %d", i)
		}
	}
	assert.Equal(t, total, got[len(got)-1].Done)
	checkMerged(t, ms.origin, ms.target.snap, ms.target.model, ms.other.snap, ms.other.model)
}

// TestMergeInvalidSnapshot checks that an invalid snapshot, invalidated in
// memory or loaded with its header's valid flag at 0, refuses to merge and
// leaves the origin alone.
func TestMergeInvalidSnapshot(t *testing.T) {
	ctx := context.Background()
	ms := newMergeScenario(t, 4, 8, 64, 0.5)
	before := ms.originDev.Bytes()
	require.NoError(t, ms.target.store.Invalidate(ctx, errors.New("test")))
	err := ms.origin.Merge(ctx, ms.target.snap, func(MergeProgress) { assert.Fail(t, "progress of a refused merge") })
	require.ErrorIs(t, err, exstore.ErrInvalid)
	requireSame(t, before, ms.originDev.Bytes(), "origin after the refused merge")
	assert.Contains(t, ms.origin.Snapshots(), ms.target.snap)

	// The same from disk.
	require.NoError(t, ms.target.store.Close())
	store, err := persistent.Open(ctx, ms.target.cow, persistent.Options{Logger: testLogger(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = store.Close() })
	o := NewOrigin(ms.originDev)
	snap, err := o.AddSnapshot("reloaded", store, ms.target.cow, SnapshotOptions{})
	require.NoError(t, err)
	require.ErrorIs(t, o.Merge(ctx, snap, nil), exstore.ErrInvalid)
	requireSame(t, before, ms.originDev.Bytes(), "origin after the refused merge")

	// A snapshot of another origin is refused too.
	require.Error(t, o.Merge(ctx, ms.other.snap, nil))
}

// TestMergeInterruptedByContext cancels the merge after a random number of
// rounds, or in the middle of one at a random device operation, sometimes
// writes to the origin in between, and resumes it, several times per seed:
// the origin reads as the target did, with those writes, throughout and
// at the end.
func TestMergeInterruptedByContext(t *testing.T) {
	for seed := range uint64(12) {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 100))
			chunkSectors := []uint32{1, 8, 16}[seed%3]
			ms := newMergeScenario(t, seed, chunkSectors, 80, 0.8)
			total := ms.target.store.Usage().Exceptions
			want := bytes.Clone(ms.target.model) // what the origin must read
			var interruptions int
			for attempt := 0; ; attempt++ {
				require.Less(t, attempt, 1000, "the merge does not progress")
				ctx, cancel := context.WithCancel(context.Background())
				var ops atomic.Int64
				var progress func(MergeProgress)
				if rng.IntN(2) == 0 {
					k := rng.IntN(4)
					calls := 0
					progress = func(p MergeProgress) {
						assert.LessOrEqual(t, p.Done, p.Total)
						if calls++; calls > k {
							cancel()
						}
					}
				} else {
					at := 1 + rng.Int64N(60)
					fault := func(faultdev.Op, int64, int64) error {
						if ops.Add(1) == at {
							cancel()
						}
						return nil
					}
					ms.originDev.SetFault(fault)
					ms.target.cow.SetFault(fault)
					ms.other.cow.SetFault(fault)
				}
				err := ms.origin.Merge(ctx, ms.target.snap, progress)
				cancel()
				ms.originDev.SetFault(nil)
				ms.target.cow.SetFault(nil)
				ms.other.cow.SetFault(nil)
				if err == nil {
					break
				}
				require.ErrorIs(t, err, context.Canceled)
				interruptions++
				// An interrupted merge leaves the origin in merge mode:
				// it reads as the target did, merged chunks from the
				// origin, the others from the COW; the target itself
				// cannot be used.
				_, p, merging := ms.origin.Merging()
				require.True(t, merging, "merge mode after an interruption")
				assert.Equal(t, total, p.Total)
				requireSame(t, want, readAll(t, ms.origin), "origin after an interruption")
				require.ErrorIs(t, ms.target.snap.ReadAt(context.Background(), make([]byte, 1), 0), ErrMerging)
				requireSame(t, ms.other.model, readAll(t, ms.other.snap), "other snapshot after an interruption")
				// The origin may be served in between: its writes go to
				// the target's COW or to the origin, after the other
				// snapshot's copies.
				if rng.IntN(2) == 0 {
					chunkBytes := int64(chunkSectors) * exstore.SectorSize
					for range 1 + rng.IntN(4) {
						randomWrite(t, rng, ms.origin, chunkBytes, want)
					}
					require.NoError(t, ms.origin.Flush(context.Background()))
					requireSame(t, want, readAll(t, ms.origin), "origin after origin writes")
					requireSame(t, ms.other.model, readAll(t, ms.other.snap), "other snapshot after origin writes")
				}
			}
			t.Logf("%d exceptions, %d interruptions", total, interruptions)
			checkMerged(t, ms.origin, ms.target.snap, want, ms.other.snap, ms.other.model)
		})
	}
}

// TestMergePowerCut cuts the power of the origin and both COW devices at a
// random device operation during the merge, reloads everything from what
// survived (every unsynced sector independently kept or lost), and resumes
// the merge: the origin ends up as the target read before the merge, and
// the other snapshot keeps its view.
func TestMergePowerCut(t *testing.T) {
	seeds := uint64(24)
	if testing.Short() {
		seeds = 6
	}
	for seed := range seeds {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			chunkSectors := []uint32{1, 8, 16}[seed%3]
			const chunks, coverage = 60, 0.8

			// A clean run counts the device operations a merge does.
			dry := newMergeScenario(t, seed, chunkSectors, chunks, coverage)
			var opCount atomic.Int64
			count := func(faultdev.Op, int64, int64) error { opCount.Add(1); return nil }
			for _, d := range []*faultdev.Device{dry.originDev, dry.target.cow, dry.other.cow} {
				d.SetFault(count)
			}
			require.NoError(t, dry.origin.Merge(context.Background(), dry.target.snap, nil))
			require.Positive(t, opCount.Load())

			ms := newMergeScenario(t, seed, chunkSectors, chunks, coverage)
			rng := rand.New(rand.NewPCG(seed, 200))
			threshold := 1 + rng.Int64N(opCount.Load())
			var ops atomic.Int64
			var powerOff atomic.Bool
			cut := func(faultdev.Op, int64, int64) error {
				if ops.Add(1) >= threshold {
					powerOff.Store(true)
				}
				if powerOff.Load() {
					return errPowerOff
				}
				return nil
			}
			devs := []*faultdev.Device{ms.originDev, ms.target.cow, ms.other.cow}
			for _, d := range devs {
				d.SetFault(cut)
			}
			err := ms.origin.Merge(context.Background(), ms.target.snap, nil)
			if powerOff.Load() {
				require.ErrorIs(t, err, errPowerOff)
			} else {
				require.NoError(t, err)
			}
			require.NoError(t, ms.target.store.Close())
			require.NoError(t, ms.other.store.Close())

			cutRng := rand.New(rand.NewPCG(seed, 300))
			originDev := ms.originDev.PowerCut(cutRng)
			o := NewOrigin(originDev)
			var snaps []*Snapshot
			for _, ts := range []*testSnap{ms.target, ms.other} {
				cow := ts.cow.PowerCut(cutRng)
				store, err := persistent.Open(context.Background(), cow, persistent.Options{Logger: testLogger(t)})
				require.NoError(t, err)
				t.Cleanup(func() { _ = store.Close() })
				require.NoError(t, store.Err(), "the invalidation after the cut could not be written")
				snap, err := o.AddSnapshot(ts.snap.Name(), store, cow, SnapshotOptions{})
				require.NoError(t, err)
				snaps = append(snaps, snap)
			}
			target, other := snaps[0], snaps[1]
			requireSame(t, ms.target.model, readAll(t, target), "target after the power cut")
			requireSame(t, ms.other.model, readAll(t, other), "other snapshot after the power cut")
			require.NoError(t, o.Merge(context.Background(), target, nil))
			checkMerged(t, o, target, ms.target.model, other, ms.other.model)
			t.Logf("cut at operation %d of %d", threshold, opCount.Load())
		})
	}
}

// TestMergeShrunkOrigin merges a snapshot into an origin that is now
// smaller than when the snapshot was taken: runs are clipped at the
// origin's end and runs wholly beyond it only have their records cleared.
func TestMergeShrunkOrigin(t *testing.T) {
	const chunkSectors = 8
	const chunkBytes = chunkSectors * exstore.SectorSize
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(6, 6))
	bigDev := newOriginDev(rng, 12*chunkBytes)
	big := NewOrigin(bigDev)
	ts := addSnapshot(t, big, "s", chunkSectors, 1<<20, SnapshotOptions{}, bigDev.Bytes())
	// Chunks 6-8 are one run (chunk 7 is cut by the new end), chunk 10 is
	// beyond the end, chunk 2 is inside.
	for _, c := range []int64{2, 6, 7, 8, 10} {
		require.NoError(t, big.WriteAt(ctx, randomBytes(rng, chunkBytes), c*chunkBytes, false))
	}
	require.NoError(t, big.Flush(ctx))
	require.Equal(t, uint64(5), ts.store.Usage().Exceptions)

	const newSize = 7*chunkBytes + 1024
	smallDev := faultdev.FromBytes("small", bigDev.Bytes()[:newSize])
	small := NewOrigin(smallDev)
	snap, err := small.AddSnapshot("s", ts.store, ts.cow, SnapshotOptions{})
	require.NoError(t, err)
	requireSame(t, ts.model[:newSize], readAll(t, snap), "snapshot on the shrunk origin")
	var last MergeProgress
	require.NoError(t, small.Merge(ctx, snap, func(p MergeProgress) { last = p }))
	assert.Equal(t, MergeProgress{Done: 5, Total: 5}, last)
	requireSame(t, ts.model[:newSize], smallDev.Bytes(), "shrunk origin after the merge")
	assert.Zero(t, ts.store.Usage().Exceptions)
}

// TestMergeLargeRun merges one run larger than maxMergeIO: it merges in
// runs of maxMergeIO from its end, each copied as one I/O, with one origin
// flush each.
func TestMergeLargeRun(t *testing.T) {
	const chunkSectors = 1024
	const chunkBytes = chunkSectors * exstore.SectorSize
	const runChunks = maxMergeIO/chunkBytes + 2
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(8, 8))
	originDev := newOriginDev(rng, (runChunks+3)*chunkBytes)
	o := NewOrigin(originDev)
	ts := addSnapshot(t, o, "s", chunkSectors, (runChunks+8)*chunkBytes, SnapshotOptions{}, originDev.Bytes())
	// One chunk at a time, so that the exceptions are allocated in order.
	for c := int64(1); c <= runChunks; c++ {
		require.NoError(t, o.WriteAt(ctx, randomBytes(rng, 100), c*chunkBytes+7, false))
	}
	require.NoError(t, o.Flush(ctx))
	originDev.ResetStats()
	var got []MergeProgress
	require.NoError(t, o.Merge(ctx, ts.snap, func(p MergeProgress) { got = append(got, p) }))
	const piece = maxMergeIO / chunkBytes
	assert.Equal(t, []MergeProgress{{Done: piece, Total: runChunks}, {Done: runChunks, Total: runChunks}}, got, "two rounds")
	st := originDev.Stats()
	assert.Equal(t, uint64(2), st.Writes, "origin writes")
	assert.Equal(t, uint64(runChunks*chunkBytes), st.BytesWritten)
	assert.Equal(t, uint64(2), st.Syncs, "origin flushes")
	requireSame(t, ts.model, originDev.Bytes(), "origin after the merge")
}
