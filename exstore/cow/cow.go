// Package cow is clustersnap's copy-on-write engine: the I/O logic of the
// kernel's dm-snapshot (drivers/md/dm-snap.c) in userspace, over any
// exstore.Store.
//
// An Origin serves the origin device and, before a write overwrites a chunk,
// copies the chunk's old content into every valid snapshot that has no
// exception for it yet. The copies one write needs start largest chunk size
// first, as in the kernel, and run in parallel so that their commits share
// metadata writes. A Snapshot serves the view of the origin at the time it
// was taken: chunks with an exception come from its COW device, the others
// from the origin. Origin.Merge rolls the origin back to a snapshot
// offline, as the kernel's snapshot-merge target does, and
// Snapshot.Extents tells which ranges of a snapshot its COW device holds.
//
// The orderings that keep a snapshot right, also across a crash:
//   - an origin write proceeds only after every snapshot's copy of the chunks
//     it covers is committed (the store syncs the copy before the record and
//     makes the record durable before Commit returns);
//   - an origin write announces the chunks it covers after their copies and
//     before it writes; a snapshot read takes no lock but compares the
//     announcements on its chunks before its lookup and after its I/O, and
//     reads again if one came, so a read that went to the origin never
//     returns data written after the snapshot (see chunkLocks; a read of
//     several chunks reads each run of them that is contiguous on the
//     origin or the COW with one I/O);
//   - an origin write never overwrites a chunk whose exception is not
//     durable: a lazily committed one is synced first;
//   - a partial snapshot write reaches the COW only after the copy of the
//     rest of the chunk is committed; a whole-chunk write goes straight to
//     the new COW chunk and is committed after it. Without FUA the commit
//     is lazy where the store allows it: durable at the next Flush.
//
// Trims and zeroing (the NBD server's optional Trimmer interface, and a
// WriteZeroes(ctx, off, length, noHole, fua) that a caller adapts to its
// Zeroer) follow from the same rule, that the origin changes only after
// every snapshot has its copy:
//   - Origin.Trim is a hint. On a device that is a blockdev.Discarder it
//     copies the chunks the discarded range overlaps into the snapshots, as
//     a write does, and then discards the whole 512-byte (or alignment)
//     units of the range, which then read as zeroes (a file's punched hole).
//     On other devices it changes nothing, so it copies nothing either.
//   - Origin.WriteZeroes copies as a write does, then discards the range
//     (on a Discarder, unless noHole) or writes zeroes.
//   - Snapshot.Trim never touches the origin and never allocates: it is
//     checked as a write (read-only, invalid, overflowed) and does nothing,
//     because an exception cannot be dropped from the store and zeroing its
//     chunk would cost a write and free nothing.
//   - Snapshot.WriteZeroes is a write of zeroes, from one reused buffer.
//
// Concurrent COW of one chunk of one snapshot is serialised by that per-chunk
// lock: it is the kernel's pending-exception table, later writers wait for
// the first one and then find its exception. Errors of a snapshot that is
// invalid wrap exstore.ErrInvalid; an origin write never fails because of a
// snapshot: a snapshot whose copy cannot be made is invalidated instead.
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

// Volume is a block device as the NBD server serves it. Requests may be of
// any byte range inside the volume and may span chunks; writes to devices
// whose Alignment is larger than 1 must be aligned to it.
type Volume interface {
	// Size is the volume size in bytes.
	Size() int64
	// ReadAt fills p from off.
	ReadAt(ctx context.Context, p []byte, off int64) error
	// WriteAt writes p at off; with fua the data is durable when it returns.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	// Flush makes every completed write durable.
	Flush(ctx context.Context) error
}

// ErrReadOnly is wrapped by writes to a read-only snapshot.
var ErrReadOnly = errors.New("snapshot is read-only")

// ErrOverflow is wrapped by the errors of a snapshot in overflow mode whose
// writes can no longer allocate: the COW device is full. Reads keep working.
var ErrOverflow = errors.New("snapshot overflowed: the COW device is full")

// ErrUnaligned is wrapped by writes that are not aligned to the I/O alignment
// a device needs (O_DIRECT devices).
var ErrUnaligned = errors.New("write is not aligned to the device's I/O alignment")

// ErrCOWFull is the reason a snapshot is invalidated when its COW device
// fills up (and it is not in overflow mode, or an origin write needed the
// copy). The snapshot's errors then wrap both it and exstore.ErrInvalid.
var ErrCOWFull = errors.New("the COW device filled up")

// CopiesInFlight bounds the chunk copies (and allocations) one snapshot has
// in flight: the kernel's snapshot_cow_threshold default.
const CopiesInFlight = 2048

// Origin is the origin device with its snapshots. It implements Volume: reads
// pass straight through, writes first copy the chunks they overwrite into
// the snapshots.
type Origin struct {
	dev  blockdev.Device
	size int64

	// snapMu is held shared by origin writes for their whole span and
	// exclusively by AddSnapshot, as the kernel needs the origin suspended
	// while a snapshot table is loaded: a write either copies into a new
	// snapshot or completed before it existed.
	snapMu sync.RWMutex
	snaps  []*Snapshot // largest chunk size first

	// merging is held by Merge: one merge per origin at a time, as in the
	// kernel (two would each overwrite the origin with their own view).
	merging sync.Mutex

	// zeroes returns a zero-filled buffer of zeroBufferBytes, aligned for
	// dev, allocated on first use: WriteZeroes writes from it.
	zeroes func() []byte

	// syncs tells the flushes whether dev has writes to make durable.
	syncs syncTracker
}

