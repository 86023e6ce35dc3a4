package clusterized

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
)

// LazyStore is a Store whose core is an exstore.LazyCommitter, and which is
// one too (see "Lazy commits" in the package documentation). Exstore
// returns one when the core commits lazily; a Store alone is not a
// LazyCommitter, because the COW engine then leaves the COW device's
// flushes to the store's Sync, which only a lazily committing core can do.
type LazyStore struct {
	*Store
}

var (
	_ exstore.LazyCommitter = (*LazyStore)(nil)
	_ exstore.RangeLookuper = (*LazyStore)(nil)
)

// Exstore returns the store to hand to the COW engine: a *LazyStore if the
// core is an exstore.LazyCommitter, else s. Both are s; only the methods
// they offer differ.
func (s *Store) Exstore() exstore.Store {
	if s.core.Load().lazy != nil {
		return &LazyStore{Store: s}
	}
	return s
}

// CommitLazy implements exstore.LazyCommitter, under the EX that Prepare
// entered, which it ends as Commit does: the core makes e visible at once
// and writes it by the next Sync, at the latest before the node gives EX
// up. If the node lost the lockspace since the Prepare, e is aborted
// instead and CommitLazy fails.
func (s *LazyStore) CommitLazy(ctx context.Context, e exstore.Exception) error {
	ref := s.core.Load()
	core, lazy := ref.s, ref.lazy
	if err := s.stopError(); err != nil {
		return s.abortStopped(ref, e, err)
	}
	if lazy == nil {
		// A reload brought a core of another kind: commit durably.
		err := core.Commit(context.WithoutCancel(ctx), e)
		s.settledCommit(ref, e, err)
		return s.wrap(err)
	}
	err := lazy.CommitLazy(ctx, e)
	s.settledCommit(ref, e, err)
	return s.wrap(err)
}

// Durable implements exstore.LazyCommitter: the core's answer.
func (s *LazyStore) Durable(new exstore.Chunk) bool {
	if lazy := s.core.Load().lazy; lazy != nil {
		return lazy.Durable(new)
	}
	return true
}

// Sync implements exstore.LazyCommitter: the core's Sync. It takes no lock:
// lazily committed exceptions wait to be written only while the node holds
// EX (the lock manager writes them before it gives EX up), and with none
// waiting the core only flushes the device. It fails, wrapping
// lockc.ErrLost, once the node lost the lockspace: what waited then is
// never written.
func (s *LazyStore) Sync(ctx context.Context) error {
	if err := s.stopError(); err != nil {
		return fmt.Errorf("sync: %w", err)
	}
	if err := s.syncLazy(ctx); err != nil {
		return err
	}
	// A loss during the Sync may have fenced some of its writes.
	if err := s.stopError(); err != nil {
		return fmt.Errorf("sync: %w", err)
	}
	return nil
}

// syncLazy is the core's Sync if it is an exstore.LazyCommitter (nil
// otherwise). An invalid core writes nothing more: what it had waiting
// waits no longer either.
func (s *Store) syncLazy(ctx context.Context) error {
	s.swapMu.RLock()
	defer s.swapMu.RUnlock()
	lazy := s.core.Load().lazy
	if lazy == nil {
		return nil
	}
	if err := lazy.Sync(ctx); err != nil {
		return fmt.Errorf("cluster %s: sync: %w", s.id, err)
	}
	return nil
}
