package cow

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

const (
	smallChunkSectors = 8
	smallChunk        = smallChunkSectors * 512
	// smallCOWChunks is a COW of header, area 0 and four data chunks.
	smallCOWChunks   = 6
	smallCOWCapacity = smallCOWChunks - 2
)

// smallSetup is an origin of 16 chunks of 4 KiB with one snapshot whose COW
// holds smallCOWCapacity exceptions.
func smallSetup(t *testing.T, opts SnapshotOptions) (*Origin, *faultdev.Device, []byte, *testSnap) {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(len(t.Name())), 7))
	dev := newOriginDev(rng, 16*smallChunk)
	o := NewOrigin(dev)
	model := dev.Bytes()
	s := addSnapshot(t, o, "s", smallChunkSectors, smallCOWChunks*smallChunk, opts, model)
	return o, dev, model, s
}

// writeOrigin writes fill bytes to the start of origin chunk c and to the
// model.
func writeOrigin(t *testing.T, o *Origin, model []byte, c int64, fill byte) {
	t.Helper()
	data := bytes.Repeat([]byte{fill}, 100)
	require.NoError(t, o.WriteAt(context.Background(), data, c*smallChunk+17, false))
	copy(model[c*smallChunk+17:], data)
}

func TestFullCOWInvalidatesOnOriginWrite(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	for c := range int64(smallCOWCapacity) {
		writeOrigin(t, o, model, c, 0xa0+byte(c))
		require.NoError(t, s.snap.Err(), "chunk %d fits", c)
	}
	requireSame(t, s.model, readAll(t, s.snap), "snapshot before it fills")

	// One more chunk does not fit: the snapshot is invalidated, the origin
	// write goes ahead.
	writeOrigin(t, o, model, smallCOWCapacity, 0xee)
	err := s.snap.Err()
	require.Error(t, err)
	assert.ErrorIs(t, err, exstore.ErrInvalid)
	assert.ErrorIs(t, err, ErrCOWFull)
	assert.Contains(t, err.Error(), "filled up")
	assert.ErrorIs(t, s.store.Err(), exstore.ErrInvalid)

	buf := make([]byte, 512)
	err = s.snap.ReadAt(ctx, buf, 0)
	assert.ErrorIs(t, err, exstore.ErrInvalid)
	assert.Contains(t, err.Error(), "filled up")
	assert.ErrorIs(t, s.snap.WriteAt(ctx, buf, 0, false), exstore.ErrInvalid)

	// Later origin writes skip the invalid snapshot and work.
	writeOrigin(t, o, model, 9, 0x99)
	writeOrigin(t, o, model, 0, 0x11)
	requireSame(t, model, readAll(t, o), "origin")
	requireSame(t, model, dev.Bytes(), "origin device")

	// The invalid flag is durable.
	require.NoError(t, s.store.Close())
	reopened, err := persistent.Open(ctx, s.cow.PowerCutDropAll(), persistent.Options{})
	require.NoError(t, err)
	defer reopened.Close()
	assert.ErrorIs(t, reopened.Err(), exstore.ErrInvalid)
}

func TestFullCOWInvalidatesOnSnapshotWrite(t *testing.T) {
	ctx := context.Background()
	o, _, model, s := smallSetup(t, SnapshotOptions{})
	for c := range int64(smallCOWCapacity) {
		require.NoError(t, s.snap.WriteAt(ctx, []byte{1, 2, 3}, c*smallChunk+5, false))
	}
	err := s.snap.WriteAt(ctx, []byte{4}, smallCOWCapacity*smallChunk, false)
	require.Error(t, err)
	assert.ErrorIs(t, err, exstore.ErrInvalid)
	assert.ErrorIs(t, err, ErrCOWFull)
	assert.NotErrorIs(t, err, ErrOverflow)
	assert.ErrorIs(t, s.snap.Err(), exstore.ErrInvalid)
	assert.ErrorIs(t, s.snap.ReadAt(ctx, make([]byte, 10), 0), exstore.ErrInvalid)
	writeOrigin(t, o, model, 12, 0x12)
	requireSame(t, model, readAll(t, o), "origin")
}

