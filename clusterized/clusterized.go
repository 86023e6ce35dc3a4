package clusterized

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/lockc"
)

// DefaultLockspace is the lockspace stores join unless Options say otherwise.
const DefaultLockspace = "clustersnap"

// resourcePrefix starts every store's lock resource name.
const resourcePrefix = "cow:"

// ResourceName is the lock resource of the store of cluster id clusterID.
func ResourceName(clusterID string) []byte { return []byte(resourcePrefix + clusterID) }

// Options tune New.
type Options struct {
	// Lockspace is the lockspace to join; "" means DefaultLockspace.
	Lockspace string
	// Reopen opens a fresh instance of the core store on the same device,
	// for a full reload (after a node died holding EX, or a merge). nil
	// means the core's Refresh is used instead: it reads incrementally when
	// the last record it knew is still in place, which is right after any
	// failure or growth, and only misses a merge that removed records and
	// re-added the same last record.
	Reopen func(ctx context.Context) (exstore.Store, error)
}

// coreRef boxes the core store so that a full reload can swap it
// atomically. lazy, cond and ranges are the core as an
// exstore.LazyCommitter, an exstore.ConditionalPreparer and an
// exstore.RangeLookuper (nil if it is not one), asserted once rather than
// on every call.
type coreRef struct {
	s      exstore.Store
	lazy   exstore.LazyCommitter
	cond   exstore.ConditionalPreparer
	ranges exstore.RangeLookuper
}

func newCoreRef(s exstore.Store) *coreRef {
	lazy, _ := s.(exstore.LazyCommitter)
	cond, _ := s.(exstore.ConditionalPreparer)
	ranges, _ := s.(exstore.RangeLookuper)
	return &coreRef{s: s, lazy: lazy, cond: cond, ranges: ranges}
}

// setCore makes c the core and returns the one it replaces (nil at first).
// A lookup may still use either while they are swapped: reloads happen
// with no user inside, and both answer from committed metadata.
func (s *Store) setCore(c exstore.Store) exstore.Store {
	ref := newCoreRef(c)
	old := s.core.Swap(ref)
	if old == nil {
		return nil
	}
	return old.s
}

// lookup is the core's Lookup, released at once: the wrapper holds misses
// itself.
func (r *coreRef) lookup(ctx context.Context, old exstore.Chunk) (exstore.Chunk, bool, error) {
	new, found, rel, err := r.s.Lookup(ctx, old)
	rel()
	return new, found, err
}

// Stats are a store's counters of cluster work, for tests and monitoring.
type Stats struct {
	UpConverts   uint64 // conversions from NL to CR or EX
	DownConverts uint64 // conversions down, after a blocking notification or before an up-conversion
	Publishes    uint64 // counters published on leaving EX
	Refreshes    uint64 // core Refresh calls for a moved counter (or a reload without Reopen)
	Reloads      uint64 // full reloads (invalid, unknown or re-seeded LVB)
	InvalidLVBs  uint64 // grants that found the LVB invalid
	Drains       uint64 // drains of the local users begun, to convert down
}

// Store is an exstore.Store shared by several nodes through a cluster lock.
// It wraps a core store opened on the shared COW device by this node.
//
// Its users enter a gate (gate.go), which a lock manager (manager.go)
// drains and opens as it converts the node's lock. The core pointer and the
// gate's state and stop words are read by every lookup or write: they share
// a line that written fields stay off (the padding before, and the gate's
// own padding after). swapMu is held shared by core Syncs and exclusively
// by a full reload's swap, so that a Sync never reaches a core being
// closed.
type Store struct {
	id     string
	reopen func(ctx context.Context) (exstore.Store, error)

	ls   lockc.Lockspace
	lost <-chan struct{} // ls.Lost()
	// lostCheck is ls as a lockc.LostChecker when it is no
	// lockc.LostNotifier (nil if it is neither): stopError then asks it,
	// or receives from lost.
	lostCheck lockc.LostChecker

	_    [64]byte
	core atomic.Pointer[coreRef]
	gate // by value: its state and stop words on the core's line

	releases [userShards]exstore.Release // leave through each shard
	mgr      lockManager
	swapMu   sync.RWMutex
}

var (
	_ exstore.Store              = (*Store)(nil)
	_ exstore.RangeLookuper      = (*Store)(nil)
	_ exstore.OptimisticLookuper = (*Store)(nil)
	_ metadataView               = (*Store)(nil)
)

// New wraps core, a store this node opened on the shared COW device, for the
// cluster clusterID: it joins the lockspace through engine and takes the
// store's lock resource in NL, which it holds until Close. The core belongs
// to the returned store from then on (Close closes it).
func New(ctx context.Context, core exstore.Store, engine lockc.Engine, clusterID string, opts Options) (*Store, error) {
	if core == nil || engine == nil {
		return nil, fmt.Errorf("cluster %s: a core store and a lock engine are required", clusterID)
	}
	res := ResourceName(clusterID)
	if clusterID == "" || len(res) > lockc.MaxResourceName {
		return nil, fmt.Errorf("cluster %q: the cluster id must be 1 to %d bytes", clusterID, lockc.MaxResourceName-len(resourcePrefix))
	}
	name := opts.Lockspace
	if name == "" {
		name = DefaultLockspace
	}
	ls, err := engine.Open(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: join lockspace %s: %w", clusterID, name, err)
	}
	// A new request queues behind every waiting conversion, and on a busy
	// store the nodes' conversions may follow one another without a gap:
	// a plain NL request could wait for ever. NL conflicts with nothing,
	// so Expedite grants it at once (as the snapshot set's member does).
	lock, err := ls.Lock(ctx, res, lockc.NL, lockc.Expedite)
	if err != nil {
		_ = ls.Close()
		return nil, fmt.Errorf("cluster %s: take the store lock in NL: %w", clusterID, err)
	}
	s := &Store{
		id:     clusterID,
		reopen: opts.Reopen,
		ls:     ls,
		lost:   ls.Lost(),
	}
	s.gate.init()
	s.setCore(core)
	for i := range s.releases {
		s.releases[i] = func() { s.leave(i) }
	}
	if ln, ok := ls.(lockc.LostNotifier); ok {
		ln.OnLost(func() { s.halt.Or(haltLost) })
	} else {
		s.halt.Store(haltAsk)
		s.lostCheck, _ = ls.(lockc.LostChecker)
	}
	s.mgr.start(clusterID, ls, lock, &s.gate, s)
	return s, nil
}

