package cow

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Snapshot is the view of an origin at the time the snapshot was taken,
// plus the snapshot's own writes. It implements Volume.
type Snapshot struct {
	origin     *Origin
	name       string
	store      exstore.Store
	cow        blockdev.Device
	opts       SnapshotOptions
	size       int64
	chunkBytes int64

	// locks is the pending-exception table: the COW path holds a chunk
	// exclusively from its lookup to its commit, snapshot reads that go to
	// the origin hold it shared.
	locks chunkLocks
	// copies bounds the chunk copies in flight (CopiesInFlight). A slot is
	// taken before the chunk lock and before Prepare: the store commits in
	// allocation order, so a goroutine that prepared must never wait for a
	// slot held by one whose commit waits for it.
	copies chan struct{}
	// buffers holds chunk-sized, suitably aligned copy buffers.
	buffers sync.Pool

	mu         sync.Mutex
	invalid    error // set when this engine invalidates the snapshot or merges it
	overflowed bool
}

var _ Volume = (*Snapshot)(nil)

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
		locks:      chunkLocks{held: make(map[exstore.Chunk]*chunkLock)},
		copies:     make(chan struct{}, CopiesInFlight),
	}
	s.buffers.New = func() any {
		b := blockdev.AlignedBuffer(int(chunkBytes), align)
		return &b
	}
	return s
}

// Name returns the snapshot's name.
func (s *Snapshot) Name() string { return s.name }

// Store returns the snapshot's exception store.
func (s *Snapshot) Store() exstore.Store { return s.store }

// COW returns the snapshot's COW device.
func (s *Snapshot) COW() blockdev.Device { return s.cow }

// ChunkSectors returns the chunk size in 512-byte sectors.
func (s *Snapshot) ChunkSectors() uint32 { return s.store.ChunkSectors() }

// Options returns the options the snapshot was added with.
func (s *Snapshot) Options() SnapshotOptions { return s.opts }

// Size implements Volume: the origin's size.
func (s *Snapshot) Size() int64 { return s.size }