func TestOverflow(t *testing.T) {
	ctx := context.Background()
	o, _, model, s := smallSetup(t, SnapshotOptions{Overflow: true})
	rng := rand.New(rand.NewPCG(3, 3))
	// Fill the COW with snapshot writes: whole chunks and partial ones.
	for c := range int64(smallCOWCapacity) {
		off, n := c*smallChunk, smallChunk
		if c%2 == 1 {
			off, n = c*smallChunk+300, 1000
		}
		data := randomBytes(rng, n)
		require.NoError(t, s.snap.WriteAt(ctx, data, off, false))
		copy(s.model[off:], data)
	}
	require.NoError(t, s.snap.Err())

	err := s.snap.WriteAt(ctx, []byte{9}, smallCOWCapacity*smallChunk, false)
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrOverflow)
	assert.Contains(t, err.Error(), "COW device is full")
	assert.NotErrorIs(t, err, exstore.ErrInvalid)
	assert.ErrorIs(t, s.snap.Err(), ErrOverflow)
	assert.NoError(t, s.store.Err(), "overflow leaves the store valid")

	// Further writes fail, also to chunks that have an exception; reads work.
	assert.ErrorIs(t, s.snap.WriteAt(ctx, []byte{9}, 0, false), ErrOverflow)
	requireSame(t, s.model, readAll(t, s.snap), "overflowed snapshot")

	// An origin write that needs a copy still invalidates, as in the kernel.
	writeOrigin(t, o, model, 10, 0x10)
	assert.ErrorIs(t, s.snap.Err(), exstore.ErrInvalid)
	assert.ErrorIs(t, s.snap.Err(), ErrCOWFull)
	requireSame(t, model, readAll(t, o), "origin")
}

// TestFailingCOWDevice makes the COW device fail in each step of a copy:
// the data write, the flush before the metadata, the metadata write. The
// snapshot is invalidated each time, and the origin write succeeds with
// the right data.
func TestFailingCOWDevice(t *testing.T) {
	errBroken := errors.New("broken COW")
	cases := []struct {
		name  string
		fault faultdev.FaultFunc
	}{
		{"data write", func(op faultdev.Op, off, _ int64) error {
			if op == faultdev.Write && off >= 2*smallChunk {
				return errBroken
			}
			return nil
		}},
		{"flush", func(op faultdev.Op, _, _ int64) error {
			if op == faultdev.Sync {
				return errBroken
			}
			return nil
		}},
		{"metadata write", func(op faultdev.Op, off, _ int64) error {
			if op == faultdev.Write && off >= smallChunk && off < 2*smallChunk {
				return errBroken
			}
			return nil
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			o, dev, model, s := smallSetup(t, SnapshotOptions{})
			writeOrigin(t, o, model, 0, 0x01)
			require.NoError(t, s.snap.Err())

			s.cow.SetFault(tc.fault)
			writeOrigin(t, o, model, 3, 0x03)
			err := s.snap.Err()
			require.Error(t, err)
			assert.ErrorIs(t, err, exstore.ErrInvalid)
			assert.ErrorIs(t, s.snap.ReadAt(ctx, make([]byte, 1), 0), exstore.ErrInvalid)
			writeOrigin(t, o, model, 4, 0x04)
			requireSame(t, model, readAll(t, o), "origin")
			requireSame(t, model, dev.Bytes(), "origin device")
			require.NoError(t, o.Flush(ctx), "a failing COW does not fail the origin's flush")
		})
	}
}

func TestFailingCOWOnSnapshotWrite(t *testing.T) {
	ctx := context.Background()
	_, _, _, s := smallSetup(t, SnapshotOptions{})
	s.cow.SetFault(func(op faultdev.Op, off, _ int64) error {
		if op == faultdev.Write && off >= 2*smallChunk {
			return errors.New("broken COW")
		}
		return nil
	})
	err := s.snap.WriteAt(ctx, make([]byte, smallChunk), 2*smallChunk, false)
	assert.ErrorIs(t, err, exstore.ErrInvalid)
	assert.ErrorIs(t, s.snap.Err(), exstore.ErrInvalid)
}

