package cow

import (
	"bytes"
	"context"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// otherNodeStore plays a store shared with another node that copies chunk
// race into the COW between this node's lookup and its Prepare: the first
// Prepare of race commits the other node's exception (with the origin's
// data, as its copy would) and answers exstore.ErrExists.
type otherNodeStore struct {
	exstore.Store
	origin, cow blockdev.Device
	race        exstore.Chunk
	raced       atomic.Bool
}

func (s *otherNodeStore) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	if old != s.race || !s.raced.CompareAndSwap(false, true) {
		return s.Store.Prepare(ctx, old)
	}
	e, err := s.Store.Prepare(ctx, old)
	if err != nil {
		return e, err
	}
	buf := make([]byte, smallChunk)
	if _, err := s.origin.ReadAt(buf, int64(old)*smallChunk); err != nil {
		return e, err
	}
	if _, err := s.cow.WriteAt(buf, int64(e.New)*smallChunk); err != nil {
		return e, err
	}
	if err := s.Store.Commit(ctx, e); err != nil {
		return e, err
	}
	return exstore.Exception{}, exstore.ErrExists
}

// wrappedSetup is smallSetup (with a random origin from seed) with the
// snapshot's persistent store wrapped by wrap, which gets the origin
// device, the COW device and the store.
func wrappedSetup(t *testing.T, seed uint64, wrap func(origin, cow *faultdev.Device, s exstore.Store) exstore.Store) (*Origin, *faultdev.Device, []byte, *Snapshot) {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 11))
	dev := newOriginDev(rng, 16*smallChunk)
	o := NewOrigin(dev)
	model := dev.Bytes()
	cow := faultdev.New("cow", smallCOWChunks*smallChunk)
	store, err := persistent.Open(context.Background(), cow, persistent.Options{ChunkSectors: smallChunkSectors, Logger: testLogger(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = store.Close() })
	snap, err := o.AddSnapshot("s", wrap(dev, cow, store), cow, SnapshotOptions{})
	require.NoError(t, err)
	return o, dev, model, snap
}

// raceSetup is smallSetup with the snapshot's store wrapped in an
// otherNodeStore racing on chunk race.
func raceSetup(t *testing.T, race exstore.Chunk) (*Origin, []byte, *Snapshot, *otherNodeStore) {
	t.Helper()
	var racing *otherNodeStore
	o, _, model, snap := wrappedSetup(t, uint64(race), func(origin, cow *faultdev.Device, s exstore.Store) exstore.Store {
		racing = &otherNodeStore{Store: s, origin: origin, cow: cow, race: race}
		return racing
	})
	return o, model, snap, racing
}

// An origin write whose copy another node made meanwhile goes ahead
// without a second exception, and the snapshot keeps the old data.
func TestOriginWriteAfterOtherNodeCopied(t *testing.T) {
	o, model, snap, racing := raceSetup(t, 3)
	writeOrigin(t, o, bytes.Clone(model), 3, 0xee)
	require.True(t, racing.raced.Load(), "the racing Prepare was not reached")
	assert.EqualValues(t, 1, racing.Usage().Exceptions, "exceptions after the origin write")
	requireSame(t, model, readAll(t, snap), "snapshot")
}

// A partial snapshot write whose chunk another node copied meanwhile lands
// in that node's exception.
func TestSnapshotWriteAfterOtherNodeCopied(t *testing.T) {
	_, model, snap, racing := raceSetup(t, 5)
	data := bytes.Repeat([]byte{0x5a}, 512)
	require.NoError(t, snap.WriteAt(context.Background(), data, 5*smallChunk+1024, false))
	require.True(t, racing.raced.Load(), "the racing Prepare was not reached")
	copy(model[5*smallChunk+1024:], data)
	assert.EqualValues(t, 1, racing.Usage().Exceptions, "exceptions after the snapshot write")
	requireSame(t, model, readAll(t, snap), "snapshot")
}

// optimisticStore plays a store shared with other nodes that answers
// lookups without holding them (exstore.OptimisticLookuper): its token is
// a generation that moves when the test says the node's lock moved.
type optimisticStore struct {
	exstore.Store
	generation atomic.Uint64
}

func (s *optimisticStore) LookupOptimistic(old exstore.Chunk) (exstore.Chunk, bool, uint64, bool) {
	token := s.generation.Load()
	new, found, release, err := s.Store.Lookup(context.Background(), old)
	release()
	return new, found, token, err == nil
}

func (s *optimisticStore) LookupRangeOptimistic(first exstore.Chunk, into []exstore.LookupResult) (uint64, bool) {
	token := s.generation.Load()
	for i := range into {
		new, found, token2, ok := s.LookupOptimistic(first + exstore.Chunk(i))
		if !ok || token2 != token {
			return 0, false
		}
		into[i] = exstore.LookupResult{New: new, Found: found}
	}
	return token, true
}

func (s *optimisticStore) Unchanged(token uint64) bool { return s.generation.Load() == token }

// A read whose optimistic lookups the store stops vouching for during its
// I/O reads again, on every path: the one-chunk fast path, then the
// general path's one-chunk and window attempts. The first reads of the
// origin are disturbed; the read must try once more after each and still
// return the snapshot's data.
func TestReadRetriesWhenStoreStopsVouching(t *testing.T) {
	for _, tc := range []struct {
		name      string
		off, n    int64
		disturbed int32 // origin reads that see the lock move
	}{
		{"fast path", 2*smallChunk + 10, 100, 1},
		{"one chunk", 2*smallChunk + 10, 100, 2},
		{"window", 2 * smallChunk, 3 * smallChunk, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var opt *optimisticStore
			_, dev, model, snap := wrappedSetup(t, 9, func(_, _ *faultdev.Device, s exstore.Store) exstore.Store {
				opt = &optimisticStore{Store: s}
				return opt
			})

			var reads atomic.Int32
			dev.SetFault(func(op faultdev.Op, _, _ int64) error {
				if op == faultdev.Read && reads.Add(1) <= tc.disturbed {
					opt.generation.Add(1)
				}
				return nil
			})
			got := make([]byte, tc.n)
			require.NoError(t, snap.ReadAt(context.Background(), got, tc.off))
			dev.SetFault(nil)
			requireSame(t, model[tc.off:tc.off+tc.n], got, "snapshot read")
			assert.Equal(t, tc.disturbed+1, reads.Load(), "origin reads: one more than the disturbed ones")
		})
	}
}
