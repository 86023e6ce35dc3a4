package cow

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// ErrReadOnly is wrapped by writes to a read-only snapshot.
var ErrReadOnly = errors.New("snapshot is read-only")

// ErrOverflow is wrapped by the errors of a snapshot in overflow mode whose
// writes can no longer allocate: the COW device is full. Reads keep working.
var ErrOverflow = errors.New("snapshot overflowed: the COW device is full")

// ErrCOWFull is the reason a snapshot is invalidated when its COW device
// fills up (and it is not in overflow mode, or an origin write needed the
// copy). The snapshot's errors then wrap both it and exstore.ErrInvalid.
var ErrCOWFull = errors.New("the COW device filled up")

// Snapshot is the view of an origin at the time the snapshot was taken,
// plus the snapshot's own writes.
type Snapshot struct {
	origin *Origin
	name   string
	store  exstore.Store
	// lazy is store as an exstore.LazyCommitter, nil if it is not one:
	// then every exception is committed durably before its write returns.
	lazy exstore.LazyCommitter
	// optimistic is store as an exstore.OptimisticLookuper, nil if it is
	// not one: then reads hold their lookups' answers until their I/O is
	// done.
	optimistic exstore.OptimisticLookuper
	// absence is store as an exstore.AbsenceChecker, nil if it is not one:
	// then every read of several chunks looks each up.
	absence    exstore.AbsenceChecker
	cow        blockdev.Device
	opts       SnapshotOptions
	size       int64
	chunkBytes int64
	// ioAlign is the larger of the origin's and the COW's I/O alignment.
	ioAlign int64

	// locks is the pending-exception table (the COW path holds a chunk
	// from its lookup to its commit) and the origin writes' announcements
	// that snapshot reads check (see chunkLocks).
	locks chunkLocks
	// copies bounds the chunk copies in flight (CopiesInFlight). A slot is
	// taken before the chunk lock and before Prepare: the store commits in
	// allocation order, so a goroutine that prepared must never wait for a
	// slot held by one whose commit waits for it.
	copies chan struct{}
	// buffers holds chunk-sized, suitably aligned copy buffers.
	buffers sync.Pool
	// lookups holds *[maxReadRunChunks]exstore.LookupResult for reads.
	lookups sync.Pool
	// zeroes returns a zero-filled buffer of up to a chunk (at most
	// zeroBufferBytes), aligned for the COW device, allocated on first use:
	// WriteZeroes writes from it.
	zeroes func() []byte

	// syncs tells the flushes whether cow has writes to make durable.
	syncs syncTracker

	mu      sync.Mutex // guards invalid
	invalid error      // set when this engine invalidates, removes or merges the snapshot, or while it merges
	// failed is set once invalid is, so that the I/O paths check for a
	// failure without taking mu.
	failed atomic.Bool
	// overflowed is set once an overflow-mode snapshot's write could not
	// allocate.
	overflowed atomic.Bool

	// marker records a merge of the snapshot (SetMergeMarker), nil for
	// nowhere.
	marker atomic.Pointer[MergeMarker]
}

// newSnapshot returns a snapshot of o over store on cow; AddSnapshot checks
// the arguments and registers it.
func newSnapshot(o *Origin, name string, store exstore.Store, cow blockdev.Device, opts SnapshotOptions) *Snapshot {
	chunkBytes := int64(store.ChunkSectors()) * exstore.SectorSize
	align := max(o.dev.Alignment(), cow.Alignment(), 1)
	s := &Snapshot{
		origin:     o,
		name:       name,
		store:      store,
		cow:        cow,
		opts:       opts,
		size:       o.size,
		chunkBytes: chunkBytes,
		ioAlign:    int64(align),
		copies:     make(chan struct{}, CopiesInFlight),
		zeroes:     zeroBuffer(min(chunkBytes, zeroBufferBytes), cow.Alignment()),
	}
	s.lazy, _ = store.(exstore.LazyCommitter)
	s.optimistic, _ = store.(exstore.OptimisticLookuper)
	s.absence, _ = store.(exstore.AbsenceChecker)
	s.lookups.New = func() any { return new([maxReadRunChunks]exstore.LookupResult) }
	s.buffers.New = func() any {
		b := blockdev.AlignedBuffer(int(chunkBytes), align)
		return &b
	}
	return s
}

// Name returns the snapshot's name.
func (s *Snapshot) Name() string { return s.name }

// Origin returns the origin the snapshot is of.
func (s *Snapshot) Origin() *Origin { return s.origin }

// Store returns the snapshot's exception store.
func (s *Snapshot) Store() exstore.Store { return s.store }

// COW returns the snapshot's COW device.
func (s *Snapshot) COW() blockdev.Device { return s.cow }

// ChunkSectors returns the chunk size in 512-byte sectors.
func (s *Snapshot) ChunkSectors() uint32 { return s.store.ChunkSectors() }

// Options returns the options the snapshot was added with.
func (s *Snapshot) Options() SnapshotOptions { return s.opts }

// Size is the snapshot's size in bytes: the origin's.
func (s *Snapshot) Size() int64 { return s.size }

// Err is nil while the snapshot is valid and not overflowed. Once it is
// invalid it wraps exstore.ErrInvalid (and ErrCOWFull if the COW filled
// up); once it overflowed it wraps ErrOverflow; once it was merged into its
// origin it wraps ErrMerged.
func (s *Snapshot) Err() error {
	if err := s.failure(); err != nil {
		return fmt.Errorf("snapshot %s: %w", s.name, err)
	}
	if s.overflowed.Load() {
		return fmt.Errorf("snapshot %s: %w", s.name, ErrOverflow)
	}
	return nil
}