// TestFailingOriginReadDuringCopy: when the origin chunk cannot be read for
// the copy, the snapshot is invalidated (the kernel's kcopyd read error) and
// the origin write still goes ahead.
func TestFailingOriginReadDuringCopy(t *testing.T) {
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	errBroken := errors.New("broken origin")
	dev.SetFault(func(op faultdev.Op, _, _ int64) error {
		if op == faultdev.Read {
			return errBroken
		}
		return nil
	})
	writeOrigin(t, o, model, 5, 0x55)
	dev.SetFault(nil)
	err := s.snap.Err()
	assert.ErrorIs(t, err, exstore.ErrInvalid)
	assert.ErrorIs(t, err, errBroken)
	requireSame(t, model, readAll(t, o), "origin")
}

// TestPartialLastChunk: an origin whose size is not a multiple of the chunk
// size. Only the existing part of the last chunk is copied; a write of all
// of it counts as a whole-chunk write and skips the copy.
func TestPartialLastChunk(t *testing.T) {
	ctx := context.Background()
	const tail = 1808
	const size = 3*smallChunk + tail
	rng := rand.New(rand.NewPCG(5, 5))
	dev := newOriginDev(rng, size)
	o := NewOrigin(dev)
	model := dev.Bytes()
	a := addSnapshot(t, o, "a", smallChunkSectors, 16*smallChunk, SnapshotOptions{}, model)
	b := addSnapshot(t, o, "b", smallChunkSectors, 16*smallChunk, SnapshotOptions{}, model)

	// Origin write to the last bytes: a's copy holds the old tail, zeros after.
	data := randomBytes(rng, 10)
	require.NoError(t, o.WriteAt(ctx, data, size-10, false))
	copy(model[size-10:], data)
	requireSame(t, a.model, readAll(t, a.snap), "snapshot a")
	requireSame(t, model, readAll(t, o), "origin")
	newChunk, found, release, err := a.store.Lookup(ctx, 3)
	release()
	require.NoError(t, err)
	require.True(t, found)
	cow := a.cow.Bytes()[int64(newChunk)*smallChunk:][:smallChunk]
	assert.Equal(t, a.model[3*smallChunk:], cow[:tail])
	assert.Equal(t, make([]byte, smallChunk-tail), cow[tail:])

	// b already has its copy of chunk 3 (the origin write made it); a write of
	// the whole existing part of chunk 2 needs no origin read.
	dev.ResetStats()
	whole := randomBytes(rng, smallChunk)
	require.NoError(t, b.snap.WriteAt(ctx, whole, 2*smallChunk, false))
	copy(b.model[2*smallChunk:], whole)
	assert.Zero(t, dev.Stats().Reads, "a whole-chunk snapshot write copies nothing")
	// A partial write of chunk 1 copies the rest from the origin.
	require.NoError(t, b.snap.WriteAt(ctx, []byte{7, 7}, smallChunk+100, false))
	copy(b.model[smallChunk+100:], []byte{7, 7})
	assert.NotZero(t, dev.Stats().Reads)
	requireSame(t, b.model, readAll(t, b.snap), "snapshot b")

	// A fresh snapshot's whole-tail write also skips the copy.
	c := addSnapshot(t, o, "c", smallChunkSectors, 16*smallChunk, SnapshotOptions{}, model)
	dev.ResetStats()
	tailData := randomBytes(rng, tail)
	require.NoError(t, c.snap.WriteAt(ctx, tailData, 3*smallChunk, false))
	copy(c.model[3*smallChunk:], tailData)
	assert.Zero(t, dev.Stats().Reads)
	requireSame(t, c.model, readAll(t, c.snap), "snapshot c")

	// Nothing beyond the end.
	assert.ErrorIs(t, c.snap.ReadAt(ctx, make([]byte, 2), size-1), blockdev.ErrOutOfRange)
	assert.ErrorIs(t, c.snap.WriteAt(ctx, make([]byte, 2), size-1, false), blockdev.ErrOutOfRange)
	assert.ErrorIs(t, o.WriteAt(ctx, make([]byte, 1), size, false), blockdev.ErrOutOfRange)
	assert.ErrorIs(t, o.ReadAt(ctx, make([]byte, 1), -1), blockdev.ErrOutOfRange)
}

