package cow

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Origin is the origin device with its snapshots: reads pass straight
// through, writes first copy the chunks they overwrite into the snapshots.
type Origin struct {
	dev  blockdev.Device
	size int64

	// snapMu is held shared by origin writes for their whole span and
	// exclusively by AddSnapshot, as the kernel needs the origin suspended
	// while a snapshot table is loaded: a write either copies into a new
	// snapshot or completed before it existed.
	snapMu sync.RWMutex
	snaps  []*Snapshot // largest chunk size first

	// merging is held by Merge and StartMerge: one merge per origin at a
	// time, as in the kernel (two would each overwrite the origin with
	// their own view), and one Merge running it.
	merging sync.Mutex
	// merge is the merge mode the origin is in, nil when it is in none
	// (merge.go). It changes only under snapMu held exclusively, so an
	// origin change sees one mode for its whole span; reads load it once.
	merge atomic.Pointer[liveMerge]
	// breaks is zero but in tests that prove a checker (mergeio.go).
	breaks mergeBreaks

	// zeroes returns a zero-filled buffer of zeroBufferBytes, aligned for
	// dev, allocated on first use: WriteZeroes writes from it.
	zeroes func() []byte

	// syncs tells the flushes whether dev has writes to make durable.
	syncs syncTracker

	// gate, if set, admits every origin change (gate.go).
	gate OriginGate

	// noCutFlush, set only by a test that must see the loss, makes
	// AddSnapshot skip its flush.
	noCutFlush bool
}

// NewOrigin returns the origin on dev, without snapshots.
func NewOrigin(dev blockdev.Device) *Origin {
	return &Origin{dev: dev, size: dev.Size(), zeroes: zeroBuffer(zeroBufferBytes, dev.Alignment())}
}

// Size is the origin's size in bytes.
func (o *Origin) Size() int64 { return o.size }

// Device returns the origin device.
func (o *Origin) Device() blockdev.Device { return o.dev }

// Snapshots returns the origin's snapshots, largest chunk size first.
func (o *Origin) Snapshots() []*Snapshot {
	o.snapMu.RLock()
	defer o.snapMu.RUnlock()
	return slices.Clone(o.snaps)
}

// SnapshotOptions tune a snapshot, as the kernel's table arguments do.
type SnapshotOptions struct {
	// ReadOnly refuses snapshot writes (ErrReadOnly).
	ReadOnly bool
	// Overflow is the kernel's "PO": a snapshot write that cannot allocate
	// fails with ErrOverflow and the snapshot stays valid for reads, instead
	// of being invalidated.
	Overflow bool
}

// AddSnapshot adds a snapshot of the origin whose exceptions live in store
// on the COW device cow (the device store was opened on). The snapshot
// shows the origin as it is now plus whatever exceptions store already
// holds. It is a cut, as the kernel's suspend of the origin is: new origin
// changes wait, the ones in flight complete, the origin is flushed, and the
// snapshot joins before any change resumes. So the snapshot holds every
// origin write acknowledged before the call, durably, none that starts
// after it returns, and a write in flight wholly or not at all. If the
// flush fails the snapshot is not added.
func (o *Origin) AddSnapshot(name string, store exstore.Store, cow blockdev.Device, opts SnapshotOptions) (*Snapshot, error) {
	if store == nil || cow == nil {
		return nil, fmt.Errorf("snapshot %s: store and COW device are required", name)
	}
	cs := store.ChunkSectors()
	if cs == 0 || cs&(cs-1) != 0 {
		return nil, fmt.Errorf("snapshot %s: chunk size %d sectors is not a power of two", name, cs)
	}
	for _, dev := range []blockdev.Device{o.dev, cow} {
		if a := int64(dev.Alignment()); a > 1 && int64(cs)*exstore.SectorSize%a != 0 {
			return nil, fmt.Errorf("snapshot %s: chunk size %d sectors is not a multiple of the I/O alignment %d of %s", name, cs, a, dev.Name())
		}
	}
	if cow == o.dev {
		return nil, fmt.Errorf("snapshot %s: COW device %s is the origin device", name, cow.Name())
	}
	s := newSnapshot(o, name, store, cow, opts)
	o.snapMu.Lock()
	defer o.snapMu.Unlock()
	if m := o.merge.Load(); m != nil {
		// The copies would be of the origin device, whose content is not
		// what the origin reads while it merges.
		return nil, fmt.Errorf("snapshot %s: origin %s merges snapshot %s: %w", name, o.dev.Name(), m.snap.name, ErrMergeInProgress)
	}
	for _, other := range o.snaps {
		if other.name == name {
			return nil, fmt.Errorf("snapshot %s: origin %s already has a snapshot of that name", name, o.dev.Name())
		}
	}
	// Writes acknowledged without FUA may still be in a cache the
	// snapshot's reads see but a crash loses: make them durable first.
	if err := o.cutFlush(); err != nil {
		return nil, fmt.Errorf("snapshot %s: flush of origin %s: %w", name, o.dev.Name(), err)
	}
	snaps := append(slices.Clone(o.snaps), s)
	slices.SortStableFunc(snaps, func(a, b *Snapshot) int { return cmp.Compare(b.chunkBytes, a.chunkBytes) })
	o.snaps = snaps
	return s, nil
}

func (o *Origin) cutFlush() error {
	if o.noCutFlush {
		return nil
	}
	return o.syncs.sync(o.dev)
}

// ErrRemoved is wrapped by the errors of a snapshot removed from its
// origin: origin writes no longer copy into it, so its view went stale.
var ErrRemoved = errors.New("snapshot was removed from its origin")

