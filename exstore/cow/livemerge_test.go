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

	"github.com/clustersnap/clustersnap/exstore"
)

// readStart returns, for sectors [first, last], the version the newest
// completed write left: a read that begins now must read it or a later one.
func (h *sectorHistory) readStart(first, last int) []int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]int(nil), h.completed[first:last+1]...)
}

// checkRead reports the first sector of got, read at off after readStart
// returned from, that is none of the versions from from on (an older
// content, or one no write issued), and whether every sector is one.
func (h *sectorHistory) checkRead(got []byte, off int64, from []int) (string, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	first, last := sectorSpanOf(off, len(got))
	for s := first; s <= last; s++ {
		lo := max(int64(s)*exstore.SectorSize, off)
		hi := min(int64(s+1)*exstore.SectorSize, off+int64(len(got)), int64(len(h.cur)))
		part := got[lo-off : hi-off]
		ok := false
		for _, v := range h.versions[s][from[s-first]:] {
			if bytes.Equal(part, v[lo-int64(s)*exstore.SectorSize:hi-int64(s)*exstore.SectorSize]) {
				ok = true
				break
			}
		}
		if !ok {
			return fmt.Sprintf("sector %d (bytes %d..%d) reads none of versions %d..%d", s, lo, hi-1, from[s-first], len(h.versions[s])-1), false
		}
	}
	return "", true
}

// violation keeps the first problem a concurrent test finds.
type violation struct {
	once sync.Once
	msg  atomic.Pointer[string]
}

func (v *violation) set(format string, args ...any) {
	v.once.Do(func() {
		msg := fmt.Sprintf(format, args...)
		v.msg.Store(&msg)
	})
}

func (v *violation) get() string {
	if p := v.msg.Load(); p != nil {
		return *p
	}
	return ""
}

// liveMergeWriters and liveMergeOps shape runLiveMerge's workload: each
// writer owns a region of the origin and makes that many requests.
const (
	liveMergeWriters = 3
	liveMergeReaders = 2
	liveMergeOps     = 150
)

