package clusterized

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/lockc"
)

// coreLookup is the core's Lookup of old.
func (s *Store) coreLookup(ctx context.Context, old exstore.Chunk) (exstore.Chunk, bool, exstore.Release, error) {
	return s.core.Load().s.Lookup(ctx, old)
}

// Lookup implements exstore.Store. A hit is answered from the node's table
// without a lock; a miss holds the node's lock in CR (at least) until
// release, so no other node can add an exception for old, and so overwrite
// its origin chunk, in between.
func (s *Store) Lookup(ctx context.Context, old exstore.Chunk) (exstore.Chunk, bool, exstore.Release, error) {
	w := s.state.Load()
	new, found, rel, err := s.coreLookup(ctx, old)
	if found && err == nil {
		return new, true, rel, nil // a hit needs no lock: the core's release is all
	}
	rel()
	return s.lookupMiss(ctx, old, w, err)
}

// lookupMiss is Lookup after the core missed (or failed) with the gate in
// state w: it enters in CR, looking up again if the state changed.
func (s *Store) lookupMiss(ctx context.Context, old exstore.Chunk, w uint64, err error) (exstore.Chunk, bool, exstore.Release, error) {
	if err != nil {
		return 0, false, exstore.NoRelease, fmt.Errorf("cluster %s: chunk %d: %w", s.id, old, err)
	}
	// The miss holds if the node held a covering mode, without a refresh,
	// from before the lookup until it enters.
	shard := shardOf(old)
	if s.enterIfState(w, lockc.CR, shard) {
		if err := s.stopError(); err != nil {
			s.leave(shard)
			return 0, false, exstore.NoRelease, fmt.Errorf("chunk %d: lookup: %w", old, err)
		}
		return 0, false, s.releases[shard], nil
	}
	if err := s.enter(ctx, lockc.CR, shard); err != nil {
		return 0, false, exstore.NoRelease, fmt.Errorf("chunk %d: lookup: %w", old, err)
	}
	new, found, err := s.core.Load().lookup(ctx, old)
	if err != nil || found {
		s.leave(shard)
		return new, found, exstore.NoRelease, s.wrap(err)
	}
	return 0, false, s.releases[shard], nil
}

// LookupRange implements exstore.RangeLookuper: Lookup of the chunks
// first.. into into, with one entry in CR for the whole run if any of
// them misses, held until the one release.
func (s *Store) LookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	w := s.state.Load()
	allFound, err := s.lookupInto(ctx, first, into)
	if err != nil || allFound {
		return exstore.NoRelease, err
	}
	shard := shardOf(first)
	if s.enterIfState(w, lockc.CR, shard) {
		if err := s.stopError(); err != nil {
			s.leave(shard)
			return exstore.NoRelease, fmt.Errorf("chunks %d to %d: lookup: %w", first, first+exstore.Chunk(len(into))-1, err)
		}
		return s.releases[shard], nil
	}
	if err := s.enter(ctx, lockc.CR, shard); err != nil {
		return exstore.NoRelease, fmt.Errorf("chunks %d to %d: lookup: %w", first, first+exstore.Chunk(len(into))-1, err)
	}
	allFound, err = s.lookupInto(ctx, first, into)
	if err != nil || allFound {
		s.leave(shard)
		return exstore.NoRelease, err
	}
	return s.releases[shard], nil
}

// LookupOptimistic implements exstore.OptimisticLookuper: while the node
// holds its lock in CR or EX with its metadata current, the core's answer
// is the cluster's, and it stays so until the gate's state word changes,
// which it does (a drain closes the gate) before the node gives the lock
// down and another node can add exceptions. The token is that word. It
// does not look for a lost lockspace (nor does Lookup's hit path):
// Unchanged does, after the reader's I/O, where it matters.
//
// The wrapper is deliberately no exstore.AbsenceChecker, even over a core
// that is one: an answer without a token could not tell a reader that another node
// copied and overwrote the chunk meanwhile (the window case of
// TestOptimisticReadRetriesUnderOtherNodesOverwrite fails if it were one).
func (s *Store) LookupOptimistic(old exstore.Chunk) (exstore.Chunk, bool, uint64, bool) {
	w := s.state.Load()
	if !admits(w, lockc.CR) {
		return 0, false, 0, false
	}
	new, found, release, err := s.coreLookup(s.mgr.ctx, old)
	release()
	return new, found, w, err == nil
}

// LookupRangeOptimistic implements exstore.OptimisticLookuper.
func (s *Store) LookupRangeOptimistic(first exstore.Chunk, into []exstore.LookupResult) (uint64, bool) {
	w := s.state.Load()
	if !admits(w, lockc.CR) {
		return 0, false
	}
	_, err := s.lookupInto(s.mgr.ctx, first, into)
	return w, err == nil
}

// Unchanged implements exstore.OptimisticLookuper: the node held its lock,
// with the same metadata, from the lookups to now, and has not lost the
// lockspace (the manager may not have changed the state word for that
// yet, while the other nodes may already have taken the node's place).
func (s *Store) Unchanged(token uint64) bool {
	return s.state.Load() == token && s.stopError() == nil
}

// lookupInto answers into from the core's table and reports whether every
// chunk has an exception.
func (s *Store) lookupInto(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (bool, error) {
	ref := s.core.Load()
	if ref.ranges != nil {
		release, err := ref.ranges.LookupRange(ctx, first, into)
		release()
		if err != nil {
			return false, fmt.Errorf("cluster %s: chunks %d to %d: %w", s.id, first, first+exstore.Chunk(len(into))-1, err)
		}
	} else {
		for i := range into {
			new, found, release, err := ref.s.Lookup(ctx, first+exstore.Chunk(i))
			release()
			if err != nil {
				return false, fmt.Errorf("cluster %s: chunk %d: %w", s.id, first+exstore.Chunk(i), err)
			}
			into[i] = exstore.LookupResult{New: new, Found: found}
		}
	}
	for _, r := range into {
		if !r.Found {
			return false, nil
		}
	}
	return true, nil
}