// RemoveSnapshot stops copying origin writes into s: it waits for the
// origin changes in flight (which may be copying into s) to complete, as
// AddSnapshot does, and takes s out. Every later use of s fails with an
// error wrapping ErrRemoved. Its store and COW device are the caller's to
// flush and close; s's own I/O in flight is the caller's to drain first.
func (o *Origin) RemoveSnapshot(s *Snapshot) error {
	o.snapMu.Lock()
	defer o.snapMu.Unlock()
	if m := o.merge.Load(); m != nil && m.snap == s {
		return fmt.Errorf("origin %s: remove snapshot %s: %w", o.dev.Name(), s.name, ErrMergeInProgress)
	}
	i := slices.Index(o.snaps, s)
	if i < 0 {
		return fmt.Errorf("origin %s: remove snapshot: not a snapshot of this origin", o.dev.Name())
	}
	o.snaps = slices.Delete(slices.Clone(o.snaps), i, i+1)
	s.markFailed(ErrRemoved)
	return nil
}

// ReadAt fills p from off of the origin.
func (o *Origin) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := checkRange(o.size, off, int64(len(p))); err != nil {
		return fmt.Errorf("origin %s: read: %w", o.dev.Name(), err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	var err error
	if o.merge.Load() == nil {
		err = readDev(o.dev, p, off)
	} else {
		err = o.readMerging(ctx, p, off)
	}
	if err != nil {
		return fmt.Errorf("origin %s: read %d bytes at %d: %w", o.dev.Name(), len(p), off, err)
	}
	return nil
}

// WriteAt writes p at off of the origin, durably before it returns with
// fua, inside the origin's gate if it has one. Every valid snapshot gets
// its copy of the chunks p overwrites before p reaches the origin. A snapshot whose copy
// fails (COW full, COW or origin read I/O error) is invalidated and
// skipped, as in the kernel; the write fails only if ctx ends, the gate
// refuses it, a store's lookup fails or the origin write itself fails.
func (o *Origin) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := checkRange(o.size, off, int64(len(p))); err != nil {
		return fmt.Errorf("origin %s: write: %w", o.dev.Name(), err)
	}
	if err := checkWriteAlignment(o.dev, off, int64(len(p))); err != nil {
		return fmt.Errorf("origin %s: write: %w", o.dev.Name(), err)
	}
	if err := ctx.Err(); err != nil || len(p) == 0 {
		return err
	}
	leave, err := o.enter(ctx)
	if err != nil {
		return fmt.Errorf("origin %s: write %d bytes at %d: %w", o.dev.Name(), len(p), off, err)
	}
	defer leave()
	o.snapMu.RLock()
	defer o.snapMu.RUnlock()
	// One error return after the defers: with more, the compiler no
	// longer open-codes them, which costs this path a measurable share.
	if m := o.merge.Load(); m != nil {
		err = o.writeMerging(ctx, m, p, off, fua)
	} else if err = o.copyBeforeOverwrite(ctx, off, int64(len(p)), nil); err == nil {
		o.announceOverwrite(off, int64(len(p)))
		if err = writeDev(o.dev, p, off, fua); err == nil && !fua {
			o.syncs.wrote()
		}
	}
	if err != nil {
		return fmt.Errorf("origin %s: write %d bytes at %d: %w", o.dev.Name(), len(p), off, err)
	}
	return nil
}

// Flush makes every origin write that completed before it durable: it
// syncs the origin and every valid snapshot's COW device, and in merge mode
// the merging snapshot's COW, each unless no write reached it since its
// last sync. A valid snapshot's COW that fails to sync invalidates the
// snapshot rather than failing the origin's flush, unless its store
// stopped for another reason than invalidity (see invalidate); the merging
// snapshot's fails the flush.
func (o *Origin) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := o.syncs.sync(o.dev); err != nil {
		return fmt.Errorf("origin %s: flush: %w", o.dev.Name(), err)
	}
	if err := o.flushMerging(); err != nil {
		return fmt.Errorf("origin %s: %w", o.dev.Name(), err)
	}
	var errs []error
	for _, s := range o.Snapshots() {
		if s.failure() != nil {
			continue
		}
		if err := s.flushCOW(ctx); err != nil {
			errs = append(errs, s.invalidate(ctx, fmt.Errorf("flush of COW %s: %w", s.cow.Name(), err)))
		}
	}
	return errors.Join(errs...)
}

// announceOverwrite tells the snapshots' reads that [off, off+n) of the
// origin is about to be overwritten (see chunkLocks): a read that missed
// one of its chunks before the exception appeared (whether this write's
// copy, an earlier one or a snapshot write made it) and is reading the
// origin now reads again, and finds the exception. Every origin change
// comes after its copies and calls it first; the caller holds o.snapMu.
func (o *Origin) announceOverwrite(off, n int64) {
	if n <= 0 {
		return
	}
	for _, s := range o.snaps {
		first, last := off/s.chunkBytes, (off+n-1)/s.chunkBytes
		if last-first+1 >= chunkLockStripes {
			first, last = 0, chunkLockStripes-1
		}
		for c := first; c <= last; c++ {
			s.locks.announceOverwrite(exstore.Chunk(c))
		}
	}
}

// checkRange fails unless [off, off+n) lies inside a volume of size bytes.
func checkRange(size, off, n int64) error {
	if off < 0 || n < 0 || n > size || off > size-n {
		return fmt.Errorf("%d bytes at offset %d (volume size %d): %w", n, off, size, blockdev.ErrOutOfRange)
	}
	return nil
}
