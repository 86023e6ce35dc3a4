package cow

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// directDev is a faultdev that needs O_DIRECT-style alignment: it refuses
// any I/O whose offset, length or buffer address is not a multiple of align.
type directDev struct {
	*faultdev.Device
	align int
}

func (d *directDev) Alignment() int { return d.align }

func (d *directDev) check(p []byte, off int64) error {
	a := d.align
	if off%int64(a) != 0 || len(p)%a != 0 || uintptr(unsafe.Pointer(unsafe.SliceData(p)))%uintptr(a) != 0 {
		return fmt.Errorf("direct device %s: unaligned I/O of %d bytes at %d", d.Name(), len(p), off)
	}
	return nil
}

func (d *directDev) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(p, off); err != nil {
		return 0, err
	}
	return d.Device.ReadAt(p, off)
}

func (d *directDev) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(p, off); err != nil {
		return 0, err
	}
	return d.Device.WriteAt(p, off)
}

func (d *directDev) WriteAtSync(p []byte, off int64) (int, error) {
	if err := d.check(p, off); err != nil {
		return 0, err
	}
	return d.Device.WriteAtSync(p, off)
}

// TestAlignedDevices runs model-checked I/O over devices that need 4 KiB
// aligned I/O: byte-range reads, aligned writes from unaligned buffers, and
// an origin whose last chunk is partial. Unaligned writes are refused.
func TestAlignedDevices(t *testing.T) {
	const align = 4096
	const chunkSectors = 16 // 8 KiB
	const size = 9 * align  // the last 8 KiB chunk is half there
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(9, 9))
	origin := &directDev{Device: newOriginDev(rng, size), align: align}
	originModel := origin.Bytes()
	o := NewOrigin(origin)
	cow := &directDev{Device: faultdev.New("cow", 16*chunkSectors*512), align: align}
	store, err := persistent.Open(ctx, cow, persistent.Options{ChunkSectors: chunkSectors})
	require.NoError(t, err)
	defer store.Close()
	snap, err := o.AddSnapshot("s", store, cow, SnapshotOptions{})
	require.NoError(t, err)
	snapModel := append([]byte(nil), originModel...)

	smallStore, err := persistent.Open(ctx, faultdev.New("cow1", 64<<10), persistent.Options{ChunkSectors: 1})
	require.NoError(t, err)
	defer smallStore.Close()
	_, err = o.AddSnapshot("tiny", smallStore, &directDev{Device: faultdev.New("cow1", 64<<10), align: align}, SnapshotOptions{})
	assert.Error(t, err, "a 512-byte chunk on a 4 KiB device")

	for i := range 300 {
		var v volume = o
		model := originModel
		if rng.IntN(2) == 0 {
			v, model = snap, snapModel
		}
		if rng.IntN(2) == 0 {
			n := 1 + rng.IntN(3*align)
			off := rng.Int64N(size - int64(n) + 1)
			got := make([]byte, n)
			require.NoError(t, v.ReadAt(ctx, got, off), "op %d", i)
			requireSame(t, model[off:off+int64(n)], got, fmt.Sprintf("op %d: read %d at %d", i, n, off))
			continue
		}
		blocks := 1 + rng.IntN(3)
		off := align * rng.Int64N(size/align-int64(blocks)+1)
		buf := randomBytes(rng, blocks*align+1)[1:] // never 4 KiB aligned in memory
		require.NoError(t, v.WriteAt(ctx, buf, off, rng.IntN(4) == 0), "op %d", i)
		copy(model[off:], buf)
	}
	require.NoError(t, snap.Err())
	requireSame(t, originModel, readAll(t, o), "origin")
	requireSame(t, snapModel, readAll(t, snap), "snapshot")

	// Unaligned writes are refused before any copy is made for them: a new
	// snapshot, which has no exception yet, gets none.
	freshCOW := &directDev{Device: faultdev.New("cow-fresh", 16*chunkSectors*512), align: align}
	freshStore, err := persistent.Open(ctx, freshCOW, persistent.Options{ChunkSectors: chunkSectors})
	require.NoError(t, err)
	defer freshStore.Close()
	fresh, err := o.AddSnapshot("fresh", freshStore, freshCOW, SnapshotOptions{})
	require.NoError(t, err)
	assert.ErrorIs(t, fresh.WriteAt(ctx, make([]byte, align), 512, false), ErrUnaligned)
	assert.Zero(t, freshStore.Usage().Exceptions)
	assert.ErrorIs(t, o.WriteAt(ctx, make([]byte, 512), 0, false), ErrUnaligned)
	assert.Zero(t, freshStore.Usage().Exceptions)
	require.NoError(t, snap.Err())
	require.NoError(t, fresh.Err())
	requireSame(t, originModel, readAll(t, o), "origin after refused writes")
	requireSame(t, snapModel, readAll(t, snap), "snapshot after refused writes")
}
