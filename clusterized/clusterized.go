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
// It wraps a core store (normally persistent) opened on the shared COW
// device by this node.
type Store struct {
	id     string
	reopen func(ctx context.Context) (exstore.Store, error)

	ls   lockc.Lockspace
	lost <-chan struct{} // ls.Lost()
	// lostCheck is ls as a lockc.LostChecker when it is no
	// lockc.LostNotifier (nil if it is neither): stopError then asks it,
	// or receives from lost.
	lostCheck lockc.LostChecker
	lock      lockc.Lock
	nodeID    uint32

	// state and the core are read by every lookup, stopped and halt
	// by every write: they share a line that written fields stay off.
	_       [64]byte
	state   atomic.Uint64 // see gate.go
	core    atomic.Pointer[coreRef]
	stopped atomic.Pointer[error]
	halt    atomic.Uint32 // why stopError must look closer: halt* bits
	_       [36]byte

	users    [userShards]userShard
	releases [userShards]exstore.Release // leave through each shard
	// dirty says the metadata may have changed under the current EX: a
	// Prepare (lazy commits may wait to be written), merge or
	// invalidation.
	dirty       atomic.Bool
	ctx         context.Context // the manager's; ends at Close
	cancel      context.CancelFunc
	wake        chan struct{}
	drained     chan struct{}
	managerDone chan struct{}

	mu         sync.Mutex // guards what follows, and admissions on the slow path
	changed    chan struct{}
	demand     [lockc.EX + 1]int
	tickets    [lockc.EX + 1]int // waiters let in by the manager that have not woken yet
	failGen    uint64
	failErr    error
	stopErr    error
	stale      syncKind
	granted    bool // the lock has been above NL once
	seen       Counter
	seenOK     bool // seen is the counter the core's metadata corresponds to
	trusted    bool // the current grant read a valid counter
	maxCounter uint64
	shrank     bool   // a merge removed exceptions under the current EX
	syncGen    uint64 // metadata re-reads so far
	mergeGen   uint64 // syncGen at the last PrepareMerge
	closed     bool

	// swapMu is held shared by core Syncs and exclusively by a full
	// reload's swap, so that a Sync never reaches a core being closed.
	swapMu sync.RWMutex

	upConverts, downConverts, publishes, refreshes, reloads, invalidSeen, drains atomic.Uint64
}

var (
	_ exstore.Store              = (*Store)(nil)
	_ exstore.RangeLookuper      = (*Store)(nil)
	_ exstore.OptimisticLookuper = (*Store)(nil)
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
	lock, err := ls.Lock(ctx, res, lockc.NL)
	if err != nil {
		_ = ls.Close()
		return nil, fmt.Errorf("cluster %s: take the store lock in NL: %w", clusterID, err)
	}
	s := &Store{
		id:          clusterID,
		reopen:      opts.Reopen,
		ls:          ls,
		lost:        ls.Lost(),
		lock:        lock,
		nodeID:      ls.NodeID(),
		wake:        make(chan struct{}, 1),
		drained:     make(chan struct{}, 1),
		managerDone: make(chan struct{}),
		changed:     make(chan struct{}),
	}
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
	s.state.Store(uint64(lockc.NL))
	s.ctx, s.cancel = context.WithCancel(context.Background())
	go s.manage()
	return s, nil
}

// ClusterID is the cluster id the store was opened with.
func (s *Store) ClusterID() string { return s.id }

// Core returns the core store currently wrapped (a full reload replaces it).
func (s *Store) Core() exstore.Store { return s.core.Load().s }

// Lost is closed when the node loses the lockspace (or the store is
// closed): from then on the node must not write the shared metadata.
func (s *Store) Lost() <-chan struct{} { return s.ls.Lost() }

// Stats returns the store's counters of cluster work.
func (s *Store) Stats() Stats {
	return Stats{
		UpConverts:   s.upConverts.Load(),
		DownConverts: s.downConverts.Load(),
		Publishes:    s.publishes.Load(),
		Refreshes:    s.refreshes.Load(),
		Reloads:      s.reloads.Load(),
		InvalidLVBs:  s.invalidSeen.Load(),
		Drains:       s.drains.Load(),
	}
}