func TestReadOnlySnapshot(t *testing.T) {
	ctx := context.Background()
	o, _, model, s := smallSetup(t, SnapshotOptions{ReadOnly: true})
	err := s.snap.WriteAt(ctx, []byte{1}, 0, false)
	assert.ErrorIs(t, err, ErrReadOnly)
	assert.NoError(t, s.snap.Err(), "a refused write does not change the snapshot's state")
	// Origin writes still copy into it.
	writeOrigin(t, o, model, 1, 0x42)
	requireSame(t, s.model, readAll(t, s.snap), "read-only snapshot")
	assert.Equal(t, uint64(1), s.store.Usage().Exceptions)
	assert.ErrorIs(t, s.snap.WriteAt(ctx, []byte{1}, smallChunk, false), ErrReadOnly)
}

// TestFUA: FUA writes survive a power cut that drops every unflushed write.
func TestFUA(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	originData := bytes.Repeat([]byte{0x5a}, 700)
	require.NoError(t, o.WriteAt(ctx, originData, 2*smallChunk+3, true))
	copy(model[2*smallChunk+3:], originData)
	snapData := bytes.Repeat([]byte{0xa5}, 900)
	require.NoError(t, s.snap.WriteAt(ctx, snapData, 5*smallChunk+1, true))
	copy(s.model[5*smallChunk+1:], snapData)
	whole := bytes.Repeat([]byte{0x3c}, smallChunk)
	require.NoError(t, s.snap.WriteAt(ctx, whole, 7*smallChunk, true))
	copy(s.model[7*smallChunk:], whole)
	require.NoError(t, s.store.Close())

	o2 := NewOrigin(dev.PowerCutDropAll())
	requireSame(t, model, readAll(t, o2), "origin after the cut")
	cow := s.cow.PowerCutDropAll()
	store, err := persistent.Open(ctx, cow, persistent.Options{})
	require.NoError(t, err)
	defer store.Close()
	snap, err := o2.AddSnapshot("s", store, cow, SnapshotOptions{})
	require.NoError(t, err)
	requireSame(t, s.model, readAll(t, snap), "snapshot after the cut")
}

func TestAddSnapshotChecks(t *testing.T) {
	ctx := context.Background()
	o, dev, _, s := smallSetup(t, SnapshotOptions{})
	_, err := o.AddSnapshot("s", s.store, s.cow, SnapshotOptions{})
	assert.Error(t, err, "duplicate name")
	store, err := persistent.Open(ctx, faultdev.New("other", 8*smallChunk), persistent.Options{ChunkSectors: 8})
	require.NoError(t, err)
	defer store.Close()
	_, err = o.AddSnapshot("o", store, dev, SnapshotOptions{})
	assert.Error(t, err, "the origin as COW")
	assert.Len(t, o.Snapshots(), 1)
}

