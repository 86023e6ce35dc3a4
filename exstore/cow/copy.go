package cow

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
)

// CopiesInFlight bounds the chunk copies (and allocations) one snapshot has
// in flight: the kernel's snapshot_cow_threshold default.
const CopiesInFlight = 2048

// copyTask is one chunk an origin change needs copied into one snapshot.
type copyTask struct {
	snap  *Snapshot
	chunk exstore.Chunk
}

// run makes the copy.
func (t copyTask) run(ctx context.Context) error {
	if err := t.snap.copyChunkForOrigin(ctx, t.chunk); err != nil {
		return fmt.Errorf("snapshot %s: %w", t.snap.name, err)
	}
	return nil
}

// copyBeforeOverwrite gives every valid snapshot but except (nil for none)
// its copy of the chunks that [off, off+n) overlaps and has no exception
// for, before the caller overwrites (or discards) that range of the
// origin. The caller holds o.snapMu shared until its own change to the
// origin is done.
func (o *Origin) copyBeforeOverwrite(ctx context.Context, off, n int64, except *Snapshot) error {
	var tasks []copyTask
	for _, s := range o.snaps {
		if s == except {
			continue
		}
		var err error
		if tasks, err = s.chunksToCopy(ctx, off, n, tasks); err != nil {
			return err
		}
	}
	switch len(tasks) {
	case 0:
		// The common rewrite of chunks every snapshot has copied.
		return nil
	case 1:
		return tasks[0].run(ctx)
	}
	// The copies run in parallel, largest chunk size first, so that their
	// commits share metadata writes; the caller waits for all of them.
	// all, never reassigned, is captured by value, so that the variable
	// tasks stays off the heap on the paths above.
	all := tasks
	return forEachParallel(len(all), func(i int) error { return all[i].run(ctx) })
}

// parallelLimit bounds the goroutines one request fans out to; the copies
// in flight are bounded per snapshot by CopiesInFlight anyway.
const parallelLimit = 64

// forEachParallel calls fn for 0..n-1 and returns the error of the lowest
// index that failed. n of 1 runs inline; more run on up to parallelLimit
// goroutines that each take the next index until none is left, so that a
// request of many chunks starts as many goroutines as it runs at once, not
// one per chunk.
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

// skipForOrigin reports whether origin writes may skip the snapshot: it is
// invalid, merged or merging (its view is the origin's: see StartMerge),
// so nothing it shows must be kept. Any other failure
// of its store (a clustered store whose node lost the cluster lock: the
// snapshot is valid for the other nodes) fails the origin write instead, as
// overwriting the origin without the copy would corrupt the snapshot.
func (s *Snapshot) skipForOrigin() (bool, error) {
	err := s.failure()
	if err == nil {
		return false, nil
	}
	if err := s.storeStopped(); err != nil {
		return false, err
	}
	if errors.Is(err, exstore.ErrInvalid) || errors.Is(err, ErrMerged) || errors.Is(err, ErrMerging) {
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
			if err := s.ensureDurable(ctx, exstore.Chunk(c), new); err != nil {
				return tasks, err
			}
		}
	}
	return tasks, nil
}

// copyChunkForOrigin makes sure chunk c has an exception (or the snapshot
// is invalid) before an origin write overwrites it. It fails only if ctx
// ends, a lookup fails or the store fails other than by being invalid
// (see skipForOrigin); a failed copy invalidates the snapshot instead, and
// the origin write goes ahead.
func (s *Snapshot) copyChunkForOrigin(ctx context.Context, c exstore.Chunk) error {
	if err := s.holdChunk(ctx, c); err != nil {
		return err
	}
	defer s.releaseChunk(c)
	e, prep, err := s.prepareHeld(ctx, c, true)
	switch prep {
	case chunkNotPrepared:
		return err
	case chunkHasException:
		// A snapshot write allocated it since chunksToCopy looked.
		return s.ensureDurable(ctx, c, e.New)
	case chunkAddedElsewhere:
		// Another node sharing the store copied the chunk after our
		// lookup: the snapshot has its data.
		return nil
	}
	// chunkPrepared: the copy is this path's to make.
	_, err = s.copyAndCommit(ctx, e, false)
	return err
}

// ensureDurable makes chunk c's exception, in COW chunk new, durable before
// an origin write overwrites c: a lazily committed one could otherwise be
// lost in a crash after the origin changed, and the snapshot would read the
// new data. A failure invalidates the snapshot (see invalidate).
func (s *Snapshot) ensureDurable(ctx context.Context, c, new exstore.Chunk) error {
	if s.lazy == nil || s.lazy.Durable(new) {
		return nil
	}
	if err := s.lazy.Sync(context.WithoutCancel(ctx)); err != nil {
		return s.invalidate(ctx, fmt.Errorf("chunk %d: writing its exception before an origin write: %w", c, err))
	}
	return nil
}

// holdChunk takes one of the snapshot's copy slots and then chunk c's lock,
// in that order (see Snapshot.copies): what a path that may allocate c's
// exception holds from its lookup to its commit. releaseChunk lets both go.
func (s *Snapshot) holdChunk(ctx context.Context, c exstore.Chunk) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case s.copies <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	s.locks.lock(c)
	return nil
}

// releaseChunk releases chunk c and the copy slot that holdChunk took.
func (s *Snapshot) releaseChunk(c exstore.Chunk) {
	s.locks.unlock(c)
	<-s.copies
}

// preparation is what prepareHeld did with a chunk.
type preparation uint8