// The bits of Store.halt, which stopError looks past only when one is set.
const (
	haltStopped uint32 = 1 << iota // stopped is set
	haltLost                       // the lockspace's OnLost ran
	haltAsk                        // the lockspace notifies no loss: ask it
)

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
		return s.lostError()
	case h&haltAsk == 0:
		return nil
	case s.lostCheck != nil:
		if s.lostCheck.IsLost() {
			return s.lostError()
		}
		return nil
	}
	select {
	case <-s.lost:
		return s.lostError()
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

// ChunkSectors implements exstore.Store.
func (s *Store) ChunkSectors() uint32 { return s.core.Load().s.ChunkSectors() }

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
// The wrapper is deliberately no exstore.AbsenceChecker, although its core
// is: an answer without a token could not tell a reader that another node
// copied and overwrote the chunk meanwhile (the window case of
// TestOptimisticReadRetriesUnderOtherNodesOverwrite fails if it were one).
func (s *Store) LookupOptimistic(old exstore.Chunk) (exstore.Chunk, bool, uint64, bool) {
	w := s.state.Load()
	if !admits(w, lockc.CR) {
		return 0, false, 0, false
	}
	new, found, release, err := s.coreLookup(s.ctx, old)
	release()
	return new, found, w, err == nil
}

// LookupRangeOptimistic implements exstore.OptimisticLookuper.
func (s *Store) LookupRangeOptimistic(first exstore.Chunk, into []exstore.LookupResult) (uint64, bool) {
	w := s.state.Load()
	if !admits(w, lockc.CR) {
		return 0, false
	}
	_, err := s.lookupInto(s.ctx, first, into)
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
				s.markDirty()
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
	s.markDirty()
	return e, nil
}

// markDirty notes a change of the metadata under the current EX; the
// load first keeps the flag's line shared while it is set.
func (s *Store) markDirty() {
	if !s.dirty.Load() {
		s.dirty.Store(true)
	}
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
	s.dirty.Store(true)
	return s.wrap(s.core.Load().s.Invalidate(ctx, reason))
}

// PrepareMerge implements exstore.Store, under EX.
func (s *Store) PrepareMerge(ctx context.Context) (exstore.Exception, int, error) {
	if err := s.enter(ctx, lockc.EX, 0); err != nil {
		return exstore.Exception{}, 0, fmt.Errorf("cluster %s: prepare merge: %w", s.id, err)
	}
	defer s.leave(0)
	last, n, err := s.core.Load().s.PrepareMerge(ctx)
	s.mu.Lock()
	s.mergeGen = s.syncGen
	s.mu.Unlock()
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
	s.mu.Lock()
	moved := s.syncGen != s.mergeGen
	s.mu.Unlock()
	if moved {
		return fmt.Errorf("cluster %s: commit merge: %w: another node changed the metadata since PrepareMerge", s.id, exstore.ErrMerge)
	}
	s.dirty.Store(true)
	err := s.core.Load().s.CommitMerge(ctx, n)
	if err == nil {
		s.mu.Lock()
		s.shrank = true
		s.mu.Unlock()
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

// Close implements exstore.Store: it gives the lock up (publishing the
// counter if it held EX), leaves the lockspace and closes the core. Callers
// stop I/O first.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	<-s.managerDone
	lost := s.stopError() != nil
	s.stop(fmt.Errorf("cluster %s: %w", s.id, exstore.ErrClosed))
	var errs []error
	if !lost && modeOf(s.state.Load()) == lockc.EX {
		// The core would write waiting lazy commits as it closes, after
		// the unlock: write them while this node still holds EX.
		if s.lazyWaiting() {
			if err := s.syncLazy(context.Background()); err != nil && !errors.Is(err, exstore.ErrInvalid) {
				errs = append(errs, err)
			}
		}
		s.publish()
	}
	if !lost {
		if err := s.lock.Unlock(context.Background()); err != nil && !errors.Is(err, lockc.ErrLost) {
			errs = append(errs, fmt.Errorf("cluster %s: unlock: %w", s.id, err))
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