var _ Volume = (*Origin)(nil)

// NewOrigin returns the origin on dev, without snapshots.
func NewOrigin(dev blockdev.Device) *Origin {
	return &Origin{dev: dev, size: dev.Size(), zeroes: zeroBuffer(zeroBufferBytes, dev.Alignment())}
}

// Size implements Volume.
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
// holds. It waits for origin writes in flight to complete first.
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
	for _, other := range o.snaps {
		if other.name == name {
			return nil, fmt.Errorf("snapshot %s: origin %s already has a snapshot of that name", name, o.dev.Name())
		}
	}
	snaps := append(slices.Clone(o.snaps), s)
	slices.SortStableFunc(snaps, func(a, b *Snapshot) int { return cmp.Compare(b.chunkBytes, a.chunkBytes) })
	o.snaps = snaps
	return s, nil
}

// ReadAt implements Volume.
func (o *Origin) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := checkRange(o.size, off, int64(len(p))); err != nil {
		return fmt.Errorf("origin %s: read: %w", o.dev.Name(), err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := readDev(o.dev, p, off); err != nil {
		return fmt.Errorf("origin %s: read %d bytes at %d: %w", o.dev.Name(), len(p), off, err)
	}
	return nil
}

// WriteAt implements Volume: every valid snapshot gets its copy of the
// chunks p overwrites before p reaches the origin. A snapshot whose copy
// fails (COW full, COW or origin read I/O error) is invalidated and
// skipped, as in the kernel; the write fails only if ctx ends, a store's
// lookup fails or the origin write itself fails.
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
	o.snapMu.RLock()
	defer o.snapMu.RUnlock()
	if err := o.copyBeforeOverwrite(ctx, off, int64(len(p))); err != nil {
		return fmt.Errorf("origin %s: write %d bytes at %d: %w", o.dev.Name(), len(p), off, err)
	}
	o.announceOverwrite(off, int64(len(p)))
	if err := writeDev(o.dev, p, off, fua); err != nil {
		return fmt.Errorf("origin %s: write %d bytes at %d: %w", o.dev.Name(), len(p), off, err)
	}
	if !fua {
		o.syncs.wrote()
	}
	return nil
}

// Flush implements Volume: it syncs the origin and every valid snapshot's
// COW device, each unless no write reached it since its last sync. A COW
// that fails to sync invalidates its snapshot rather than failing the
// origin's flush.
func (o *Origin) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := o.syncs.sync(o.dev); err != nil {
		return fmt.Errorf("origin %s: flush: %w", o.dev.Name(), err)
	}
	for _, s := range o.Snapshots() {
		if s.failure() != nil {
			continue
		}
		if err := s.flushCOW(ctx); err != nil {
			s.invalidate(ctx, fmt.Errorf("flush of COW %s: %w", s.cow.Name(), err))
		}
	}
	return nil
}

// copyBeforeOverwrite gives every valid snapshot its copy of the chunks
// that [off, off+n) overlaps and has no exception for, before the caller
// overwrites (or discards) that range of the origin. The caller holds
// o.snapMu shared until its own change to the origin is done.
func (o *Origin) copyBeforeOverwrite(ctx context.Context, off, n int64) error {
	var tasks []copyTask
	for _, s := range o.snaps {
		var err error
		if tasks, err = s.chunksToCopy(ctx, off, n, tasks); err != nil {
			return err
		}
	}
	// The copies run in parallel, largest chunk size first, so that their
	// commits share metadata writes; the caller waits for all of them.
	return forEachParallel(len(tasks), func(i int) error {
		if err := tasks[i].snap.copyChunkForOrigin(ctx, tasks[i].chunk); err != nil {
			return fmt.Errorf("snapshot %s: %w", tasks[i].snap.name, err)
		}
		return nil
	})
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

// copyTask is one chunk an origin write needs copied into one snapshot.
type copyTask struct {
	snap  *Snapshot
	chunk exstore.Chunk
}

// parallelLimit bounds the goroutines one request fans out to; the copies
// in flight are bounded per snapshot by CopiesInFlight anyway.
const parallelLimit = 64

// forEachParallel calls fn for 0..n-1, up to parallelLimit at a time (n of
// 1 runs inline), and returns the error of the lowest index that failed.
func forEachParallel(n int, fn func(i int) error) error {
	if n <= 1 {
		if n == 1 {
			return fn(0)
		}
		return nil
	}
	errs := make([]error, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(n, parallelLimit) {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				errs[i] = fn(i)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// checkRange fails unless [off, off+n) lies inside a volume of size bytes.
func checkRange(size, off, n int64) error {
	if off < 0 || n < 0 || n > size || off > size-n {
		return fmt.Errorf("%d bytes at offset %d (volume size %d): %w", n, off, size, blockdev.ErrOutOfRange)
	}
	return nil
}