func TestCanceledContext(t *testing.T) {
	o, _, model, s := smallSetup(t, SnapshotOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	assert.ErrorIs(t, o.WriteAt(ctx, []byte{1}, 0, false), context.Canceled)
	assert.ErrorIs(t, s.snap.ReadAt(ctx, []byte{1}, 0), context.Canceled)
	assert.ErrorIs(t, s.snap.WriteAt(ctx, []byte{1}, 0, false), context.Canceled)
	assert.NoError(t, s.snap.Err())
	requireSame(t, model, readAll(t, o), "origin")
	requireSame(t, s.model, readAll(t, s.snap), "snapshot")
}

// TestFlush: after Flush of either volume, plain writes to both survive a
// power cut that drops every unflushed write.
func TestFlush(t *testing.T) {
	for _, flushSnapshot := range []bool{false, true} {
		t.Run(map[bool]string{false: "origin", true: "snapshot"}[flushSnapshot], func(t *testing.T) {
			ctx := context.Background()
			o, dev, model, s := smallSetup(t, SnapshotOptions{})
			// Chunk 2 gets an exception; the second snapshot write to it is
			// a plain COW write that only a flush makes durable.
			for i, fill := range []byte{0x21, 0x22} {
				data := bytes.Repeat([]byte{fill}, 333)
				require.NoError(t, s.snap.WriteAt(ctx, data, 2*smallChunk+int64(i)*1000, false))
				copy(s.model[2*smallChunk+int64(i)*1000:], data)
			}
			writeOrigin(t, o, model, 6, 0x66)
			dev.ResetStats()
			s.cow.ResetStats()
			if flushSnapshot {
				require.NoError(t, s.snap.Flush(ctx))
			} else {
				require.NoError(t, o.Flush(ctx))
			}
			assert.Equal(t, uint64(1), dev.Stats().Syncs)
			assert.Equal(t, uint64(1), s.cow.Stats().Syncs)
			require.NoError(t, s.store.Close())

			o2 := NewOrigin(dev.PowerCutDropAll())
			requireSame(t, model, readAll(t, o2), "origin after the cut")
			cow := s.cow.PowerCutDropAll()
			store, err := persistent.Open(ctx, cow, persistent.Options{Logger: testLogger(t)})
			require.NoError(t, err)
			defer store.Close()
			snap, err := o2.AddSnapshot("s", store, cow, SnapshotOptions{})
			require.NoError(t, err)
			requireSame(t, s.model, readAll(t, snap), "snapshot after the cut")
		})
	}
}

// TestInvalidAtLoad: a COW whose header says invalid (valid=0) loads as an
// invalid snapshot, as in the kernel: its I/O fails, origin writes skip it.
func TestInvalidAtLoad(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(6, 6))
	dev := newOriginDev(rng, 8*smallChunk)
	model := dev.Bytes()
	cow := faultdev.New("cow", 8*smallChunk)
	store, err := persistent.Open(ctx, cow, persistent.Options{ChunkSectors: smallChunkSectors, Logger: testLogger(t)})
	require.NoError(t, err)
	require.NoError(t, store.Invalidate(ctx, errors.New("test")))
	require.NoError(t, store.Close())
	store, err = persistent.Open(ctx, cow, persistent.Options{Logger: testLogger(t)})
	require.NoError(t, err)
	defer store.Close()

	o := NewOrigin(dev)
	snap, err := o.AddSnapshot("s", store, cow, SnapshotOptions{})
	require.NoError(t, err)
	assert.ErrorIs(t, snap.Err(), exstore.ErrInvalid)
	assert.ErrorIs(t, snap.ReadAt(ctx, make([]byte, 1), 0), exstore.ErrInvalid)
	writeOrigin(t, o, model, 2, 0x22)
	requireSame(t, model, readAll(t, o), "origin")
	assert.Zero(t, store.Usage().Exceptions)
}

// TestFlushSkipsCleanDevices: a flush syncs only the devices that a write
// reached since their last sync, on either export.
func TestFlushSkipsCleanDevices(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	syncs := func() [2]uint64 { return [2]uint64{dev.Stats().Syncs, s.cow.Stats().Syncs} }
	require.NoError(t, o.Flush(ctx))
	base := syncs()
	require.NoError(t, s.snap.Flush(ctx))
	require.NoError(t, o.Flush(ctx))
	assert.Equal(t, base, syncs(), "flushes with nothing written")

	// A rewrite of a chunk with an exception dirties only the COW.
	writeOrigin(t, o, model, 3, 0x33)
	require.NoError(t, o.Flush(ctx))
	base = syncs()
	require.NoError(t, s.snap.WriteAt(ctx, []byte("rewrite"), 3*smallChunk+9, false))
	require.NoError(t, s.snap.Flush(ctx))
	assert.Equal(t, [2]uint64{base[0], base[1] + 1}, syncs(), "snapshot flush after a snapshot write")

	// An origin write dirties the origin; either export's flush syncs it.
	writeOrigin(t, o, model, 3, 0x34)
	require.NoError(t, s.snap.Flush(ctx))
	assert.Equal(t, [2]uint64{base[0] + 1, base[1] + 1}, syncs(), "snapshot flush after an origin rewrite")
	require.NoError(t, o.Flush(ctx))
	assert.Equal(t, [2]uint64{base[0] + 1, base[1] + 1}, syncs(), "origin flush after that")

	// A FUA write is durable by itself: the flush after it syncs nothing.
	require.NoError(t, o.WriteAt(ctx, []byte("fua"), 3*smallChunk, true))
	before := syncs()
	require.NoError(t, o.Flush(ctx))
	assert.Equal(t, before, syncs(), "flush after a FUA origin rewrite")
}

