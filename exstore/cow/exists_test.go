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

// raceSetup is smallSetup with the snapshot's store wrapped in an
// otherNodeStore racing on chunk race.
func raceSetup(t *testing.T, race exstore.Chunk) (*Origin, []byte, *Snapshot, *otherNodeStore) {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(race), 11))
	dev := newOriginDev(rng, 16*smallChunk)
	o := NewOrigin(dev)
	model := dev.Bytes()
	cow := faultdev.New("cow", smallCOWChunks*smallChunk)
	store, err := persistent.Open(context.Background(), cow, persistent.Options{ChunkSectors: smallChunkSectors, Logger: testLogger(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = store.Close() })
	racing := &otherNodeStore{Store: store, origin: dev, cow: cow, race: race}
	snap, err := o.AddSnapshot("s", racing, cow, SnapshotOptions{})
	require.NoError(t, err)
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
