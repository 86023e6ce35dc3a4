package persistent

import (
	"context"

	"github.com/clustersnap/clustersnap/exstore"
)

// Lookup implements exstore.Store. A local store's answers stay true until
// this process changes them, so release is a no-op. Lookup answers from the
// table even when the store is invalid; callers check Err.
func (s *Store) Lookup(ctx context.Context, old exstore.Chunk) (exstore.Chunk, bool, exstore.Release, error) {
	if s.NoExceptions(old, 1) {
		return 0, false, exstore.NoRelease, nil
	}
	s.mu.RLock()
	n, ok := s.table.Load().Lookup(old)
	s.mu.RUnlock()
	return n, ok, exstore.NoRelease, nil
}

// LookupRange implements exstore.RangeLookuper: one read lock for the run,
// or none when the table's filter rules the whole run out.
func (s *Store) LookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	if s.NoExceptions(first, uint64(len(into))) {
		clear(into)
		return exstore.NoRelease, nil
	}
	s.mu.RLock()
	s.table.Load().LookupRange(first, into)
	s.mu.RUnlock()
	return exstore.NoRelease, nil
}

// NoExceptions implements exstore.AbsenceChecker: the table's filter, read
// without mu.
func (s *Store) NoExceptions(first exstore.Chunk, n uint64) bool {
	return s.table.Load().RulesOut(first, n)
}

// Walk implements exstore.Store. fn must not call back into the store.
func (s *Store) Walk(fn func(exstore.Exception) bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	s.table.Load().Range(func(old, new exstore.Chunk, n uint64) bool {
		for i := uint64(0); i < n; i++ {
			if !fn(exstore.Exception{Old: old + exstore.Chunk(i), New: new + exstore.Chunk(i)}) {
				return false
			}
		}
		return true
	})
}

// Usage implements exstore.Store with the kernel's figures.
func (s *Store) Usage() exstore.Usage {
	s.allocMu.Lock()
	nf, area := s.nextFree, s.currentArea
	s.allocMu.Unlock()
	s.mu.RLock()
	n := s.table.Load().Len()
	s.mu.RUnlock()
	c := uint64(s.geo.ChunkSectors)
	return exstore.Usage{
		AllocatedSectors: nf * c,
		TotalSectors:     uint64(s.dev.Size()) / exstore.SectorSize,
		MetadataSectors:  (area + 2) * c,
		Exceptions:       n,
	}
}
