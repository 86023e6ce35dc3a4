package clusterized

import (
	"context"
	"errors"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/lockc"
)

// Prepare implements exstore.Store. The node's metadata is current when it
// allocates: the allocation happens while the node holds EX, which it keeps
// until the exception is committed or aborted. If another node added an
// exception for old since this node's lookup, Prepare returns
// exstore.ErrExists.
//
// With a core that is an exstore.ConditionalPreparer and the gate open in
// EX, Prepare enters nothing: the core allocates only while the state word
// is the one read here, and counts the exception as unsettled, which a
// drain waits for. Otherwise Prepare enters in EX (converting the lock if
// need be); with such a core it leaves once the core counts the
// exception, else it stays in until the exception is settled.
func (s *Store) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	if ref := s.core.Load(); ref.cond != nil {
		if w := s.state.Load(); admits(w, lockc.EX) {
			e, err := ref.cond.PrepareIfUnchanged(ctx, old, &s.state, w)
			if err == nil && s.stopError() == nil {
				s.mgr.markDirty()
				return e, nil
			}
			if !errors.Is(err, exstore.ErrChanged) {
				return s.prepared(ctx, ref, old, e, err)
			}
		}
	}
	shard := shardOf(old)
	if err := s.enter(ctx, lockc.EX, shard); err != nil {
		return exstore.Exception{}, fmt.Errorf("cluster %s: chunk %d: prepare: %w", s.id, old, err)
	}
	ref := s.core.Load()
	e, err := ref.s.Prepare(ctx, old)
	if err != nil || ref.cond != nil {
		// Unsettled in the core from here on, if prepared.
		s.leave(shard)
	}
	return s.prepared(ctx, ref, old, e, err)
}

// prepared finishes a Prepare of old that ref's core answered with e and
// err: a lost lockspace aborts e, and a refusal because old has an
// exception is told apart, as the COW engine acts on it.
func (s *Store) prepared(ctx context.Context, ref *coreRef, old exstore.Chunk, e exstore.Exception, err error) (exstore.Exception, error) {
	if err != nil {
		// A node that lost the lockspace says so, whatever its core
		// answered (a core invalidates itself when the fence refuses its
		// write): the COW engine goes on past an invalid snapshot, never
		// past a lost lock.
		if serr := s.stopError(); serr != nil {
			return exstore.Exception{}, fmt.Errorf("cluster %s: chunk %d: prepare: %w", s.id, old, serr)
		}
		_, found, rel, lerr := ref.s.Lookup(ctx, old)
		rel()
		if lerr == nil && found {
			return exstore.Exception{}, fmt.Errorf("cluster %s: chunk %d: %w", s.id, old, exstore.ErrExists)
		}
		return exstore.Exception{}, s.wrap(err)
	}
	if err := s.stopError(); err != nil {
		if ref.s.Abort(e) {
			s.settled(ref, e)
		}
		return exstore.Exception{}, fmt.Errorf("cluster %s: chunk %d: prepare: %w", s.id, old, err)
	}
	s.mgr.markDirty()
	return e, nil
}

// preparedShard is the user counter a Prepare of e entered through, which
// its Commit, CommitLazy or Abort leaves through, when the core is no
// exstore.ConditionalPreparer. Only the counters' sum matters, but the same
// shard keeps the counter's line where it was.
func preparedShard(e exstore.Exception) int { return shardOf(e.Old) }

// settled ends what holds the node in EX for prepared e, now committed,
// aborted or failed in ref's core: the Prepare's stay in the gate, or, for
// an exstore.ConditionalPreparer that counts e itself, nothing but waking a
// drain that may wait for the count to fall.
func (s *Store) settled(ref *coreRef, e exstore.Exception) {
	if ref.cond == nil {
		s.leave(preparedShard(e))
	} else if s.state.Load()&closedBit != 0 {
		s.wakeDrain()
	}
}

// abortStopped aborts prepared e because the node stopped (lost the
// lockspace, closed) since the Prepare, with why, and returns the
// commit's error: e is settled here if the core took it back. Callers ask
// stopError first, inline.
func (s *Store) abortStopped(ref *coreRef, e exstore.Exception, why error) error {
	if ref.s.Abort(e) {
		s.settled(ref, e)
	}
	return fmt.Errorf("commit %v: %w", e, why)
}

// settledCommit settles e after ref's core's commit of e returned err,
// unless the core refused e as not prepared (a second Commit or a Commit
// after Abort): then it was settled before. The core's refusal is what
// keeps a misused Commit from leaving twice.
func (s *Store) settledCommit(ref *coreRef, e exstore.Exception, err error) {
	if err == nil || !errors.Is(err, exstore.ErrNotPrepared) {
		s.settled(ref, e)
	}
}

// Commit implements exstore.Store, under the EX that Prepare entered. If
// the node lost the lockspace since, the exception is aborted instead and
// Commit fails: the node must not write the shared metadata any more.
func (s *Store) Commit(ctx context.Context, e exstore.Exception) error {
	ref := s.core.Load()
	core := ref.s
	if err := s.stopError(); err != nil {
		return s.abortStopped(ref, e, err)
	}
	if ctx.Done() == nil {
		err := core.Commit(ctx, e)
		s.settledCommit(ref, e, err)
		return s.wrap(err)
	}
	// The exception stays queued if ctx ends first: the node keeps EX
	// until the core has written (or failed) it.
	done := make(chan error, 1)
	go func() {
		err := core.Commit(context.WithoutCancel(ctx), e)
		s.settledCommit(ref, e, err)
		done <- err
	}()
	select {
	case err := <-done:
		return s.wrap(err)
	case <-ctx.Done():
		// If the core answered meanwhile (a refusal is immediate), that
		// is the answer.
		select {
		case err := <-done:
			return s.wrap(err)
		default:
			return ctx.Err()
		}
	}
}

// Abort implements exstore.Store.
func (s *Store) Abort(e exstore.Exception) bool {
	ref := s.core.Load()
	if !ref.s.Abort(e) {
		return false
	}
	s.settled(ref, e)
	return true
}
