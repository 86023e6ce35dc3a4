package clusterized

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/lockc"
)

// ChunkSectors implements exstore.Store.
func (s *Store) ChunkSectors() uint32 { return s.core.Load().s.ChunkSectors() }

// Usage implements exstore.Store: the node's view as of its last refresh.
func (s *Store) Usage() exstore.Usage { return s.core.Load().s.Usage() }

// Err implements exstore.Store: the lockspace loss once the node lost it,
// else the core's validity.
func (s *Store) Err() error {
	if err := s.stopError(); err != nil {
		return err
	}
	return s.core.Load().s.Err()
}

// Invalidate implements exstore.Store, under EX.
func (s *Store) Invalidate(ctx context.Context, reason error) error {
	if err := s.enter(ctx, lockc.EX, 0); err != nil {
		return fmt.Errorf("cluster %s: invalidate: %w", s.id, err)
	}
	defer s.leave(0)
	s.mgr.markDirty()
	return s.wrap(s.core.Load().s.Invalidate(ctx, reason))
}

// Exclusive runs f on the core store while this node holds the store's
// lock in EX with current metadata, so that no other node writes the COW's
// metadata or header meanwhile: for a read-modify-write of what the
// clusterizer does not know, such as the COW's label. f must not call the
// Store (it would wait for itself).
func (s *Store) Exclusive(ctx context.Context, f func(ctx context.Context, core exstore.Store) error) error {
	if err := s.enter(ctx, lockc.EX, 0); err != nil {
		return fmt.Errorf("cluster %s: exclusive: %w", s.id, err)
	}
	defer s.leave(0)
	return s.wrap(f(ctx, s.core.Load().s))
}

// PrepareMerge implements exstore.Store, under EX.
func (s *Store) PrepareMerge(ctx context.Context) (exstore.Exception, int, error) {
	if err := s.enter(ctx, lockc.EX, 0); err != nil {
		return exstore.Exception{}, 0, fmt.Errorf("cluster %s: prepare merge: %w", s.id, err)
	}
	defer s.leave(0)
	last, n, err := s.core.Load().s.PrepareMerge(ctx)
	s.mgr.notePrepareMerge()
	return last, n, s.wrap(err)
}

// CommitMerge implements exstore.Store, under EX. It fails (wrapping
// exstore.ErrMerge) if the node re-read metadata that another node changed
// since PrepareMerge: the run it prepared may no longer be the last one.
func (s *Store) CommitMerge(ctx context.Context, n int) error {
	if err := s.enter(ctx, lockc.EX, 0); err != nil {
		return fmt.Errorf("cluster %s: commit merge: %w", s.id, err)
	}
	defer s.leave(0)
	if s.mgr.rereadSinceMerge() {
		return fmt.Errorf("cluster %s: commit merge: %w: another node changed the metadata since PrepareMerge", s.id, exstore.ErrMerge)
	}
	s.mgr.markDirty()
	err := s.core.Load().s.CommitMerge(ctx, n)
	if err == nil {
		s.mgr.noteShrank()
	}
	return s.wrap(err)
}

// Refresh implements exstore.Store: it takes CR, which re-reads what other
// nodes changed if the counter moved. While the node holds its lock no other
// node can change the metadata, so there is nothing else to read.
func (s *Store) Refresh(ctx context.Context) error {
	if err := s.enter(ctx, lockc.CR, 0); err != nil {
		return fmt.Errorf("cluster %s: refresh: %w", s.id, err)
	}
	s.leave(0)
	return nil
}

// Walk implements exstore.Store on the node's view.
func (s *Store) Walk(fn func(exstore.Exception) bool) { s.core.Load().s.Walk(fn) }