// TestOriginWriteMakesLazyExceptionDurable: a snapshot write commits its
// exception lazily; an origin write to that chunk must make it durable
// before changing the origin, or a crash that keeps the origin write but
// loses the unflushed exception would show the new origin data in the
// snapshot.
func TestOriginWriteMakesLazyExceptionDurable(t *testing.T) {
	ctx := context.Background()
	for _, whole := range []bool{false, true} {
		o, dev, model, s := smallSetup(t, SnapshotOptions{})
		snapData := bytes.Repeat([]byte{0x5e}, smallChunk)
		if !whole {
			snapData = snapData[:100]
		}
		require.NoError(t, s.snap.WriteAt(ctx, snapData, 4*smallChunk, false))
		copy(s.model[4*smallChunk:], snapData)
		new, found, release, err := s.store.Lookup(ctx, 4)
		release()
		require.NoError(t, err)
		require.True(t, found)
		require.False(t, s.store.Durable(new), "the snapshot write's exception is lazy")

		writeOrigin(t, o, model, 4, 0x0e)
		assert.True(t, s.store.Durable(new), "durable after the origin write")

		// The cut keeps every origin write and only what is durable on
		// the COW.
		o2 := NewOrigin(dev.PowerCutKeepAll())
		requireSame(t, model, readAll(t, o2), "origin after the cut")
		cow := s.cow.PowerCutDropAll()
		store, err := persistent.Open(ctx, cow, persistent.Options{Logger: testLogger(t)})
		require.NoError(t, err)
		snap, err := o2.AddSnapshot("s", store, cow, SnapshotOptions{})
		require.NoError(t, err)
		got := readAll(t, snap)
		requireSame(t, s.model[4*smallChunk:5*smallChunk], got[4*smallChunk:5*smallChunk], "snapshot chunk 4 after the cut")
		require.NoError(t, store.Close())
	}
}

// lostStore is a store whose Err reports a failure that is not the
// snapshot's invalidity, as a clustered store's does once its node lost
// the cluster lock.
type lostStore struct{ exstore.Store }

var errLostLock = errors.New("node lost its cluster lock")

func (lostStore) Err() error { return errLostLock }

// originWithWrappedStore is a small origin with one snapshot, whose
// persistent store is handed to the engine through wrap.
func originWithWrappedStore(t *testing.T, wrap func(exstore.Store) exstore.Store) (*Origin, *faultdev.Device, *Snapshot) {
	t.Helper()
	dev := newOriginDev(rand.New(rand.NewPCG(9, 9)), 8*smallChunk)
	o := NewOrigin(dev)
	cow := faultdev.New("cow", smallCOWChunks*smallChunk)
	store, err := persistent.Open(context.Background(), cow, persistent.Options{ChunkSectors: smallChunkSectors, Logger: testLogger(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = store.Close() })
	s, err := o.AddSnapshot("s", wrap(store), cow, SnapshotOptions{})
	require.NoError(t, err)
	return o, dev, s
}

// TestOriginWriteFailsWhenStoreLostItsLock: an origin write must fail, and
// leave the origin alone, when a snapshot's store fails for a reason other
// than invalidity: skipping the copy would corrupt a snapshot that other
// nodes still serve.
func TestOriginWriteFailsWhenStoreLostItsLock(t *testing.T) {
	ctx := context.Background()
	o, dev, _ := originWithWrappedStore(t, func(s exstore.Store) exstore.Store { return lostStore{s} })
	before := dev.Bytes()
	err := o.WriteAt(ctx, bytes.Repeat([]byte{1}, 512), 2*smallChunk, false)
	assert.ErrorIs(t, err, errLostLock)
	assert.Equal(t, before, dev.Bytes(), "origin after the refused write")
	assert.ErrorIs(t, o.WriteZeroes(ctx, 0, smallChunk, false, false), errLostLock)
	assert.Equal(t, before, dev.Bytes(), "origin after the refused zeroing")
}

// TestReadInOneChunkIsOneDeviceRead: a read of part of one chunk reads its
// device once, from the origin or from the COW, and returns the right
// data; this is the path most reads take.
func TestReadInOneChunkIsOneDeviceRead(t *testing.T) {
	ctx := context.Background()
	o, dev, model, s := smallSetup(t, SnapshotOptions{})
	writeOrigin(t, o, model, 3, 0x33) // chunk 3 gets an exception
	for _, c := range []int64{2, 3} {
		dev.ResetStats()
		s.cow.ResetStats()
		got := make([]byte, 300)
		require.NoError(t, s.snap.ReadAt(ctx, got, c*smallChunk+40))
		requireSame(t, s.model[c*smallChunk+40:c*smallChunk+340], got, "snapshot read")
		assert.Equal(t, uint64(1), dev.Stats().Reads+s.cow.Stats().Reads, "chunk %d: device reads", c)
	}
}

// rangeCountingStore counts a persistent store's LookupRange calls; it
// keeps the store's exstore.AbsenceChecker.
type rangeCountingStore struct {
	*persistent.Store
	ranges atomic.Int32
}

// LookupRange implements exstore.RangeLookuper, counting.
func (s *rangeCountingStore) LookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	s.ranges.Add(1)
	return s.Store.LookupRange(ctx, first, into)
}