// ClusterID is the cluster id the store was opened with.
func (s *Store) ClusterID() string { return s.id }

// NodeID is this node's id in the lockspace's cluster.
func (s *Store) NodeID() uint32 { return s.ls.NodeID() }

// Core returns the core store currently wrapped (a full reload replaces it).
func (s *Store) Core() exstore.Store { return s.core.Load().s }

// Lost is closed when the node loses the lockspace (or the store is
// closed): from then on the node must not write the shared metadata.
func (s *Store) Lost() <-chan struct{} { return s.ls.Lost() }

// OnLost has f called once when the node loses the store's lockspace (or
// the store is closed). Where the lock engine is a lockc.LostNotifier, f
// runs before another node can be granted a lock this node held, so a
// caller can stop its other I/O to shared storage in time; otherwise it
// runs once Lost is closed. f must return quickly.
func (s *Store) OnLost(f func()) {
	if ln, ok := s.ls.(lockc.LostNotifier); ok {
		ln.OnLost(f)
		return
	}
	go func() {
		<-s.ls.Lost()
		f()
	}()
}

// Stats returns the store's counters of cluster work.
func (s *Store) Stats() Stats { return s.mgr.stats() }

// stopError is the error of a lost or closed store, or nil. It looks at
// the lockspace itself too (the bit its OnLost sets, or asking it), so
// that nothing is admitted between the loss and the manager noticing it.
// The common answer, nil with a notifying lockspace, is one load inlined
// into the caller.
func (s *Store) stopError() error {
	if s.halt.Load() == 0 {
		return nil
	}
	return s.stopErrorSlow()
}

// stopErrorSlow is stopError once a halt bit is set.
func (s *Store) stopErrorSlow() error {
	if p := s.stopped.Load(); p != nil {
		return *p
	}
	h := s.halt.Load()
	switch {
	case h&haltLost != 0:
		return s.mgr.lostError()
	case h&haltAsk == 0:
		return nil
	case s.lostCheck != nil:
		if s.lostCheck.IsLost() {
			return s.mgr.lostError()
		}
		return nil
	}
	select {
	case <-s.lost:
		return s.mgr.lostError()
	default:
		return nil
	}
}

// wrap wraps err with the cluster id.
func (s *Store) wrap(err error) error {
	if err == nil {
		return nil
	}
	return s.wrapErr(err)
}

// wrapErr is wrap of an error.
func (s *Store) wrapErr(err error) error { return fmt.Errorf("cluster %s: %w", s.id, err) }

// enter admits a user wanting want (CR or EX), converting the node's lock
// first if needed. On success the caller must call leave exactly once.
func (s *Store) enter(ctx context.Context, want lockc.Mode, shard int) error {
	if !s.enterFast(want, shard) {
		if err := s.mgr.wait(ctx, want, shard); err != nil {
			return err
		}
	}
	if err := s.stopError(); err != nil {
		s.leave(shard)
		return err
	}
	return nil
}

// unsettled is how many prepared exceptions the core counts as not settled
// (exstore.ConditionalPreparer), 0 if it does not count them (they are
// users inside then).
func (s *Store) unsettled() int {
	if cond := s.core.Load().cond; cond != nil {
		return cond.Unsettled()
	}
	return 0
}

// reload replaces the core with a fresh instance through Options.Reopen,
// for the lock manager; it reports false if there is no Reopen.
func (s *Store) reload(ctx context.Context) (bool, error) {
	if s.reopen == nil {
		return false, nil
	}
	fresh, err := s.reopen(ctx)
	if err != nil {
		return true, fmt.Errorf("reload: %w", err)
	}
	s.swapMu.Lock()
	old := s.setCore(fresh)
	s.swapMu.Unlock()
	return true, old.Close()
}

// refresh is the core's Refresh, for the lock manager.
func (s *Store) refresh(ctx context.Context) error { return s.core.Load().s.Refresh(ctx) }

// Close implements exstore.Store: it gives the lock up (publishing the
// counter if it held EX), leaves the lockspace and closes the core. Callers
// stop I/O first.
func (s *Store) Close() error {
	if !s.mgr.shutdown() {
		return nil
	}
	lost := s.stopError() != nil
	s.mgr.stop(s.wrapErr(exstore.ErrClosed))
	var errs []error
	if !lost {
		if err := s.mgr.unlock(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := s.ls.Close(); err != nil && !errors.Is(err, lockc.ErrLost) {
		errs = append(errs, fmt.Errorf("cluster %s: leave lockspace: %w", s.id, err))
	}
	if err := s.core.Load().s.Close(); err != nil {
		errs = append(errs, s.wrap(err))
	}
	return errors.Join(errs...)
}
