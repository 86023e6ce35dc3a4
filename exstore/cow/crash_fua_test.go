package cow

import (
	"bytes"
	"context"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// TestCrashSnapshotFUAIntoLazyException writes to a snapshot chunk without
// FUA, which commits its exception lazily, then with FUA to another sector
// of the same chunk, and cuts the power with every unsynced write lost:
// the FUA write returned, so it must survive, and with it the exception
// that makes the snapshot read it from the COW.
func TestCrashSnapshotFUAIntoLazyException(t *testing.T) {
	const chunkSectors = 8
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(16, 3))
	originDev := newOriginDev(rng, 16*chunkSectors*exstore.SectorSize)
	o := NewOrigin(originDev)
	ts := addSnapshot(t, o, "s", chunkSectors, 1<<20, SnapshotOptions{}, originDev.Bytes())
	require.NoError(t, ts.snap.Flush(ctx))

	require.NoError(t, ts.snap.WriteAt(ctx, randomBytes(rng, exstore.SectorSize), 2*exstore.SectorSize, false))
	fua := randomBytes(rng, exstore.SectorSize)
	require.NoError(t, ts.snap.WriteAt(ctx, fua, 5*exstore.SectorSize, true))

	// A cut that loses every unsynced write, taken before the store's
	// Close, which would write the lazy exceptions.
	cow := faultdev.FromBytes(ts.cow.Name(), ts.cow.DurableBytes())
	origin := faultdev.FromBytes(originDev.Name(), originDev.DurableBytes())
	_ = ts.store.Close()
	store, err := persistent.Open(ctx, cow, persistent.Options{Logger: testLogger(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = store.Close() })
	snap, err := NewOrigin(origin).AddSnapshot("s", store, cow, SnapshotOptions{})
	require.NoError(t, err)
	got := make([]byte, exstore.SectorSize)
	require.NoError(t, snap.ReadAt(ctx, got, 5*exstore.SectorSize))
	if !bytes.Equal(got, fua) {
		t.Fatalf("the FUA write is lost: %s", firstDiff(got, fua))
	}
}
