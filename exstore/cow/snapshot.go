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

// Snapshot is the view of an origin at the time the snapshot was taken,
// plus the snapshot's own writes. It implements Volume.
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
	invalid error      // set when this engine invalidates the snapshot or merges it
	// failed is set once invalid is, so that the I/O paths check for a
	// failure without taking mu.
	failed atomic.Bool
	// overflowed is set once an overflow-mode snapshot's write could not
	// allocate.
	overflowed atomic.Bool
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

// markFailed records err (which wraps exstore.ErrInvalid, or is ErrMerged)
// as the reason the snapshot is unusable, unless it has one already.
func (s *Snapshot) markFailed(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.invalid == nil {
		s.invalid = err
		s.failed.Store(true)
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
	if s.overflowed.Load() {
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
	if s.readInChunk(ctx, p, off) {
		return nil
	}
	if err := checkRange(s.size, off, int64(len(p))); err != nil {
		return fmt.Errorf("snapshot %s: read: %w", s.name, err)
	}
	err := ctx.Err()
	if err == nil {
		err = s.readRange(ctx, p, off)
	}
	if err != nil {
		return fmt.Errorf("snapshot %s: read %d bytes at %d: %w", s.name, len(p), off, err)
	}
	return nil
}

// WriteAt implements Volume.
func (s *Snapshot) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	var err error
	switch s.rewriteInChunk(ctx, p, off, fua) {
	case rewritten:
		return nil
	case firstWrite:
		// writeRange's checks passed and the lookup missed: what is left
		// is writeChunk's allocation.
		err = s.allocateChunk(ctx, exstore.Chunk(off/s.chunkBytes), off, p, int64(len(p)), fua)
	default:
		err = s.writeRange(ctx, off, int64(len(p)), p, fua)
	}
	if err != nil {
		return fmt.Errorf("snapshot %s: write %d bytes at %d: %w", s.name, len(p), off, err)
	}
	return nil
}

// chunkWrite is what rewriteInChunk did with a write.
type chunkWrite int

const (
	// notInChunk: nothing; the write takes the general path.
	notInChunk chunkWrite = iota
	// rewritten: the write is done.
	rewritten
	// firstWrite: the write is inside one chunk, passed writeRange's
	// checks, and the chunk had no exception when looked up: it needs
	// allocateChunk.
	firstWrite
)

// rewriteInChunk is the common write, of part of one chunk that has an
// exception already, in as few calls as can be, after the checks
// writeRange and writeChunk make. A write of part of one chunk without an
// exception comes back as firstWrite, so that its checks and lookup are
// not made twice; any other outcome (another request shape, a canceled
// context, a snapshot that is not writable, an error) comes back as
// notInChunk and takes writeRange, which writes again or fails it with
// its error. Writing the same data twice at the same place changes
// nothing.
func (s *Snapshot) rewriteInChunk(ctx context.Context, p []byte, off int64, fua bool) chunkWrite {
	n := int64(len(p))
	if n == 0 || off < 0 || off > s.size-n || off/s.chunkBytes != (off+n-1)/s.chunkBytes {
		return notInChunk
	}
	if a := s.ioAlign; a > 1 && ((off|n)&(a-1) != 0 || !memAligned(p, int(a))) {
		return notInChunk
	}
	if s.opts.ReadOnly || s.failed.Load() || s.overflowed.Load() || ctx.Err() != nil || s.store.Err() != nil {
		return notInChunk
	}
	c := exstore.Chunk(off / s.chunkBytes)
	new, found, err := s.lookup(ctx, c)
	switch {
	case err != nil:
		return notInChunk
	case !found:
		return firstWrite
	}
	at := s.cowOffset(c, new, off)
	if fua {
		_, err = s.cow.WriteAtSync(p, at)
	} else if _, err = s.cow.WriteAt(p, at); err == nil {
		s.syncs.wrote()
	}
	if err != nil {
		return notInChunk
	}
	return rewritten
}

// writeRange checks a write of n bytes at off to the snapshot and writes
// it chunk by chunk: data, or n zeroes if data is nil. The chunks are
// written in parallel, so that the commits of the chunks a large write
// allocates share metadata writes.
func (s *Snapshot) writeRange(ctx context.Context, off, n int64, data []byte, fua bool) error {
	if err := checkRange(s.size, off, n); err != nil {
		return err
	}
	if err := checkWriteAlignment(s.cow, off, n); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.writable(); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if c := off / s.chunkBytes; c == (off+n-1)/s.chunkBytes {
		// The common case of a request inside one chunk.
		return s.writeChunk(ctx, exstore.Chunk(c), off, data, n, fua)
	}
	type piece struct {
		c      exstore.Chunk
		at     int64
		lo, hi int64
	}
	var pieces []piece
	_ = s.eachChunk(off, n, func(c exstore.Chunk, at int64, lo, hi int64) error {
		pieces = append(pieces, piece{c, at, lo, hi})
		return nil
	})
	return forEachParallel(len(pieces), func(i int) error {
		pc := pieces[i]
		var part []byte
		if data != nil {
			part = data[pc.lo:pc.hi]
		}
		return s.writeChunk(ctx, pc.c, pc.at, part, pc.hi-pc.lo, fua)
	})
}

// Flush implements Volume: it syncs the COW device, and the origin, which
// the snapshot's chunks without exception read from, each unless no write
// reached it since its last sync.
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

// commit commits prepared e: lazily when allowed and the store can (a
// snapshot write without FUA owes durability only to the next flush, which
// the tracker then knows it must make), else durably before it returns.
func (s *Snapshot) commit(ctx context.Context, e exstore.Exception, lazy bool) error {
	if lazy && s.lazy != nil {
		if err := s.lazy.CommitLazy(ctx, e); err != nil {
			return err
		}
		s.syncs.wrote()
		return nil
	}
	return s.store.Commit(context.WithoutCancel(ctx), e)
}

// ensureDurable makes chunk c's exception, in COW chunk new, durable before
// an origin write overwrites c: a lazily committed one could otherwise be
// lost in a crash after the origin changed, and the snapshot would read the
// new data. A failure invalidates the snapshot; the origin write goes
// ahead.
func (s *Snapshot) ensureDurable(ctx context.Context, c, new exstore.Chunk) {
	if s.lazy == nil || s.lazy.Durable(new) {
		return
	}
	if err := s.lazy.Sync(context.WithoutCancel(ctx)); err != nil {
		s.invalidate(ctx, fmt.Errorf("chunk %d: writing its exception before an origin write: %w", c, err))
	}
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

// cowOffset is where byte at (in chunk old) lives on the COW device when
// old's data is in COW chunk new.
func (s *Snapshot) cowOffset(old, new exstore.Chunk, at int64) int64 {
	return int64(new)*s.chunkBytes + at - int64(old)*s.chunkBytes
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

// maxReadRunChunks bounds the chunks a read looks up and holds at once
// (a window), and so the chunks one read I/O covers.
const maxReadRunChunks = 64

// optimisticReadAttempts is how many times a read of a window tries
// without holding its chunks before it holds them (see chunkLocks).
const optimisticReadAttempts = 3

// readRange reads p at off, window by window of up to maxReadRunChunks
// chunks, and then fails if the snapshot is invalid. The check comes after
// the I/O, where it is needed anyway, rather than before too: a read of an
// invalid snapshot costs I/O that is thrown away, every other read one
// check less.
func (s *Snapshot) readRange(ctx context.Context, p []byte, off int64) error {
	if len(p) == 0 {
		return s.failure()
	}
	end := off + int64(len(p))
	last := exstore.Chunk((end - 1) / s.chunkBytes)
	for first := exstore.Chunk(off / s.chunkBytes); first <= last; first += maxReadRunChunks {
		windowEnd := min(last+1, first+maxReadRunChunks)
		from := max(off, int64(first)*s.chunkBytes)
		to := min(end, int64(windowEnd)*s.chunkBytes)
		if err := s.readWindow(ctx, first, windowEnd, from, p[from-off:to-off]); err != nil {
			return s.readFailure(err)
		}
	}
	// Origin writes skip an invalid snapshot: if it became invalid before
	// or during the read, the data may be the origin's new content.
	// Invalidity is permanent, so one check after every window covers them
	// all.
	return s.failure()
}

// readInChunk is the common read, of part of one chunk of a valid
// snapshot, in as few calls as can be: it reports whether it read p at
// off, and does nothing else when it did not. It is the first attempt of
// readWindow's, with the same checks; any other outcome (another request
// shape, a range past the end, a canceled context, an error, an invalid
// snapshot, an announcement during the read) leaves the request to the
// general path, which reads again, with its retries and its errors.
// Reading twice changes nothing, and on a cached 4 KiB read the general
// path's extra calls cost a measurable share.
func (s *Snapshot) readInChunk(ctx context.Context, p []byte, off int64) bool {
	n := int64(len(p))
	if n == 0 || off < 0 || off > s.size-n || off/s.chunkBytes != (off+n-1)/s.chunkBytes {
		return false
	}
	if a := s.ioAlign; a > 1 && ((off|n)&(a-1) != 0 || !memAligned(p, int(a))) {
		return false
	}
	if ctx.Err() != nil {
		return false
	}
	c := exstore.Chunk(off / s.chunkBytes)
	announced := &s.locks.overwrites[uint64(c)%chunkLockStripes]
	before := announced.Load()
	var (
		new     exstore.Chunk
		found   bool
		release exstore.Release
		token   uint64
		err     error
	)
	if s.optimistic != nil {
		var ok bool
		if new, found, token, ok = s.optimistic.LookupOptimistic(c); !ok {
			return false
		}
		release = exstore.NoRelease
	} else {
		new, found, release, err = s.store.Lookup(ctx, c)
	}
	if err == nil {
		dev, at := s.origin.dev, off
		if found {
			dev, at = s.cow, s.cowOffset(c, new, off)
		}
		var m int
		m, err = dev.ReadAt(p, at)
		if m == len(p) {
			err = nil
		}
	}
	release()
	return err == nil && announced.Load() == before && (s.optimistic == nil || s.optimistic.Unchanged(token)) &&
		!s.failed.Load() && s.store.Err() == nil
}

// readFailure is what a read that failed with err reports: the reason the
// snapshot is invalid, if it is (the validity check comes after the I/O,
// which may fail because of what made the snapshot invalid), else err.
func (s *Snapshot) readFailure(err error) error {
	if failure := s.failure(); failure != nil {
		return failure
	}
	return err
}

// readWindow reads p at at, which lies in chunks [first, end), at most
// maxReadRunChunks of them, again while an origin overwrite of its chunks
// was announced during the attempt (see chunkLocks), or the store could
// not vouch for the answers of its lookups done without holding them (see
// exstore.OptimisticLookuper), holding the chunks and the answers after
// optimisticReadAttempts.
func (s *Snapshot) readWindow(ctx context.Context, first, end exstore.Chunk, at int64, p []byte) error {
	for range optimisticReadAttempts {
		before := s.locks.announcements(first, end)
		valid, err := s.readWindowOnce(ctx, first, end, at, p, true)
		if err != nil || valid && s.locks.announcements(first, end) == before {
			return err
		}
	}
	// Holding the chunks, no exception for them can appear, so no origin
	// write can land on one this read found without: announcements during
	// this attempt do not matter.
	s.locks.lockRange(first, end)
	defer s.locks.unlockRange(first, end)
	_, err := s.readWindowOnce(ctx, first, end, at, p, false)
	return err
}

// readWindowOnce is one attempt of readWindow. The chunks are looked up
// together (one call for a store that is an exstore.RangeLookuper) and
// held by the store until the I/O is done, for stores shared with other
// nodes; or, with optimistic and a store that is an
// exstore.OptimisticLookuper, looked up without holding, and then valid
// reports whether the store vouches for the answers after the I/O. Runs
// of chunks whose data is contiguous are read with one I/O each: chunks
// without an exception from the origin, chunks whose exceptions are
// consecutive COW chunks from the COW device.
func (s *Snapshot) readWindowOnce(ctx context.Context, first, end exstore.Chunk, at int64, p []byte, optimistic bool) (valid bool, err error) {
	optimistic = optimistic && s.optimistic != nil
	if end-first == 1 {
		return s.readChunkOnce(ctx, first, at, p, optimistic)
	}
	if s.absence != nil && s.absence.NoExceptions(first, uint64(end-first)) {
		// Answers that need no holding, all misses: one origin read, with
		// no per-chunk answers to fetch and walk.
		if err := readDev(s.origin.dev, p, at); err != nil {
			return false, fmt.Errorf("chunks %d to %d: origin %s: %w", first, end-1, s.origin.dev.Name(), err)
		}
		return true, nil
	}
	// The answers come from a pool: a buffer passed to a store's method
	// escapes, and a window's is too big to allocate per read.
	statesp := s.lookups.Get().(*[maxReadRunChunks]exstore.LookupResult)
	defer s.lookups.Put(statesp)
	states := statesp[:end-first]
	release := exstore.NoRelease
	var token uint64
	if optimistic {
		token, optimistic = s.optimistic.LookupRangeOptimistic(first, states)
	}
	if !optimistic {
		release, err = s.lookupRange(ctx, first, states)
		defer release()
		if err != nil {
			return false, err
		}
	}
	for c := first; c < end; {
		st := states[c-first]
		runEnd := c + 1
		for runEnd < end {
			next := states[runEnd-first]
			if next.Found != st.Found || (st.Found && next.New != st.New+(runEnd-c)) {
				break
			}
			runEnd++
		}
		from := max(at, int64(c)*s.chunkBytes)
		to := min(at+int64(len(p)), int64(runEnd)*s.chunkBytes)
		q := p[from-at : to-at]
		if st.Found {
			if err := s.readCOW(c, st.New, from, q); err != nil {
				return false, err
			}
		} else {
			if err := readDev(s.origin.dev, q, from); err != nil {
				return false, fmt.Errorf("chunks %d to %d: origin %s: %w", c, runEnd-1, s.origin.dev.Name(), err)
			}
		}
		c = runEnd
	}
	return !optimistic || s.optimistic.Unchanged(token), nil
}

// readChunkOnce is readWindowOnce for a window of one chunk, c.
func (s *Snapshot) readChunkOnce(ctx context.Context, c exstore.Chunk, at int64, p []byte, optimistic bool) (valid bool, err error) {
	var (
		new     exstore.Chunk
		found   bool
		release = exstore.NoRelease
		token   uint64
	)
	if optimistic {
		new, found, token, optimistic = s.optimistic.LookupOptimistic(c)
	}
	if !optimistic {
		new, found, release, err = s.store.Lookup(ctx, c)
		defer release()
		if err != nil {
			return false, fmt.Errorf("chunk %d: lookup: %w", c, err)
		}
	}
	if found {
		err = s.readCOW(c, new, at, p)
	} else if err = readDev(s.origin.dev, p, at); err != nil {
		err = fmt.Errorf("chunk %d: origin %s: %w", c, s.origin.dev.Name(), err)
	}
	return err == nil && (!optimistic || s.optimistic.Unchanged(token)), err
}

// lookupRange looks up chunks first.. into into, with one call if the
// store is an exstore.RangeLookuper, and returns the release of them all.
func (s *Snapshot) lookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	if rl, ok := s.store.(exstore.RangeLookuper); ok {
		release, err := rl.LookupRange(ctx, first, into)
		if err != nil {
			return release, fmt.Errorf("chunks %d to %d: lookup: %w", first, first+exstore.Chunk(len(into))-1, err)
		}
		return release, nil
	}
	releases := make([]exstore.Release, 0, len(into))
	releaseAll := func() {
		for _, release := range releases {
			release()
		}
	}
	for i := range into {
		c := first + exstore.Chunk(i)
		new, found, release, err := s.store.Lookup(ctx, c)
		releases = append(releases, release)
		if err != nil {
			return releaseAll, fmt.Errorf("chunk %d: lookup: %w", c, err)
		}
		into[i] = exstore.LookupResult{New: new, Found: found}
	}
	return releaseAll, nil
}

// readCOW reads p at at of chunk old from its COW chunk new.
func (s *Snapshot) readCOW(old, new exstore.Chunk, at int64, p []byte) error {
	if err := readDev(s.cow, p, s.cowOffset(old, new, at)); err != nil {
		return fmt.Errorf("chunk %d: COW chunk %d: %w", old, new, err)
	}
	return nil
}

// putCOW writes the n bytes of data (n zeroes if data is nil) at at of
// chunk old to its COW chunk new.
func (s *Snapshot) putCOW(old, new exstore.Chunk, at int64, data []byte, n int64, fua bool) error {
	cowOff := s.cowOffset(old, new, at)
	var err error
	if data != nil {
		err = writeDev(s.cow, data, cowOff, fua)
	} else {
		err = writeZeroesDev(s.cow, s.zeroes(), cowOff, n, fua)
	}
	if err != nil {
		return fmt.Errorf("chunk %d: COW chunk %d: %w", old, new, err)
	}
	if !fua {
		s.syncs.wrote()
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

// writeChunk writes the n bytes of data (n zeroes if data is nil) at at,
// all inside chunk c.
func (s *Snapshot) writeChunk(ctx context.Context, c exstore.Chunk, at int64, data []byte, n int64, fua bool) error {
	new, found, err := s.lookup(ctx, c)
	if err != nil {
		return err
	}
	if found {
		return s.putCOW(c, new, at, data, n, fua)
	}
	return s.allocateChunk(ctx, c, at, data, n, fua)
}

// allocateChunk is writeChunk for chunk c that had no exception when
// looked up: it allocates one (unless another goroutine or node did
// meanwhile) and writes.
func (s *Snapshot) allocateChunk(ctx context.Context, c exstore.Chunk, at int64, data []byte, n int64, fua bool) error {
	releaseSlot, err := s.acquireCopySlot(ctx)
	if err != nil {
		return err
	}
	defer releaseSlot()
	s.locks.lock(c)
	defer s.locks.unlock(c)
	if err := s.writable(); err != nil {
		return err
	}
	if new, found, err := s.lookup(ctx, c); err != nil {
		return err
	} else if found {
		return s.putCOW(c, new, at, data, n, fua)
	}
	e, err := s.store.Prepare(ctx, c)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, exstore.ErrExists):
		// Another node sharing the store added the exception after our
		// lookup: write to its chunk.
		new, found, err := s.lookup(ctx, c)
		if err != nil {
			return err
		} else if !found {
			return fmt.Errorf("chunk %d: allocate: %w, but the lookup after it misses", c, exstore.ErrExists)
		}
		return s.putCOW(c, new, at, data, n, fua)
	case errors.Is(err, exstore.ErrNoSpace) && s.opts.Overflow:
		s.overflowed.Store(true)
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
	if at == chunkStart && n == min(s.chunkBytes, s.size-chunkStart) {
		// The write replaces the whole chunk: no copy, the data itself is
		// what the commit makes durable and visible. With fua it is written
		// durably itself too: a store without metadata does not sync.
		if err := s.putCOW(c, e.New, at, data, n, fua); err != nil {
			s.store.Abort(e)
			s.invalidate(ctx, err)
			return s.failure()
		}
		if err := s.commit(ctx, e, !fua); err != nil {
			s.invalidate(ctx, fmt.Errorf("commit of exception %v: %w", e, err))
			return s.failure()
		}
		return nil
	}
	if !s.copyAndCommit(ctx, e, !fua) {
		return s.failure()
	}
	return s.putCOW(c, e.New, at, data, n, fua)
}

// skipForOrigin reports whether origin writes may skip the snapshot: it is
// invalid or merged, so nothing it shows must be kept. Any other failure
// of its store (a clustered store whose node lost the cluster lock: the
// snapshot is valid for the other nodes) fails the origin write instead, as
// overwriting the origin without the copy would corrupt the snapshot.
func (s *Snapshot) skipForOrigin() (bool, error) {
	err := s.failure()
	if err == nil {
		return false, nil
	}
	if errors.Is(err, exstore.ErrInvalid) || errors.Is(err, ErrMerged) {
		return true, nil
	}
	return false, fmt.Errorf("snapshot %s: %w", s.name, err)
}

// chunksToCopy appends to tasks the chunks that an origin write of n bytes
// at off overwrites and the snapshot has no exception for. An invalid
// snapshot needs none.
func (s *Snapshot) chunksToCopy(ctx context.Context, off, n int64, tasks []copyTask) ([]copyTask, error) {
	if skip, err := s.skipForOrigin(); skip || err != nil {
		return tasks, err
	}
	for c := off / s.chunkBytes; c <= (off+n-1)/s.chunkBytes; c++ {
		new, found, err := s.lookup(ctx, exstore.Chunk(c))
		if err != nil {
			return tasks, fmt.Errorf("snapshot %s: %w", s.name, err)
		}
		if !found {
			tasks = append(tasks, copyTask{snap: s, chunk: exstore.Chunk(c)})
		} else {
			s.ensureDurable(ctx, exstore.Chunk(c), new)
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
	s.locks.lock(c)
	defer s.locks.unlock(c)
	if skip, err := s.skipForOrigin(); skip || err != nil {
		return err
	}
	if new, found, err := s.lookup(ctx, c); err != nil {
		return err
	} else if found {
		// A snapshot write allocated it since chunksToCopy looked.
		s.ensureDurable(ctx, c, new)
		return nil
	}
	e, err := s.store.Prepare(ctx, c)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, exstore.ErrExists):
		// Another node sharing the store copied the chunk after our
		// lookup: the snapshot has its data.
		return nil
	case errors.Is(err, exstore.ErrInvalid):
		s.markFailed(err)
		return nil
	default:
		// The kernel invalidates on any allocation failure here: the
		// origin write must go ahead and the snapshot cannot keep its data.
		s.invalidate(ctx, allocationFailure(c, err))
		return nil
	}
	s.copyAndCommit(ctx, e, false)
	return nil
}

// copyAndCommit copies the origin chunk of prepared exception e to its COW
// chunk and commits e (lazily if lazy: see commit). It reports whether that worked; any failure, of the
// origin read as of the COW write or the commit, invalidates the snapshot
// as in the kernel (a failed copy leaves a prepared exception that the
// store cannot hand out again before a reload).
func (s *Snapshot) copyAndCommit(ctx context.Context, e exstore.Exception, lazy bool) bool {
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
	if err := s.commit(ctx, e, lazy); err != nil {
		s.invalidate(ctx, fmt.Errorf("commit of exception %v: %w", e, err))
		return false
	}
	return true
}
