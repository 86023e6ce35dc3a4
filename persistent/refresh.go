package persistent

import (
	"context"
	"errors"

	"github.com/clustersnap/clustersnap/exstore"
)

// Refresh implements exstore.Store: it re-reads the header, and the metadata
// from the last known area and slot when the last record this store knows is
// still in place (the metadata only grew); otherwise it reloads everything.
func (s *Store) Refresh(ctx context.Context) error {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	s.allocMu.Lock()
	// Aborted exceptions leave the queue with the committer's next batch;
	// with metaMu held no batch runs, so they leave here instead.
	for len(s.queue) > 0 && s.queue[0].aborted {
		delete(s.byNew, s.queue[0].e.New)
		s.queue = s.queue[1:]
	}
	busy := len(s.queue) > 0
	area, committed := s.currentArea, s.committed
	s.allocMu.Unlock()
	if busy {
		return s.errf("refresh while exceptions are in flight")
	}
	h, err := s.readHeader()
	if err != nil {
		return err
	}
	if err := h.Check(); err != nil {
		return s.errf("%w", err)
	}
	if h.ChunkSectors != s.geo.ChunkSectors {
		return s.errf("%w: chunk size changed from %d to %d sectors", ErrCorrupt, s.geo.ChunkSectors, h.ChunkSectors)
	}
	if h.Valid == 0 {
		s.invalid.CompareAndSwap(nil, &exstore.InvalidError{Device: s.name, Reason: errors.New("invalidated by another node")})
		return nil
	}
	grew := true
	if s.hasLastRec {
		last, _, err := s.recordBefore(area, committed)
		if err != nil {
			return err
		}
		grew = last == s.lastRec
	}
	if grew {
		return s.scan(ctx, area, committed, false)
	}
	return s.reload(ctx)
}

// reload loads the metadata again from the start, replacing the table and
// the area position only once the new ones are complete. The caller holds
// metaMu.
func (s *Store) reload(ctx context.Context) error {
	s.hasLastRec, s.dirtyTo, s.merge.n = false, 0, 0
	return s.scan(ctx, 0, 0, true)
}