// runLiveMerge merges a snapshot into its origin while writers write the
// origin (each its own region, some with FUA, some zeroes, some flushes),
// readers read it anywhere, and another snapshot is read; every request is
// logged. It returns the first violation found, "" if none:
//   - a read returns, for some sector, neither the content the newest
//     write completed before it began left nor a later write's: the
//     origin reads as the snapshot did at the merge's start, with the
//     writes since;
//   - at the end the origin is not the snapshot's content at the merge's
//     start with every write applied in order, or the other snapshot's
//     view changed.
//
// breaks breaks the merge on purpose, for the checker's own test.
func runLiveMerge(t *testing.T, seed uint64, breaks mergeBreaks) string {
	t.Helper()
	chunkSectors := []uint32{1, 8, 16}[seed%3]
	ms := newMergeScenario(t, seed, chunkSectors, 120, 0.85)
	o := ms.origin
	o.breaks = breaks
	h := newSectorHistory(ms.target.model)
	size := o.Size()
	total := ms.target.store.Usage().Exceptions
	ctx := context.Background()
	var bad violation

	// The merge waits, after each round, for the writers to have made a
	// few more requests, so that they overlap the whole merge.
	var (
		paceMu    sync.Mutex
		paceCond  = sync.NewCond(&paceMu)
		writes    int
		writersIn = liveMergeWriters
	)
	tick := func(done bool) {
		paceMu.Lock()
		writes++
		if done {
			writersIn--
		}
		paceMu.Unlock()
		paceCond.Broadcast()
	}
	waitWrites := func(n int) {
		paceMu.Lock()
		defer paceMu.Unlock()
		for writes < n && writersIn > 0 {
			paceCond.Wait()
		}
	}

	// The origin reads as the snapshot from StartMerge on; the merge runs
	// while the writers and readers do.
	require.NoError(t, o.StartMerge(ctx, ms.target.snap))
	var wg sync.WaitGroup
	var mergeErr error
	var rounds int
	wg.Go(func() {
		mergeErr = o.Merge(ctx, ms.target.snap, func(p MergeProgress) {
			rounds++
			if s, q, ok := o.Merging(); !ok || s != ms.target.snap || q != p || p.Total != total {
				bad.set("progress %+v: Merging() says %v %+v %v, total %d", p, s != nil, q, ok, total)
			}
			waitWrites(rounds * liveMergeWriters)
		})
	})
	region := size / liveMergeWriters / exstore.SectorSize * exstore.SectorSize
	var writersDone sync.WaitGroup
	for w := range liveMergeWriters {
		lo, hi := int64(w)*region, int64(w+1)*region
		if w == liveMergeWriters-1 {
			hi = size
		}
		writersDone.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(w)+10))
			for i := range liveMergeOps {
				var err error
				switch r := rng.IntN(10); {
				case r == 0:
					err = o.Flush(ctx)
				case r == 1:
					off, n := crashPick(rng, lo, hi)
					idx := h.issue(make([]byte, n), off)
					if err = o.WriteZeroes(ctx, off, int64(n), rng.IntN(2) == 0, rng.IntN(3) == 0); err == nil {
						h.complete(off, idx, false)
					}
				default:
					off, n := crashPick(rng, lo, hi)
					p := randomBytes(rng, n)
					idx := h.issue(p, off)
					if err = o.WriteAt(ctx, p, off, rng.IntN(4) == 0); err == nil {
						h.complete(off, idx, false)
					}
				}
				if err != nil {
					bad.set("writer %d: %v", w, err)
				}
				tick(i == liveMergeOps-1)
			}
		})
	}
	var readersStop atomic.Bool
	for r := range liveMergeReaders {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(seed, uint64(r)+20))
			for i := 0; i < 100*liveMergeOps && !readersStop.Load(); i++ {
				v := volume(o)
				if i%5 == 4 {
					v = ms.other.snap
				}
				off := rng.Int64N(size)
				n := min(1+rng.Int64N(48<<10), size-off)
				buf := make([]byte, n)
				first, last := sectorSpanOf(off, int(n))
				from := h.readStart(first, last)
				if err := v.ReadAt(ctx, buf, off); err != nil {
					bad.set("read of %d bytes at %d: %v", n, off, err)
					return
				}
				if v != volume(o) {
					if !bytes.Equal(buf, ms.other.model[off:off+n]) {
						bad.set("other snapshot read of %d bytes at %d during the merge: %s", n, off, firstDiff(buf, ms.other.model[off:off+n]))
					}
					continue
				}
				if msg, ok := h.checkRead(buf, off, from); !ok {
					bad.set("origin read of %d bytes at %d during the merge: %s", n, off, msg)
				}
			}
		})
	}
	writersDone.Wait()
	readersStop.Store(true)
	wg.Wait()
	if msg := bad.get(); msg != "" {
		return msg
	}
	require.NoError(t, mergeErr)
	t.Logf("%d exceptions merged in %d rounds with %d writes", total, rounds, writes)
	if _, _, ok := o.Merging(); ok {
		return "the origin is still in merge mode after the merge"
	}
	if msg, ok := h.check(readAll(t, o)); !ok {
		return "origin after the merge: " + msg
	}
	if got := readAll(t, ms.other.snap); !bytes.Equal(got, ms.other.model) {
		return "other snapshot after the merge: " + firstDiff(got, ms.other.model)
	}
	return ""
}

// TestLiveMerge merges while the origin is written and read, and another
// snapshot read (see runLiveMerge), with 1-, 8- and 16-sector chunks.
func TestLiveMerge(t *testing.T) {
	seeds := uint64(12)
	if testing.Short() {
		seeds = 3
	}
	for seed := range seeds {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			if msg := runLiveMerge(t, seed, mergeBreaks{}); msg != "" {
				t.Fatal(msg)
			}
		})
	}
}

// TestLiveMergeCheckerCatchesMutants proves runLiveMerge's checks: each
// broken merge must be caught within a bounded number of seeds.
func TestLiveMergeCheckerCatchesMutants(t *testing.T) {
	for _, tc := range []struct {
		name   string
		breaks mergeBreaks
	}{
		// A write to a chunk in the run being merged lands in the COW
		// after the run read it, and is lost with the run's records.
		{"run-unlocked", mergeBreaks{runUnlocked: true}},
		// Writes to chunks the snapshot holds go to the origin, where
		// the merge overwrites them.
		{"no-redirect", mergeBreaks{noRedirect: true}},
		// Reads show the origin device, not the snapshot's view.
		{"plain-reads", mergeBreaks{plainReads: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for seed := range uint64(60) {
				var msg string
				t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
					msg = runLiveMerge(t, seed, tc.breaks)
				})
				if msg != "" {
					t.Logf("caught at seed %d: %s", seed, msg)
					return
				}
			}
			t.Fatal("the checker missed the mutant")
		})
	}
}

