package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// mergeCrashRound is one round of the live merge crash test.
type mergeCrashRound struct {
	seed uint64
	// noMark leaves the merge unrecorded (no MergeMarker).
	noMark bool
	// breaks breaks the merge on purpose.
	breaks mergeBreaks
}

const (
	mergeCrashWorkers = 3
	// mergeCrashMaxOps bounds a worker's requests, in case the merge ends
	// long before the cut.
	mergeCrashMaxOps = 400
)

// mergeCrashRun is the merge and the workload of a round, up to the cut.
type mergeCrashRun struct {
	ms      *mergeScenario
	history *sectorHistory // the origin's, from the merge's start
	ops     atomic.Int64   // device operations since StartMerge began
	started bool           // StartMerge returned without error
}

// run starts the merge of the round's scenario (StartMerge), then merges
// while the workers write and flush the origin, each in its own region,
// logging every request, until every worker stopped: at the cut (an
// operation fails once cut reports true), once the merge ended or after
// mergeCrashMaxOps. The merge waits after each round for the workers to
// make a few requests.
func (r mergeCrashRound) run(t *testing.T, cut func(op int64) bool) *mergeCrashRun {
	t.Helper()
	ctx := context.Background()
	chunkSectors := []uint32{1, 8, 16}[r.seed%3]
	ms := newMergeScenario(t, r.seed, chunkSectors, 80, 0.8)
	o := ms.origin
	o.breaks = r.breaks
	if !r.noMark {
		ms.target.snap.SetMergeMarker(LabelMarker(ms.target.store, exstore.OriginIdentity{Size: o.Size()}))
	}
	run := &mergeCrashRun{ms: ms, history: newSectorHistory(ms.target.model)}
	fault := func(faultdev.Op, int64, int64) error {
		if cut(run.ops.Add(1)) {
			return errPowerOff
		}
		return nil
	}
	for _, d := range []*faultdev.Device{ms.originDev, ms.target.cow, ms.other.cow} {
		d.SetFault(fault)
	}
	if err := o.StartMerge(ctx, ms.target.snap); err != nil {
		require.ErrorIs(t, err, errPowerOff)
		return run
	}
	run.started = true

	var (
		paceMu   sync.Mutex
		paceCond = sync.NewCond(&paceMu)
		requests int
		working  = mergeCrashWorkers
	)
	var wg sync.WaitGroup
	var merged atomic.Bool
	wg.Go(func() {
		defer merged.Store(true)
		rounds := 0
		err := o.Merge(ctx, ms.target.snap, func(MergeProgress) {
			rounds++
			paceMu.Lock()
			defer paceMu.Unlock()
			for requests < rounds*mergeCrashWorkers && working > 0 {
				paceCond.Wait()
			}
		})
		if err != nil && !errors.Is(err, errPowerOff) {
			t.Errorf("merge: %v", err)
		}
	})
	size := o.Size()
	region := size / mergeCrashWorkers / exstore.SectorSize * exstore.SectorSize
	for w := range mergeCrashWorkers {
		lo, hi := int64(w)*region, int64(w+1)*region
		if w == mergeCrashWorkers-1 {
			hi = size
		}
		wg.Go(func() {
			defer func() {
				paceMu.Lock()
				working--
				paceMu.Unlock()
				paceCond.Broadcast()
			}()
			h := run.history
			rng := rand.New(rand.NewPCG(r.seed, uint64(w)+30))
			for i := 0; i < mergeCrashMaxOps && !merged.Load(); i++ {
				var err error
				if rng.IntN(6) == 0 {
					covered := h.flushStart()
					if err = o.Flush(ctx); err == nil {
						h.flushed(covered)
					}
				} else {
					off, n := crashPick(rng, lo, hi)
					p := randomBytes(rng, n)
					fua := rng.IntN(4) == 0
					idx := h.issue(p, off)
					if err = o.WriteAt(ctx, p, off, fua); err == nil {
						h.complete(off, idx, fua)
					}
				}
				if err != nil {
					if !errors.Is(err, errPowerOff) {
						t.Errorf("worker %d: %v", w, err)
					}
					return
				}
				paceMu.Lock()
				requests++
				paceMu.Unlock()
				paceCond.Broadcast()
			}
		})
	}
	wg.Wait()
	return run
}