// failure is the reason the snapshot is invalid (or merged), nil while it
// is valid.
func (s *Snapshot) failure() error {
	if s.failed.Load() {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.invalid
	}
	return s.store.Err()
}

// markFailed records err (which wraps exstore.ErrInvalid, or is ErrMerged
// or ErrRemoved)
// as the reason the snapshot is unusable, unless it has one already.
func (s *Snapshot) markFailed(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.invalid == nil {
		s.invalid = err
		s.failed.Store(true)
	}
}

// invalidate marks the snapshot invalid with reason, and its store
// durably where it can, and returns nil: as in the kernel, an origin write
// then goes ahead without the snapshot. But if the store has stopped for
// another reason than invalidity (a clustered store whose node lost the
// cluster lock), the snapshot is valid for the other nodes: invalidate
// marks nothing and returns that reason, which fails an origin write.
func (s *Snapshot) invalidate(ctx context.Context, reason error) error {
	if err := s.storeStopped(); err != nil {
		return err
	}
	s.markFailed(&exstore.InvalidError{Device: s.cow.Name(), Reason: reason})
	_ = s.store.Invalidate(context.WithoutCancel(ctx), reason)
	return nil
}

// storeStopped is the store's error if it has stopped for another reason
// than invalidity, else nil. It takes precedence over the snapshot's own
// mark (a node may lose the lock after it marked the snapshot invalid), so
// that a node that lost the lock never writes the origin past the
// snapshot.
func (s *Snapshot) storeStopped() error {
	if err := s.store.Err(); err != nil && !errors.Is(err, exstore.ErrInvalid) {
		return fmt.Errorf("snapshot %s: %w", s.name, err)
	}
	return nil
}

// writable fails if the snapshot is invalid, read-only or overflowed.
func (s *Snapshot) writable() error {
	if s.opts.ReadOnly {
		return ErrReadOnly
	}
	if err := s.failure(); err != nil {
		return err
	}
	if s.overflowed.Load() {
		return ErrOverflow
	}
	return nil
}

// Flush makes every snapshot write that completed before it durable: it
// syncs the COW device, and the origin, which the snapshot's chunks without
// exception read from, each unless no write reached it since its last
// sync.
func (s *Snapshot) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.flushCOW(ctx); err != nil {
		return fmt.Errorf("snapshot %s: flush: %w", s.name, err)
	}
	if err := s.origin.syncs.sync(s.origin.dev); err != nil {
		return fmt.Errorf("snapshot %s: flush origin: %w", s.name, err)
	}
	return nil
}

// flushCOW makes every write to the COW device that completed, and every
// exception committed, before the call durable, unless none happened since
// the last flush: with a store that commits lazily its Sync does both
// (one device flush, then the metadata), otherwise a device sync.
func (s *Snapshot) flushCOW(ctx context.Context) error {
	if s.lazy == nil {
		return s.syncs.sync(s.cow)
	}
	return s.syncs.syncWith(func() error { return s.lazy.Sync(ctx) })
}

// lookup asks the store about c and releases the answer at once: for
// callers that either only need to know an exception exists (exceptions
// are never removed outside merge) or hold c's chunk lock. Since nothing
// is held, an optimistic answer is as good as a held one, and cheaper from
// a store shared with other nodes.
func (s *Snapshot) lookup(ctx context.Context, c exstore.Chunk) (exstore.Chunk, bool, error) {
	if s.optimistic != nil {
		if new, found, _, ok := s.optimistic.LookupOptimistic(c); ok {
			return new, found, nil
		}
	}
	new, found, release, err := s.store.Lookup(ctx, c)
	release()
	if err != nil {
		return 0, false, fmt.Errorf("chunk %d: lookup: %w", c, err)
	}
	return new, found, nil
}

// eachChunk calls fn for each piece of [off, off+n) that lies in one chunk:
// the chunk, the piece's offset, and its bounds within the request.
func (s *Snapshot) eachChunk(off, n int64, fn func(c exstore.Chunk, at int64, lo, hi int64) error) error {
	for lo := int64(0); lo < n; {
		at := off + lo
		c := at / s.chunkBytes
		hi := lo + min((c+1)*s.chunkBytes-at, n-lo)
		if err := fn(exstore.Chunk(c), at, lo, hi); err != nil {
			return err
		}
		lo = hi
	}
	return nil
}

// inOneChunk reports whether p at off is the request the one-chunk fast
// paths take: not empty, inside the volume and inside one chunk, and
// aligned (offset, length and memory) as both devices need.
func (s *Snapshot) inOneChunk(p []byte, off int64) bool {
	n := int64(len(p))
	if n == 0 || off < 0 || off > s.size-n || off/s.chunkBytes != (off+n-1)/s.chunkBytes {
		return false
	}
	a := s.ioAlign
	return a <= 1 || (off|n)&(a-1) == 0 && memAligned(p, int(a))
}

// cowOffset is where byte at (in chunk old) lives on the COW device when
// old's data is in COW chunk new.
func (s *Snapshot) cowOffset(old, new exstore.Chunk, at int64) int64 {
	return int64(new)*s.chunkBytes + at - int64(old)*s.chunkBytes
}