// TestLiveMergeTrimAndZeroes checks the other origin changes in merge mode:
// a trim skips the chunks the merging snapshot still holds and discards
// the others (after the other snapshot's copies), and zeroes reach both.
func TestLiveMergeTrimAndZeroes(t *testing.T) {
	ctx := context.Background()
	ms := newMergeScenario(t, 5, 8, 40, 0.5)
	o, s := ms.origin, ms.target.snap
	const chunk = 8 * exstore.SectorSize
	require.NoError(t, o.StartMerge(ctx, s))
	want := bytes.Clone(ms.target.model)
	requireSame(t, want, readAll(t, o), "origin in merge mode")

	var held, free []int64
	for c := int64(0); c < 40; c++ {
		if _, found, err := s.lookup(ctx, exstore.Chunk(c)); assert.NoError(t, err) && found {
			held = append(held, c)
		} else {
			free = append(free, c)
		}
	}
	require.NotEmpty(t, held)
	require.NotEmpty(t, free)
	otherBefore := ms.other.store.Usage().Exceptions

	// Trim everything: only the free chunks read as zeroes now.
	require.NoError(t, o.Trim(ctx, 0, 40*chunk, true))
	for _, c := range free {
		clear(want[c*chunk : (c+1)*chunk])
	}
	requireSame(t, want[:40*chunk], readAll(t, o)[:40*chunk], "origin after a trim")
	requireSame(t, ms.other.model, readAll(t, ms.other.snap), "other snapshot after a trim")
	assert.Greater(t, ms.other.store.Usage().Exceptions, otherBefore, "the other snapshot copied what the trim discarded")

	// Zeroes over a held and a free chunk, unaligned to chunks.
	h, f := held[0], free[len(free)-1]
	for _, c := range []int64{h, f} {
		off := c*chunk + 512
		require.NoError(t, o.WriteZeroes(ctx, off, 1024, false, true))
		clear(want[off : off+1024])
	}
	require.NoError(t, o.WriteAt(ctx, bytes.Repeat([]byte{9}, 512), h*chunk, true))
	copy(want[h*chunk:], bytes.Repeat([]byte{9}, 512))
	requireSame(t, want[:40*chunk], readAll(t, o)[:40*chunk], "origin after zeroes")

	require.NoError(t, o.Merge(ctx, s, nil))
	requireSame(t, want[:40*chunk], readAll(t, o)[:40*chunk], "origin after the merge")
	requireSame(t, ms.other.model, readAll(t, ms.other.snap), "other snapshot after the merge")
}

// TestMergeModeRules checks what merge mode refuses: the merging snapshot's
// own use, another merge, adding or removing a snapshot; and that the
// marker records the start and the end, and only once each.
func TestMergeModeRules(t *testing.T) {
	ctx := context.Background()
	ms := newMergeScenario(t, 6, 8, 40, 0.5)
	o, s := ms.origin, ms.target.snap
	var marks []exstore.MergeState
	s.SetMergeMarker(func(_ context.Context, st exstore.MergeState) error {
		marks = append(marks, st)
		return nil
	})
	require.NoError(t, o.StartMerge(ctx, s))
	require.NoError(t, o.StartMerge(ctx, s), "again: nothing to do")
	assert.Equal(t, []exstore.MergeState{exstore.Merging}, marks)

	buf := make([]byte, 4096)
	assert.ErrorIs(t, s.ReadAt(ctx, buf, 0), ErrMerging)
	assert.ErrorIs(t, s.WriteAt(ctx, buf, 0, false), ErrMerging)
	assert.ErrorIs(t, s.Err(), ErrMerging)
	assert.ErrorIs(t, o.StartMerge(ctx, ms.other.snap), ErrMergeInProgress)
	assert.ErrorIs(t, o.Merge(ctx, ms.other.snap, nil), ErrMergeInProgress)
	assert.ErrorIs(t, o.RemoveSnapshot(s), ErrMergeInProgress)
	_, err := o.AddSnapshot("late", ms.other.store, ms.other.cow, SnapshotOptions{})
	assert.ErrorIs(t, err, ErrMergeInProgress)
	got, p, ok := o.Merging()
	require.True(t, ok)
	assert.Equal(t, s, got)
	assert.Equal(t, MergeProgress{Total: s.store.Usage().Exceptions}, p)

	require.NoError(t, o.Merge(ctx, s, nil))
	assert.Equal(t, []exstore.MergeState{exstore.Merging, exstore.Merged}, marks)
	checkMerged(t, o, s, ms.target.model, ms.other.snap, ms.other.model)
	_, _, ok = o.Merging()
	assert.False(t, ok)

	// A marker that fails leaves the origin as it was.
	ms = newMergeScenario(t, 7, 8, 40, 0.5)
	ms.target.snap.SetMergeMarker(func(context.Context, exstore.MergeState) error { return errGateShut })
	require.ErrorIs(t, ms.origin.Merge(ctx, ms.target.snap, nil), errGateShut)
	_, _, ok = ms.origin.Merging()
	assert.False(t, ok)
	requireSame(t, ms.originModel, readAll(t, ms.origin), "origin after a refused mark")
	requireSame(t, ms.target.model, readAll(t, ms.target.snap), "target after a refused mark")
}