// runMergeCrashRound runs round r and cuts the power at a random device
// operation (every unsynced sector then independently survives or not),
// reopens the origin and both stores from what survived, resumes merge
// mode if the target's label says it merges, checks the origin, resumes
// the merge and checks again. It returns the first violation, "" if none:
//   - the origin, reopened in the mode the label gives and after the
//     merge, reads in some sector neither the newest durably acknowledged
//     content (a FUA write that returned, or a write completed before a
//     flush that returned) nor a later write's; the first version is the
//     target's content at the merge's start;
//   - a merge whose mark did not survive had workload writes acknowledged
//     (the origin would then be served as it was before the merge), or the
//     origin then differs from its content before the merge;
//   - the other snapshot's view changed, or the merged target is left
//     with exceptions or without its Merged mark.
func runMergeCrashRound(t *testing.T, r mergeCrashRound) string {
	t.Helper()
	ctx := context.Background()
	// A run without a cut counts the operations, so that the cut lands
	// anywhere in a merge of this seed.
	dry := r.run(t, func(int64) bool { return false })
	require.True(t, dry.started)
	rng := rand.New(rand.NewPCG(r.seed, 1700))
	threshold := 1 + rng.Int64N(dry.ops.Load()+dry.ops.Load()/10)
	if r.seed%8 == 0 {
		// Some rounds cut in StartMerge, around the mark's write.
		threshold = 1 + rng.Int64N(4)
	}

	var powerOff atomic.Bool
	run := r.run(t, func(op int64) bool {
		if op >= threshold {
			powerOff.Store(true)
		}
		return powerOff.Load()
	})
	powerOff.Store(true) // a round whose merge ended first is cut at the end
	ms := run.ms
	require.NoError(t, ms.target.store.Close())
	require.NoError(t, ms.other.store.Close())

	cutRng := rand.New(rand.NewPCG(r.seed, 1701))
	o := NewOrigin(ms.originDev.PowerCut(cutRng))
	reopen := func(cow *faultdev.Device) (*persistent.Store, *faultdev.Device) {
		dev := cow.PowerCut(cutRng)
		store, err := persistent.Open(ctx, dev, persistent.Options{Logger: testLogger(t)})
		require.NoError(t, err)
		t.Cleanup(func() { _ = store.Close() })
		require.NoError(t, store.Err())
		return store, dev
	}
	targetStore, targetCOW := reopen(ms.target.cow)
	otherStore, otherCOW := reopen(ms.other.cow)
	label, _, err := targetStore.Label(ctx)
	require.NoError(t, err)
	where := fmt.Sprintf("cut at operation %d of about %d, label %q", threshold, dry.ops.Load(), label.Merge)

	var target *Snapshot
	if label.Merge != exstore.Merged {
		target, err = o.AddSnapshot("target", targetStore, targetCOW, SnapshotOptions{})
		require.NoError(t, err)
		if !r.noMark {
			target.SetMergeMarker(LabelMarker(targetStore, exstore.OriginIdentity{Size: o.Size()}))
		}
	} else if n := targetStore.Usage().Exceptions; n != 0 {
		return fmt.Sprintf("%s: the target is marked merged with %d exceptions left", where, n)
	}
	other, err := o.AddSnapshot("other", otherStore, otherCOW, SnapshotOptions{})
	require.NoError(t, err)

	switch label.Merge {
	case exstore.Merging:
		require.NoError(t, o.StartMerge(ctx, target))
	case exstore.NotMerging:
		// The merge never began: the origin is as it was before it.
		if n := run.history.durableWrites(); n > 0 {
			return fmt.Sprintf("%s: the merge is not recorded, but %d sectors of it were written durably", where, n)
		}
		if got := readAll(t, o); !bytes.Equal(got, ms.originModel) {
			return fmt.Sprintf("%s: origin of a merge that never began: %s", where, firstDiff(got, ms.originModel))
		}
	}
	if label.Merge != exstore.NotMerging {
		if msg, ok := run.history.check(readAll(t, o)); !ok {
			return fmt.Sprintf("%s: origin reopened: %s", where, msg)
		}
	}
	if got := readAll(t, other); !bytes.Equal(got, ms.other.model) {
		return fmt.Sprintf("%s: other snapshot reopened: %s", where, firstDiff(got, ms.other.model))
	}
	if target != nil {
		require.NoError(t, o.Merge(ctx, target, nil))
		if msg, ok := run.history.check(readAll(t, o)); !ok {
			return fmt.Sprintf("%s: origin after the resumed merge: %s", where, msg)
		}
		if n := targetStore.Usage().Exceptions; n != 0 {
			return fmt.Sprintf("%s: %d exceptions left after the merge", where, n)
		}
	}
	if got := readAll(t, other); !bytes.Equal(got, ms.other.model) {
		return fmt.Sprintf("%s: other snapshot after the merge: %s", where, firstDiff(got, ms.other.model))
	}
	if !r.noMark {
		l, _, err := persistent.ReadLabel(ctx, targetCOW)
		require.NoError(t, err)
		if l.Merge != exstore.Merged {
			return fmt.Sprintf("%s: label %q after the merge", where, l.Merge)
		}
	}
	t.Logf("%s; %d sectors held an acknowledged-durable write", where, run.history.durableWrites())
	return ""
}

// TestMergeCrashAtAnyOperation cuts the power at a random operation on any
// device during a live merge with concurrent origin writes (some with
// FUA) and flushes, and checks the origin after the reopen and after the
// resumed merge (see runMergeCrashRound).
func TestMergeCrashAtAnyOperation(t *testing.T) {
	rounds := uint64(30)
	if testing.Short() {
		rounds = 8
	}
	for seed := range rounds {
		t.Run(fmt.Sprintf("seed%d", seed), func(t *testing.T) {
			if msg := runMergeCrashRound(t, mergeCrashRound{seed: seed}); msg != "" {
				t.Fatal(msg)
			}
		})
	}
}

// TestMergeCrashCheckerCatchesMutants proves the live merge crash checker:
// each broken merge breaks durability, and must be caught within a bounded
// number of seeds.
func TestMergeCrashCheckerCatchesMutants(t *testing.T) {
	for _, tc := range []struct {
		name  string
		round func(seed uint64) mergeCrashRound
	}{
		// The merge is not recorded: a reopen serves the origin plain.
		{"no-mark", func(seed uint64) mergeCrashRound { return mergeCrashRound{seed: seed, noMark: true} }},
		// Flush does not cover the merging snapshot's COW.
		{"no-cow-flush", func(seed uint64) mergeCrashRound {
			return mergeCrashRound{seed: seed, breaks: mergeBreaks{noCOWFlush: true}}
		}},
		// A run's records are cleared before its origin writes are
		// durable.
		{"no-run-flush", func(seed uint64) mergeCrashRound {
			return mergeCrashRound{seed: seed, breaks: mergeBreaks{noRunFlush: true}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			huntMutant(t, func(t *testing.T, seed uint64) string { return runMergeCrashRound(t, tc.round(seed)) })
		})
	}
}
