package cow

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/transient"
	"github.com/clustersnap/clustersnap/persistent"
)

var errPowerOff = errors.New("power is off")

// TestCrashDuringOriginWrites cuts the power, at once for the origin and
// every COW device, in the middle of concurrent origin writes that are
// never flushed. Every pending sector then independently survives or not.
// The snapshots, reloaded from what survived, must still read exactly as
// the origin did when they were taken: an origin chunk is only overwritten
// after the snapshot's copy of it and the record pointing at it are durable.
func TestCrashDuringOriginWrites(t *testing.T) {
	const size = 1<<20 + 512
	for round := range 4 {
		t.Run(fmt.Sprintf("round%d", round), func(t *testing.T) {
			ctx := context.Background()
			rng := rand.New(rand.NewPCG(77, uint64(round)))
			originDev := newOriginDev(rng, size)
			originModel := originDev.Bytes()
			o := NewOrigin(originDev)
			var snaps []*testSnap
			for i, cs := range []uint32{1, 16, 8} {
				snaps = append(snaps, addSnapshot(t, o, fmt.Sprintf("s%d", i), cs, size*5/4+64<<10, SnapshotOptions{}, originModel))
			}

			// The power goes off after a random number of origin writes;
			// every later operation on any device fails.
			var powerOff atomic.Bool
			var originWrites atomic.Int64
			threshold := 20 + rng.Int64N(200)
			off := func(faultdev.Op, int64, int64) error {
				if powerOff.Load() {
					return errPowerOff
				}
				return nil
			}
			originDev.SetFault(func(op faultdev.Op, o, n int64) error {
				if op == faultdev.Write && originWrites.Add(1) == threshold {
					powerOff.Store(true)
				}
				return off(op, o, n)
			})
			for _, s := range snaps {
				s.cow.SetFault(off)
			}

			var wg sync.WaitGroup
			for w := range 4 {
				wg.Go(func() {
					rng := rand.New(rand.NewPCG(uint64(round), uint64(w)))
					for {
						at, n := pickRange(rng, 0, size)
						if err := o.WriteAt(ctx, randomBytes(rng, n), at, false); err != nil {
							assert.ErrorIs(t, err, errPowerOff)
							return
						}
					}
				})
			}
			wg.Wait()
			require.True(t, powerOff.Load())

			cutRng := rand.New(rand.NewPCG(99, uint64(round)))
			for _, s := range snaps {
				require.NoError(t, s.store.Close())
			}
			reloaded := NewOrigin(originDev.PowerCut(cutRng))
			for _, s := range snaps {
				cow := s.cow.PowerCut(cutRng)
				store, err := persistent.Open(ctx, cow, persistent.Options{Logger: testLogger(t)})
				require.NoError(t, err)
				t.Cleanup(func() { _ = store.Close() })
				require.NoError(t, store.Err(), "the invalidation after the cut could not be written")
				snap, err := reloaded.AddSnapshot(s.snap.Name(), store, cow, SnapshotOptions{})
				require.NoError(t, err)
				requireSame(t, s.model, readAll(t, snap), "snapshot "+s.snap.Name()+" after the power cut")
			}
		})
	}
}

// TestStressTransientStore runs the region workload over transient stores
// (the kernel's "N"): the engine needs nothing of a store beyond the
// exstore.Store contract.
func TestStressTransientStore(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 4))
	originDev := newOriginDev(rng, stressOriginSize)
	originModel := originDev.Bytes()
	o := NewOrigin(originDev)
	var snaps []*testSnap
	for i, cs := range []uint32{16, 1} {
		cow := faultdev.New(fmt.Sprintf("tcow%d", i), stressOriginSize*5/4)
		store, err := transient.New(cow, cs)
		require.NoError(t, err)
		t.Cleanup(func() { _ = store.Close() })
		snap, err := o.AddSnapshot(cow.Name(), store, cow, SnapshotOptions{})
		require.NoError(t, err)
		snaps = append(snaps, &testSnap{cow: cow, snap: snap, model: append([]byte(nil), originModel...)})
		runRegions(t, o, snaps, originModel, uint64(10+i))
		checkModel(t, o, snaps, originModel)
	}
}
