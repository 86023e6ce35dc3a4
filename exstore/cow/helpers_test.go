package cow

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// volume is what the tests do with an Origin, a Snapshot or a raw
// baseline device: the I/O an NBD server passes on.
type volume interface {
	Size() int64
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	Flush(ctx context.Context) error
}

var (
	_ volume = (*Origin)(nil)
	_ volume = (*Snapshot)(nil)
)

// randomBytes returns n bytes from rng.
func randomBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// newOriginDev returns an origin device of size bytes filled from rng.
func newOriginDev(rng *rand.Rand, size int) *faultdev.Device {
	return faultdev.FromBytes("origin", randomBytes(rng, size))
}

// testSnap is a snapshot with its devices and its reference model.
type testSnap struct {
	cow   *faultdev.Device
	store *persistent.Store
	snap  *Snapshot
	model []byte // what the snapshot must read
}

// addSnapshot adds a snapshot with a new persistent store of chunkSectors
// on a fresh COW device of cowBytes; its model is a copy of originModel.
func addSnapshot(t *testing.T, o *Origin, name string, chunkSectors uint32, cowBytes int64, opts SnapshotOptions, originModel []byte) *testSnap {
	t.Helper()
	cow := faultdev.New("cow-"+name, cowBytes)
	store, err := persistent.Open(context.Background(), cow, persistent.Options{ChunkSectors: chunkSectors, Logger: testLogger(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = store.Close() })
	snap, err := o.AddSnapshot(name, store, cow, opts)
	require.NoError(t, err)
	return &testSnap{cow: cow, store: store, snap: snap, model: bytes.Clone(originModel)}
}

// testLogger sends a store's log to the test's output, shown only when the
// test fails or runs verbosely.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), nil))
}

// readAll reads the whole volume.
func readAll(t *testing.T, v volume) []byte {
	t.Helper()
	b := make([]byte, v.Size())
	require.NoError(t, v.ReadAt(context.Background(), b, 0))
	return b
}

// firstDiff describes where got and want first differ, for failure messages
// that do not dump megabytes.
func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("length %d, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d (sector %d): %#x, want %#x", i, i/512, got[i], want[i])
		}
	}
	return "equal"
}

// requireSame fails with the first difference unless got equals want.
func requireSame(t *testing.T, want, got []byte, what string) {
	t.Helper()
	if !bytes.Equal(got, want) {
		require.Failf(t, what+" differs from the model", "%s", firstDiff(got, want))
	}
}