// Err is nil while the snapshot is valid and not overflowed. Once it is
// invalid it wraps exstore.ErrInvalid (and ErrCOWFull if the COW filled
// up); once it overflowed it wraps ErrOverflow; once it was merged into its
// origin it wraps ErrMerged.
func (s *Snapshot) Err() error {
	if err := s.failure(); err != nil {
		return fmt.Errorf("snapshot %s: %w", s.name, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.overflowed {
		return fmt.Errorf("snapshot %s: %w", s.name, ErrOverflow)
	}
	return nil
}

// failure is the reason the snapshot is invalid (or merged), nil while it
// is valid.
func (s *Snapshot) failure() error {
	s.mu.Lock()
	invalid := s.invalid
	s.mu.Unlock()
	if invalid != nil {
		return invalid
	}
	return s.store.Err()
}

// markFailed records err (which wraps exstore.ErrInvalid, or is ErrMerged)
// as the reason the snapshot is unusable, unless it has one already.
func (s *Snapshot) markFailed(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.invalid == nil {
		s.invalid = err
	}
}

// invalidate marks the snapshot invalid at once, so origin writes skip it
// from now on, and then durably in its store. The store logs a failure to
// write its header; the snapshot is invalid either way, and the callers
// (origin writes among them) must not fail because of it.
func (s *Snapshot) invalidate(ctx context.Context, reason error) {
	s.markFailed(&exstore.InvalidError{Device: s.cow.Name(), Reason: reason})
	_ = s.store.Invalidate(context.WithoutCancel(ctx), reason)
}

// writable fails if the snapshot is invalid, read-only or overflowed.
func (s *Snapshot) writable() error {
	if s.opts.ReadOnly {
		return ErrReadOnly
	}
	if err := s.failure(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.overflowed {
		return ErrOverflow
	}
	return nil
}

// allocationFailure is the reason to invalidate the snapshot after Prepare
// of chunk c failed with err.
func allocationFailure(c exstore.Chunk, err error) error {
	if errors.Is(err, exstore.ErrNoSpace) {
		return fmt.Errorf("chunk %d: %w: %w", c, ErrCOWFull, err)
	}
	return fmt.Errorf("chunk %d: allocation failed: %w", c, err)
}

// ReadAt implements Volume.
func (s *Snapshot) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := checkRange(s.size, off, len(p)); err != nil {
		return fmt.Errorf("snapshot %s: read: %w", s.name, err)
	}
	err := ctx.Err()
	if err == nil {
		err = s.failure()
	}
	if err == nil {
		err = s.eachChunk(off, len(p), func(c exstore.Chunk, at int64, lo, hi int) error {
			return s.readChunk(ctx, c, at, p[lo:hi])
		})
	}
	if err != nil {
		return fmt.Errorf("snapshot %s: read %d bytes at %d: %w", s.name, len(p), off, err)
	}
	return nil
}

// WriteAt implements Volume.
func (s *Snapshot) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if err := checkRange(s.size, off, len(p)); err != nil {
		return fmt.Errorf("snapshot %s: write: %w", s.name, err)
	}
	if err := checkWriteAlignment(s.cow, off, len(p)); err != nil {
		return fmt.Errorf("snapshot %s: write: %w", s.name, err)
	}
	err := ctx.Err()
	if err == nil {
		err = s.writable()
	}
	if err == nil {
		// The chunks are written in parallel, so that the commits of the
		// chunks a large write allocates share metadata writes.
		type piece struct {
			c      exstore.Chunk
			at     int64
			lo, hi int
		}
		var pieces []piece
		_ = s.eachChunk(off, len(p), func(c exstore.Chunk, at int64, lo, hi int) error {
			pieces = append(pieces, piece{c, at, lo, hi})
			return nil
		})
		err = forEachParallel(len(pieces), func(i int) error {
			pc := pieces[i]
			return s.writeChunk(ctx, pc.c, pc.at, p[pc.lo:pc.hi], fua)
		})
	}
	if err != nil {
		return fmt.Errorf("snapshot %s: write %d bytes at %d: %w", s.name, len(p), off, err)
	}
	return nil
}

// Flush implements Volume: it syncs the COW device, and the origin, which
// the snapshot's chunks without exception read from.
func (s *Snapshot) Flush(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.cow.Sync(); err != nil {
		return fmt.Errorf("snapshot %s: flush: %w", s.name, err)
	}
	if err := s.origin.dev.Sync(); err != nil {
		return fmt.Errorf("snapshot %s: flush origin: %w", s.name, err)
	}
	return nil
}

// eachChunk calls fn for each piece of [off, off+n) that lies in one chunk:
// the chunk, the piece's offset, and its bounds within the request.
func (s *Snapshot) eachChunk(off int64, n int, fn func(c exstore.Chunk, at int64, lo, hi int) error) error {
	for lo := 0; lo < n; {
		at := off + int64(lo)
		c := at / s.chunkBytes
		hi := lo + int(min((c+1)*s.chunkBytes-at, int64(n-lo)))
		if err := fn(exstore.Chunk(c), at, lo, hi); err != nil {
			return err
		}
		lo = hi
	}
	return nil
}

// cowOffset is where byte at (in chunk old) lives on the COW device when
// old's data is in COW chunk new.
func (s *Snapshot) cowOffset(old, new exstore.Chunk, at int64) int64 {
	return int64(new)*s.chunkBytes + at - int64(old)*s.chunkBytes
}

// lookup asks the store about c and releases the answer at once: for
// callers that either only need to know an exception exists (exceptions
// are never removed outside merge) or hold c's chunk lock.
func (s *Snapshot) lookup(ctx context.Context, c exstore.Chunk) (exstore.Chunk, bool, error) {
	new, found, release, err := s.store.Lookup(ctx, c)
	release()
	if err != nil {
		return 0, false, fmt.Errorf("chunk %d: lookup: %w", c, err)
	}
	return new, found, nil
}

// readChunk reads p at at, all inside chunk c.
func (s *Snapshot) readChunk(ctx context.Context, c exstore.Chunk, at int64, p []byte) error {
	new, found, err := s.lookup(ctx, c)
	if err != nil {
		return err
	}
	if found {
		return s.readCOW(c, new, at, p)
	}
	// The origin is read with the chunk held shared: its COW cannot start,
	// so no origin write overwrites the chunk under the read. The store's
	// lookup is held too, for stores shared with other nodes.
	unlock := s.locks.rlock(c)
	defer unlock()
	new, found, release, err := s.store.Lookup(ctx, c)
	defer release()
	if err != nil {
		return fmt.Errorf("chunk %d: lookup: %w", c, err)
	}
	if found {
		return s.readCOW(c, new, at, p)
	}
	if err := readDev(s.origin.dev, p, at); err != nil {
		return fmt.Errorf("chunk %d: origin %s: %w", c, s.origin.dev.Name(), err)
	}
	// Origin writes skip an invalid snapshot: if it became invalid during
	// the read, the data may be the origin's new content.
	return s.failure()
}

// readCOW reads p at at of chunk old from its COW chunk new.
func (s *Snapshot) readCOW(old, new exstore.Chunk, at int64, p []byte) error {
	if err := readDev(s.cow, p, s.cowOffset(old, new, at)); err != nil {
		return fmt.Errorf("chunk %d: COW chunk %d: %w", old, new, err)
	}
	return nil
}

// writeCOW writes p at at of chunk old to its COW chunk new.
func (s *Snapshot) writeCOW(old, new exstore.Chunk, at int64, p []byte, fua bool) error {
	if err := writeDev(s.cow, p, s.cowOffset(old, new, at), fua); err != nil {
		return fmt.Errorf("chunk %d: COW chunk %d: %w", old, new, err)
	}
	return nil
}

// acquireCopySlot takes one of the snapshot's copy slots.
func (s *Snapshot) acquireCopySlot(ctx context.Context) (release func(), err error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	select {
	case s.copies <- struct{}{}:
		return func() { <-s.copies }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// writeChunk writes p at at, all inside chunk c.
func (s *Snapshot) writeChunk(ctx context.Context, c exstore.Chunk, at int64, p []byte, fua bool) error {
	new, found, err := s.lookup(ctx, c)
	if err != nil {
		return err
	}
	if found {
		return s.writeCOW(c, new, at, p, fua)
	}
	releaseSlot, err := s.acquireCopySlot(ctx)
	if err != nil {
		return err
	}
	defer releaseSlot()
	unlock := s.locks.lock(c)
	defer unlock()
	if err := s.writable(); err != nil {
		return err
	}
	if new, found, err = s.lookup(ctx, c); err != nil {
		return err
	} else if found {
		return s.writeCOW(c, new, at, p, fua)
	}
	e, err := s.store.Prepare(ctx, c)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, exstore.ErrNoSpace) && s.opts.Overflow:
		s.mu.Lock()
		s.overflowed = true
		s.mu.Unlock()
		return fmt.Errorf("chunk %d: %w", c, ErrOverflow)
	case errors.Is(err, exstore.ErrInvalid):
		s.markFailed(err)
		return err
	case errors.Is(err, exstore.ErrNoSpace):
		s.invalidate(ctx, allocationFailure(c, err))
		return s.failure()
	default:
		return fmt.Errorf("chunk %d: allocate: %w", c, err)
	}

	chunkStart := int64(c) * s.chunkBytes
	if at == chunkStart && int64(len(p)) == min(s.chunkBytes, s.size-chunkStart) {
		// The write replaces the whole chunk: no copy, the data itself is
		// what the commit makes durable and visible. With fua it is written
		// durably itself too: a store without metadata does not sync.
		if err := s.writeCOW(c, e.New, at, p, fua); err != nil {
			s.store.Abort(e)
			s.invalidate(ctx, err)
			return s.failure()
		}
		if err := s.store.Commit(context.WithoutCancel(ctx), e); err != nil {
			s.invalidate(ctx, fmt.Errorf("commit of exception %v: %w", e, err))
			return s.failure()
		}
		return nil
	}
	if !s.copyAndCommit(ctx, e) {
		return s.failure()
	}
	return s.writeCOW(c, e.New, at, p, fua)
}

// chunksToCopy appends to tasks the chunks that an origin write of n bytes
// at off overwrites and the snapshot has no exception for. An invalid
// snapshot needs none.
func (s *Snapshot) chunksToCopy(ctx context.Context, off, n int64, tasks []copyTask) ([]copyTask, error) {
	if s.failure() != nil {
		return tasks, nil
	}
	for c := off / s.chunkBytes; c <= (off+n-1)/s.chunkBytes; c++ {
		_, found, err := s.lookup(ctx, exstore.Chunk(c))
		if err != nil {
			return tasks, fmt.Errorf("snapshot %s: %w", s.name, err)
		}
		if !found {
			tasks = append(tasks, copyTask{snap: s, chunk: exstore.Chunk(c)})
		}
	}
	return tasks, nil
}

// copyChunkForOrigin makes sure chunk c has an exception (or the snapshot
// is invalid) before an origin write overwrites it. It fails only if ctx
// ends or a lookup fails; a failed copy invalidates the snapshot instead,
// and the origin write goes ahead.
func (s *Snapshot) copyChunkForOrigin(ctx context.Context, c exstore.Chunk) error {
	releaseSlot, err := s.acquireCopySlot(ctx)
	if err != nil {
		return err
	}
	defer releaseSlot()
	unlock := s.locks.lock(c)
	defer unlock()
	if s.failure() != nil {
		return nil
	}
	if _, found, err := s.lookup(ctx, c); err != nil || found {
		return err
	}
	e, err := s.store.Prepare(ctx, c)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, exstore.ErrInvalid):
		s.markFailed(err)
		return nil
	default:
		// The kernel invalidates on any allocation failure here: the
		// origin write must go ahead and the snapshot cannot keep its data.
		s.invalidate(ctx, allocationFailure(c, err))
		return nil
	}
	s.copyAndCommit(ctx, e)
	return nil
}

