package cow

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
)

// WriteAt writes p at off of the snapshot, durably (data and exception)
// before it returns with fua.
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
	if !s.inOneChunk(p, off) {
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
		if _, err = s.cow.WriteAtSync(p, at); err == nil {
			err = s.lazyDurable(ctx, new)
		}
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

// writeChunk writes the n bytes of data (n zeroes if data is nil) at at,
// all inside chunk c.
func (s *Snapshot) writeChunk(ctx context.Context, c exstore.Chunk, at int64, data []byte, n int64, fua bool) error {
	new, found, err := s.lookup(ctx, c)
	if err != nil {
		return err
	}
	if found {
		return s.putExisting(ctx, c, new, at, data, n, fua)
	}
	return s.allocateChunk(ctx, c, at, data, n, fua)
}

// putExisting is putCOW into chunk c's existing exception, in COW chunk new:
// with fua, the exception is made durable too, as a snapshot write without
// FUA may have committed it lazily.
func (s *Snapshot) putExisting(ctx context.Context, c, new exstore.Chunk, at int64, data []byte, n int64, fua bool) error {
	if err := s.putCOW(c, new, at, data, n, fua); err != nil {
		return err
	}
	if fua {
		return s.lazyDurable(ctx, new)
	}
	return nil
}

// lazyDurable makes the exception in COW chunk new durable if it was
// committed lazily and is not yet: a write with FUA is durable, data and
// exception, when it returns. The store's Sync flushes the COW device
// before it writes the metadata.
func (s *Snapshot) lazyDurable(ctx context.Context, new exstore.Chunk) error {
	if s.lazy == nil || s.lazy.Durable(new) {
		return nil
	}
	if err := s.lazy.Sync(context.WithoutCancel(ctx)); err != nil {
		return fmt.Errorf("COW chunk %d: making its exception durable: %w", new, err)
	}
	return nil
}

// allocateChunk is writeChunk for chunk c that had no exception when
// looked up: it allocates one (unless another goroutine or node did
// meanwhile) and writes.
func (s *Snapshot) allocateChunk(ctx context.Context, c exstore.Chunk, at int64, data []byte, n int64, fua bool) error {
	if err := s.holdChunk(ctx, c); err != nil {
		return err
	}
	defer s.releaseChunk(c)
	e, prep, err := s.prepareHeld(ctx, c, false)
	switch prep {
	case chunkNotPrepared:
		return err
	case chunkHasException:
		return s.putExisting(ctx, c, e.New, at, data, n, fua)
	case chunkAddedElsewhere:
		// Write to the chunk of the exception that another node added.
		new, found, err := s.lookup(ctx, c)
		if err != nil {
			return err
		} else if !found {
			return fmt.Errorf("chunk %d: allocate: %w, but the lookup after it misses", c, exstore.ErrExists)
		}
		return s.putExisting(ctx, c, new, at, data, n, fua)
	}
	// chunkPrepared: the exception is this write's to fill and commit.
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
	if copied, _ := s.copyAndCommit(ctx, e, !fua); !copied {
		return s.failure()
	}
	return s.putCOW(c, e.New, at, data, n, fua)
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
