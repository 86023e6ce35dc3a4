package persistent

import (
	"context"
	"math"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
)

// prepared is an exception handed out by Prepare and not yet written.
type prepared struct {
	e       exstore.Exception
	ready   bool       // Commit or CommitLazy was called
	lazy    bool       // CommitLazy was called: in the table already, nobody waits
	aborted bool       // Abort was called
	done    chan error // set by Commit; receives the outcome
}

// noLazy is lazyFirst when no lazily committed exception waits.
const noLazy = math.MaxUint64

// Prepare implements exstore.Store.
func (s *Store) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	return s.prepare(ctx, old, nil, 0)
}

// PrepareIfUnchanged implements exstore.ConditionalPreparer: the word is
// checked under allocMu, which Unsettled takes too.
func (s *Store) PrepareIfUnchanged(ctx context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	return s.prepare(ctx, old, word, want)
}

// Unsettled implements exstore.ConditionalPreparer.
func (s *Store) Unsettled() int {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	return s.unsettled
}

// prepare is Prepare, conditional on *word == want if word is not nil.
func (s *Store) prepare(ctx context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	if err := ctx.Err(); err != nil {
		return exstore.Exception{}, err
	}
	if old > exstore.MaxChunk {
		return exstore.Exception{}, s.errf("chunk %d: beyond the 2^56 chunk limit", old)
	}
	if err := s.Err(); err != nil {
		return exstore.Exception{}, err
	}
	// A first write's chunk has none: the filter says so without mu.
	if _, exists, _, _ := s.Lookup(ctx, old); exists {
		return exstore.Exception{}, s.errf("chunk %d: %w", old, exstore.ErrExists)
	}
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	if word != nil && word.Load() != want {
		return exstore.Exception{}, s.errf("chunk %d: %w", old, exstore.ErrChanged)
	}
	if s.closed {
		return exstore.Exception{}, s.errf("%w", exstore.ErrClosed)
	}
	if _, dup := s.pendingOld[old]; dup {
		return exstore.Exception{}, s.errf("chunk %d: an exception for it is already being prepared", old)
	}
	g := s.geo
	if s.nextFree >= g.Chunks {
		return exstore.Exception{}, s.errf("chunk %d: %w (%d chunks in use)", old, exstore.ErrNoSpace, g.Chunks)
	}
	// The record this exception will take: if it fills an area, that area's
	// successor must exist or the metadata could not be loaded again.
	rec := s.currentArea*g.PerArea + s.committed + s.reserved
	if rec%g.PerArea == g.PerArea-1 && uint64(g.AreaLocation(rec/g.PerArea+1)) >= g.Chunks {
		return exstore.Exception{}, s.errf("chunk %d: %w (the last metadata area may not fill: no room for its successor)", old, exstore.ErrNoSpace)
	}
	e := exstore.Exception{Old: old, New: exstore.Chunk(s.nextFree)}
	s.nextFree = g.skipMetadata(s.nextFree + 1)
	p := &prepared{e: e}
	s.queue = append(s.queue, p)
	s.byNew[e.New] = p
	s.pendingOld[old] = struct{}{}
	s.reserved++
	s.unsettled++
	return e, nil
}

// pendingLocked returns e's record if e is what a Prepare returned and is
// neither committed nor aborted yet, else nil. The caller holds allocMu.
func (s *Store) pendingLocked(e exstore.Exception) *prepared {
	p := s.byNew[e.New]
	if p == nil || p.e != e || p.ready || p.aborted {
		return nil
	}
	return p
}

// Commit implements exstore.Store.
func (s *Store) Commit(ctx context.Context, e exstore.Exception) error {
	s.allocMu.Lock()
	p := s.pendingLocked(e)
	if p == nil {
		s.allocMu.Unlock()
		return s.errf("commit %v: %w", e, exstore.ErrNotPrepared)
	}
	p.ready = true
	p.done = make(chan error, 1)
	s.durableWaiting++
	s.allocMu.Unlock()
	s.kick()
	select {
	case err := <-p.done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// lazyKick is how many lazily committed exceptions may wait before the
// committer writes them without a Sync: it bounds what a Sync (or a crash)
// finds to do.
const lazyKick = 4096

// CommitLazy implements exstore.LazyCommitter: e is in the table when it
// returns, and is written with the next batch (which a Sync, a Commit or
// lazyKick waiting exceptions start).
func (s *Store) CommitLazy(ctx context.Context, e exstore.Exception) error {
	s.allocMu.Lock()
	p := s.pendingLocked(e)
	if p == nil {
		s.allocMu.Unlock()
		return s.errf("commit %v: %w", e, exstore.ErrNotPrepared)
	}
	p.ready, p.lazy = true, true
	s.unsettled--
	s.lazyWaiting++
	s.lazyLast = max(s.lazyLast, e.New)
	if uint64(e.New) < s.lazyFirst {
		s.setLazyFirstLocked(uint64(e.New))
	}
	kick := s.lazyWaiting >= lazyKick || s.durableWaiting > 0 || s.syncWaiting > 0
	// In the table under allocMu, so that no batch can write it and look
	// for it in the table in between.
	err := s.insert(s.table.Load(), []exstore.Exception{e}, true)
	s.allocMu.Unlock()
	if kick {
		s.kick()
	}
	return err
}

// setLazyFirstLocked sets the lowest COW chunk of the lazily committed
// exceptions waiting, and its mirror for Durable. The caller holds allocMu.
func (s *Store) setLazyFirstLocked(first uint64) {
	s.lazyFirst = first
	s.lazyFirstNow.Store(first)
}

// Durable implements exstore.LazyCommitter.
func (s *Store) Durable(new exstore.Chunk) bool {
	return uint64(new) < s.lazyFirstNow.Load()
}

// Sync implements exstore.LazyCommitter. With lazily committed exceptions
// waiting, it has the committer write a batch that starts after the call
// (whose flush covers every COW write before the call) and waits until
// those exceptions are written; otherwise it flushes the device itself.
func (s *Store) Sync(ctx context.Context) error {
	s.allocMu.Lock()
	last, started := s.lazyLast, s.batchesStarted
	s.syncWaiting++
	s.allocMu.Unlock()
	defer func() {
		s.allocMu.Lock()
		s.syncWaiting--
		s.allocMu.Unlock()
	}()
	for {
		s.allocMu.Lock()
		lazyDone := s.lazyFirst > uint64(last)
		flushed := s.batchesDone > started
		end, closed := s.batchEnd, s.closed
		s.allocMu.Unlock()
		if err := s.Err(); err != nil {
			return err
		}
		if closed && !lazyDone {
			return s.errf("sync: %w", exstore.ErrClosed)
		}
		switch {
		case lazyDone && flushed:
			return nil
		case lazyDone:
			if err := s.dev.Sync(); err != nil {
				return s.errf("sync: %w", err)
			}
			return nil
		}
		s.kick()
		select {
		case <-end:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Abort implements exstore.Store.
func (s *Store) Abort(e exstore.Exception) bool {
	s.allocMu.Lock()
	p := s.pendingLocked(e)
	if p == nil {
		s.allocMu.Unlock()
		return false
	}
	p.aborted = true
	s.reserved--
	s.unsettled--
	// Its origin chunk may be prepared again at once, although the record
	// stays queued (for the order of COW chunks) until a batch drops it.
	delete(s.pendingOld, e.Old)
	s.allocMu.Unlock()
	s.kick()
	return true
}

func (s *Store) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}