// copyAndCommit copies the origin chunk of prepared exception e to its COW
// chunk and commits e. It reports whether that worked; any failure, of the
// origin read as of the COW write or the commit, invalidates the snapshot
// as in the kernel (a failed copy leaves a prepared exception that the
// store cannot hand out again before a reload).
func (s *Snapshot) copyAndCommit(ctx context.Context, e exstore.Exception) bool {
	bufp := s.buffers.Get().(*[]byte)
	defer s.buffers.Put(bufp)
	buf := *bufp
	chunkStart := int64(e.Old) * s.chunkBytes
	// The origin's last chunk may be partial: copy only what exists.
	n := min(s.chunkBytes, s.size-chunkStart)
	if err := readDev(s.origin.dev, buf[:n], chunkStart); err != nil {
		s.store.Abort(e)
		s.invalidate(ctx, fmt.Errorf("copy of chunk %d from origin %s: %w", e.Old, s.origin.dev.Name(), err))
		return false
	}
	clear(buf[n:])
	wn := min(alignUp(n, int64(s.cow.Alignment())), s.chunkBytes)
	if err := writeDev(s.cow, buf[:wn], int64(e.New)*s.chunkBytes, false); err != nil {
		s.store.Abort(e)
		s.invalidate(ctx, fmt.Errorf("copy of chunk %d to COW chunk %d: %w", e.Old, e.New, err))
		return false
	}
	if err := s.store.Commit(context.WithoutCancel(ctx), e); err != nil {
		s.invalidate(ctx, fmt.Errorf("commit of exception %v: %w", e, err))
		return false
	}
	return true
}