// TestReadOfChunksWithoutExceptions: a read of several chunks that the
// store says have no exceptions is one origin read, with no per-chunk
// answers; once one of them has an exception, the read looks them up.
func TestReadOfChunksWithoutExceptions(t *testing.T) {
	ctx := context.Background()
	var store *rangeCountingStore
	o, dev, model, snap := wrappedSetup(t, 3, func(_, _ *faultdev.Device, s exstore.Store) exstore.Store {
		store = &rangeCountingStore{Store: s.(*persistent.Store)}
		return store
	})
	read := func() {
		t.Helper()
		dev.ResetStats()
		got := make([]byte, 3*smallChunk)
		require.NoError(t, snap.ReadAt(ctx, got, 4*smallChunk))
		requireSame(t, model[4*smallChunk:7*smallChunk], got, "snapshot read")
	}
	read()
	assert.Zero(t, store.ranges.Load(), "lookups of chunks without exceptions")
	assert.Equal(t, uint64(1), dev.Stats().Reads, "origin reads")

	want := slices.Clone(model)
	writeOrigin(t, o, model, 5, 0x55)
	model = want // the snapshot keeps the old data
	read()
	assert.Equal(t, int32(1), store.ranges.Load(), "range lookups once chunk 5 has an exception")
}

// losingStore loses its lock in the middle of a copy: the first Prepare or
// Commit after lose is set fails, and Err reports the loss from then on,
// as a clustered store does when its node is cut off mid-write.
type losingStore struct {
	exstore.Store
	at   string // "prepare" or "commit": where the loss strikes
	lost atomic.Bool
}

func (s *losingStore) Err() error {
	if s.lost.Load() {
		return errLostLock
	}
	return s.Store.Err()
}

func (s *losingStore) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	if s.at == "prepare" {
		s.lost.Store(true)
		// The core under a clustered store invalidates itself when the
		// fence refuses its write; its error says invalid.
		return exstore.Exception{}, fmt.Errorf("chunk %d: %w", old, exstore.ErrInvalid)
	}
	return s.Store.Prepare(ctx, old)
}

func (s *losingStore) Commit(ctx context.Context, e exstore.Exception) error {
	if s.at == "commit" {
		s.lost.Store(true)
		s.Store.Abort(e)
		return fmt.Errorf("commit %v: %w", e, errLostLock)
	}
	return s.Store.Commit(ctx, e)
}

// TestOriginWriteFailsWhenStoreLosesItsLockMidCopy: a store that loses its
// lock while an origin write's copy is under way fails that write and
// leaves the origin alone, and the snapshot is not marked invalid on this
// node (it is valid for the others): later origin writes fail too, rather
// than skip it.
func TestOriginWriteFailsWhenStoreLosesItsLockMidCopy(t *testing.T) {
	for _, at := range []string{"prepare", "commit"} {
		t.Run(at, func(t *testing.T) {
			ctx := context.Background()
			o, dev, s := originWithWrappedStore(t, func(st exstore.Store) exstore.Store { return &losingStore{Store: st, at: at} })
			before := dev.Bytes()
			err := o.WriteAt(ctx, bytes.Repeat([]byte{1}, 512), 2*smallChunk, false)
			assert.ErrorIs(t, err, errLostLock)
			assert.Equal(t, before, dev.Bytes(), "origin after the write whose copy failed")
			assert.NotErrorIs(t, s.Err(), exstore.ErrInvalid, "the snapshot is not invalid: the other nodes serve it")
			assert.ErrorIs(t, o.WriteAt(ctx, bytes.Repeat([]byte{2}, 512), 5*smallChunk, false), errLostLock, "a later origin write")
			assert.Equal(t, before, dev.Bytes(), "origin after the later write")
		})
	}
}