const (
	// chunkPrepared: the exception returned is prepared; the caller fills
	// its COW chunk and commits it, or aborts it.
	chunkPrepared preparation = iota
	// chunkHasException: the lookup found the chunk's exception; the
	// exception returned tells its COW chunk.
	chunkHasException
	// chunkAddedElsewhere: Prepare found that another node sharing the
	// store added the chunk's exception after the lookup.
	chunkAddedElsewhere
	// chunkNotPrepared: nothing was prepared; the caller returns the error
	// returned, nil when there is nothing left to do.
	chunkNotPrepared
)

// prepareHeld is the common part of the two paths that may allocate chunk
// c's exception, a snapshot write's (forOrigin false) and an origin
// write's copy (forOrigin true), for c held by holdChunk: it checks the
// snapshot, looks c up and, if c has no exception, prepares one. It
// handles Prepare's failures as the path must:
//   - a canceled ctx fails either path;
//   - a store that stopped for another reason than invalidity (a clustered
//     store whose node lost the cluster lock) fails either path, and
//     invalidates nothing: the snapshot is valid for the other nodes;
//   - an invalid store marks the snapshot invalid: the snapshot write
//     fails, the origin write skips the snapshot;
//   - COW full fails the snapshot write with ErrOverflow in overflow mode,
//     and invalidates the snapshot otherwise;
//   - any other failure invalidates the snapshot for an origin write, as
//     in the kernel: the origin write must go ahead and the snapshot cannot
//     keep its data. A snapshot write just fails.
func (s *Snapshot) prepareHeld(ctx context.Context, c exstore.Chunk, forOrigin bool) (exstore.Exception, preparation, error) {
	if forOrigin {
		if skip, err := s.skipForOrigin(); skip || err != nil {
			return exstore.Exception{}, chunkNotPrepared, err
		}
	} else if err := s.writable(); err != nil {
		return exstore.Exception{}, chunkNotPrepared, err
	}
	if new, found, err := s.lookup(ctx, c); err != nil {
		return exstore.Exception{}, chunkNotPrepared, err
	} else if found {
		return exstore.Exception{Old: c, New: new}, chunkHasException, nil
	}
	e, err := s.store.Prepare(ctx, c)
	switch {
	case err == nil:
		return e, chunkPrepared, nil
	case ctx.Err() != nil:
		return e, chunkNotPrepared, ctx.Err()
	case errors.Is(err, exstore.ErrExists):
		return e, chunkAddedElsewhere, nil
	}
	if serr := s.storeStopped(); serr != nil {
		// Whatever the store answered, the snapshot is valid for the
		// other nodes: neither skip it nor invalidate it.
		return e, chunkNotPrepared, serr
	}
	switch {
	case !forOrigin && errors.Is(err, exstore.ErrNoSpace) && s.opts.Overflow:
		s.overflowed.Store(true)
		return e, chunkNotPrepared, fmt.Errorf("chunk %d: %w", c, ErrOverflow)
	case errors.Is(err, exstore.ErrInvalid):
		s.markFailed(err)
		if forOrigin {
			return e, chunkNotPrepared, nil
		}
		return e, chunkNotPrepared, err
	case forOrigin:
		return e, chunkNotPrepared, s.invalidate(ctx, allocationFailure(c, err))
	case errors.Is(err, exstore.ErrNoSpace):
		s.invalidate(ctx, allocationFailure(c, err))
		return e, chunkNotPrepared, s.failure()
	default:
		return e, chunkNotPrepared, fmt.Errorf("chunk %d: allocate: %w", c, err)
	}
}

// allocationFailure is the reason to invalidate the snapshot after Prepare
// of chunk c failed with err.
func allocationFailure(c exstore.Chunk, err error) error {
	if errors.Is(err, exstore.ErrNoSpace) {
		return fmt.Errorf("chunk %d: %w: %w", c, ErrCOWFull, err)
	}
	return fmt.Errorf("chunk %d: allocation failed: %w", c, err)
}

// copyAndCommit copies the origin chunk of prepared exception e to its COW
// chunk and commits e (lazily if lazy: see commit). Any failure, of the
// origin read as of the COW write or the commit, invalidates the snapshot
// (see invalidate; a failed copy leaves a prepared exception that the store
// cannot hand out again before a reload), and copied is false; err is
// non-nil only if the store stopped for another reason than invalidity.
func (s *Snapshot) copyAndCommit(ctx context.Context, e exstore.Exception, lazy bool) (copied bool, err error) {
	bufp := s.buffers.Get().(*[]byte)
	defer s.buffers.Put(bufp)
	buf := *bufp
	chunkStart := int64(e.Old) * s.chunkBytes
	// The origin's last chunk may be partial: copy only what exists.
	n := min(s.chunkBytes, s.size-chunkStart)
	if err := readDev(s.origin.dev, buf[:n], chunkStart); err != nil {
		s.store.Abort(e)
		return false, s.invalidate(ctx, fmt.Errorf("copy of chunk %d from origin %s: %w", e.Old, s.origin.dev.Name(), err))
	}
	clear(buf[n:])
	wn := min(alignUp(n, int64(s.cow.Alignment())), s.chunkBytes)
	if err := writeDev(s.cow, buf[:wn], int64(e.New)*s.chunkBytes, false); err != nil {
		s.store.Abort(e)
		return false, s.invalidate(ctx, fmt.Errorf("copy of chunk %d to COW chunk %d: %w", e.Old, e.New, err))
	}
	if err := s.commit(ctx, e, lazy); err != nil {
		return false, s.invalidate(ctx, fmt.Errorf("commit of exception %v: %w", e, err))
	}
	return true, nil
}
