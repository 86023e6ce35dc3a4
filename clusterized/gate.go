package clusterized

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/lockc"
)

// The node-local gate: local users enter and leave with a few atomic
// operations while the node's cached cluster lock covers them, and a
// manager goroutine converts the lock when it does not.
//
// The users inside (lookup misses holding their answer stable, prepared
// exceptions not yet committed or aborted, metadata calls under way) are
// counted in userShards padded counters, so that goroutines on different
// CPUs do not fight over one cache line; only their sum means anything (a
// user may leave through another shard than it entered by). A core that is
// an exstore.ConditionalPreparer counts its prepared exceptions itself, and
// a Prepare under a cached EX then costs the gate no atomic write at all:
// the core allocates only while the state word is the one the Prepare
// read, checked under the lock it counts under. The state word
// holds the mode the node holds, a "closed" bit that sends every newcomer
// to the slow path (draining for a conversion, lost, closed, metadata stale
// after a failed refresh), and a generation that changes with every mode
// change or metadata refresh, so that a lookup done before entering can
// tell whether its answer still holds.
//
// A user increments its shard and then re-reads the state word; a drain
// sets the closed bit and then sums the shards. Both orders are sequentially
// consistent (sync/atomic), so either the drain counts the user or the user
// sees the bit and backs out. Likewise the core's lock orders a drain's
// count of unsettled exceptions, after it set the bit, with a Prepare's
// check of the word and allocation: the count includes the exception, or
// the Prepare sees the bit and allocates nothing.
const (
	modeMask  uint64 = 7
	closedBit uint64 = 1 << 3
	genShift         = 4
)

// userShards is the number of user counters.
const userShards = 16

// userShard is one user counter, alone on its cache line.
type userShard struct {
	n atomic.Uint64
	_ [56]byte
}

func modeOf(w uint64) lockc.Mode { return lockc.Mode(w & modeMask) }
func genOf(w uint64) uint64      { return w >> genShift }

// shardOf picks the user counter for a chunk.
func shardOf(c exstore.Chunk) int { return int(uint64(c) % userShards) }

// admits reports whether a user wanting want may enter on the fast path.
// The node only ever holds NL, CR or EX and users want CR or EX; among
// those modes, one covers another exactly when it is numerically at least
// as high (lockc.Covers, without its loop on the hot path).
func admits(w uint64, want lockc.Mode) bool {
	return w&closedBit == 0 && modeOf(w) >= want
}

// usersInside sums the user counters.
func (s *Store) usersInside() uint64 {
	var n uint64
	for i := range s.users {
		n += s.users[i].n.Load()
	}
	return n
}

// syncKind is how far the core's view of the metadata must be brought up to
// date after a grant.
type syncKind uint8

const (
	syncNone    syncKind = iota
	syncRefresh          // the metadata changed: Refresh (incremental when it only grew)
	syncReload           // the LVB cannot vouch for anything: reload everything
)

// Nested users: a goroutine must not ask the store for a lookup, a
// Prepare or any other metadata call while it holds a lookup miss or a
// prepared exception of the same store. A drain for a conversion closes the
// gate to newcomers until the conversion is done, and the gate cannot tell
// a nested request from a new one: the nested request would wait for the
// drain, and the drain for the holder. The COW engine never nests: a read
// looks its window up with one LookupRange call and releases single
// lookups at once (or holds one only over its I/O), and every Prepare is
// committed or aborted before that goroutine's next store call. Closing
// the gate outright is what keeps a busy node from starving the node it
// drains for.

// enterFast admits a user wanting want through shard if the cached mode
// allows it.
func (s *Store) enterFast(want lockc.Mode, shard int) bool {
	return s.enterIfState(s.state.Load(), want, shard)
}

// enterIfState admits a user wanting want through shard if state w admits
// it and is still the state once the user is counted.
func (s *Store) enterIfState(w uint64, want lockc.Mode, shard int) bool {
	if !admits(w, want) {
		return false
	}
	s.users[shard].n.Add(1)
	if s.state.Load() != w {
		s.leave(shard)
		return false
	}
	return true
}

// enter admits a user wanting want (CR or EX), converting the node's lock
// first if needed. On success the caller must call leave exactly once.
func (s *Store) enter(ctx context.Context, want lockc.Mode, shard int) error {
	if !s.enterFast(want, shard) {
		if err := s.enterSlow(ctx, want, shard); err != nil {
			return err
		}
	}
	if err := s.stopError(); err != nil {
		s.leave(shard)
		return err
	}
	return nil
}

func (s *Store) enterSlow(ctx context.Context, want lockc.Mode, shard int) error {
	s.mu.Lock()
	arrivedFail := s.failGen
	registered := false
	// unregister ends a registered wait and reports whether the manager
	// had already let this waiter in (counted it among the users).
	unregister := func() (handedIn bool) {
		if !registered {
			return false
		}
		registered = false
		if s.tickets[want] > 0 {
			s.tickets[want]--
			return true
		}
		s.demand[want]--
		return false
	}
	// giveUp leaves after an error, undoing an admission the manager made.
	giveUp := func(err error) error {
		handedIn := unregister()
		s.mu.Unlock()
		if handedIn {
			s.leave(shard)
		}
		return err
	}
	for {
		if registered && s.tickets[want] > 0 {
			unregister()
			s.mu.Unlock()
			return nil
		}
		if s.stopErr != nil {
			return giveUp(s.stopErr)
		}
		if s.failGen != arrivedFail {
			return giveUp(s.failErr)
		}
		w := s.state.Load()
		if admits(w, want) {
			if !unregister() {
				s.users[shard].n.Add(1)
			}
			s.mu.Unlock()
			return nil
		}
		if !registered {
			s.demand[want]++
			registered = true
			s.kick()
		}
		ch := s.changed
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			s.mu.Lock()
			return giveUp(fmt.Errorf("cluster %s: waiting for the lock in %v: %w", s.id, want, ctx.Err()))
		}
		s.mu.Lock()
	}
}

// handOutLocked lets in every waiter whose mode m covers: they count as
// users from now on, so a drain that starts next waits for them, and each
// takes its ticket when it wakes. The caller holds mu.
func (s *Store) handOutLocked(m lockc.Mode) {
	for _, want := range []lockc.Mode{lockc.CR, lockc.EX} {
		if n := s.demand[want]; n > 0 && lockc.Covers(m, want) {
			s.demand[want] = 0
			s.tickets[want] += n
			s.users[0].n.Add(uint64(n))
		}
	}
}

// leave ends one user's stay; the last one out of a drain wakes the manager.
func (s *Store) leave(shard int) {
	s.users[shard].n.Add(^uint64(0))
	if s.state.Load()&closedBit != 0 && s.usersInside() == 0 {
		s.wakeDrain()
	}
}

// wakeDrain has a drain under way count again. The signal is buffered, so a
// drain between its count and its wait does not miss it; extra ones cost
// it a count.
func (s *Store) wakeDrain() {
	select {
	case s.drained <- struct{}{}:
	default:
	}
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

// kick wakes the manager to look at the local demand.
func (s *Store) kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// broadcastLocked wakes every slow-path waiter. The caller holds mu.
func (s *Store) broadcastLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// setModeLocked publishes mode m with a new generation; the gate opens
// unless the node is stopped or its metadata is stale. The caller holds mu.
func (s *Store) setModeLocked(m lockc.Mode) {
	w := uint64(m) | (genOf(s.state.Load())+1)<<genShift
	if s.stopErr != nil || s.stale != syncNone {
		w |= closedBit
	}
	s.state.Store(w)
	s.broadcastLocked()
}

// manage is the manager goroutine: it converts the lock for local demand
// and gives it up (or demotes it) when another node needs it.
func (s *Store) manage() {
	defer close(s.managerDone)
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-s.ls.Lost():
			s.stop(s.lostError())
			return
		case m := <-s.lock.Blocking():
			if err := s.yield(m); err != nil {
				s.stopOnError(err)
				return
			}
		case <-s.wake:
		}
		if err := s.serveDemand(); err != nil {
			s.stopOnError(err)
			return
		}
	}
}

// stopOnError stops the gate for an error of the lock engine: lost if the
// lockspace is gone, else that error.
func (s *Store) stopOnError(err error) {
	select {
	case <-s.ls.Lost():
		s.stop(s.lostError())
		return
	default:
	}
	if s.ctx.Err() != nil {
		return // closing
	}
	s.stop(fmt.Errorf("cluster %s: lock: %w", s.id, err))
}

// lostError is the error every operation fails with once the lockspace is
// lost.
func (s *Store) lostError() error {
	cause := s.ls.Err()
	if cause == nil {
		cause = lockc.ErrLost
	}
	if !errors.Is(cause, lockc.ErrLost) {
		cause = fmt.Errorf("%w: %w", lockc.ErrLost, cause)
	}
	return fmt.Errorf("cluster %s: node %d lost its cluster lock, refusing shared-metadata I/O: %w", s.id, s.nodeID, cause)
}

// stop fails every waiter and every later operation with err.
func (s *Store) stop(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopErr == nil {
		s.stopErr = err
		s.stopped.Store(&err)
		s.halt.Or(haltStopped)
	}
	s.state.Or(closedBit)
	s.broadcastLocked()
}

// yield answers a blocking notification for mode m: once the node's users
// are out it gives the lock down to a mode compatible with m (CR for a
// reader if it held EX, NL otherwise), publishing the counter if it leaves
// EX.
func (s *Store) yield(m lockc.Mode) error {
	held := modeOf(s.state.Load())
	if lockc.Compatible(held, m) {
		return nil // stale: already given up
	}
	target := lockc.NL
	if held == lockc.EX && lockc.Compatible(lockc.CR, m) {
		target = lockc.CR
	}
	return s.convertDown(target)
}

// convertDown drains the node's users and converts the lock down to target.
func (s *Store) convertDown(target lockc.Mode) error {
	if err := s.drain(); err != nil {
		return err
	}
	held := modeOf(s.state.Load())
	if held == lockc.EX {
		// Lazily committed exceptions are written before any other node
		// can read the metadata or allocate: with no user inside, none
		// can be added until the next EX. If they cannot be written the
		// node keeps EX and stops, as for a lock error: its view has
		// exceptions the disk lacks, and no other node may allocate their
		// COW chunks while it might still use them. An invalid store is
		// the exception: nothing is allocated in it any more, so holding
		// EX would only keep the other nodes from finding that out.
		if s.lazyWaiting() {
			if err := s.syncLazy(s.ctx); err != nil && !errors.Is(err, exstore.ErrInvalid) {
				return fmt.Errorf("give up EX: %w", err)
			}
		}
		s.publish()
	}
	if err := s.lock.Convert(s.ctx, target); err != nil {
		return err
	}
	s.mu.Lock()
	s.setModeLocked(target)
	s.mu.Unlock()
	s.downConverts.Add(1)
	return nil
}

// drain closes the gate and waits until no user is inside and the core
// counts no unsettled exception. It returns with the gate closed and
// neither left: users arriving meanwhile wait for the conversion that
// follows (see "Nested users" above), and the core allocates nothing under
// the state word that admitted them (exstore.ConditionalPreparer).
func (s *Store) drain() error {
	s.drains.Add(1)
	s.mu.Lock()
	s.state.Or(closedBit)
	s.mu.Unlock()
	for {
		s.mu.Lock()
		// Admissions happen under mu: none can slip in once this sees no
		// user inside. The users are counted before the core's unsettled
		// exceptions: a Prepare that entered leaves only once the core
		// counts its exception. A Prepare that did not enter allocated
		// under the core's lock, either before the count (and is in it)
		// or after the closed bit (and was refused).
		empty := s.usersInside() == 0 && s.unsettled() == 0
		s.mu.Unlock()
		if empty {
			return nil
		}
		// The last user out, and every exception settled while the gate
		// is closed, signal drained (see wakeDrain).
		select {
		case <-s.drained:
		case <-s.ls.Lost():
			return s.lostError()
		case <-s.ctx.Done():
			return s.ctx.Err()
		}
	}
}

// publish stages the counter this node publishes as it leaves EX: the
// value it was granted again if it changed nothing under EX (no Prepare,
// merge or invalidation: an aborted allocation counts as a change), else
// one more than the value it was granted if that was trustworthy, else a
// re-seed above every value it has seen, with a fresh epoch. A merge also
// takes a fresh epoch so that other nodes reload instead of refreshing.
// Called by the manager with no user inside.
func (s *Store) publish() {
	s.mu.Lock()
	defer s.mu.Unlock()
	dirty := s.dirty.Swap(false)
	next := s.seen
	if dirty || !s.trusted || s.shrank {
		next = Counter{Value: s.maxCounter + 1, Epoch: s.seen.Epoch}
		if !s.trusted || s.shrank {
			next.Epoch = newEpoch()
		}
		if s.trusted {
			next.Value = max(next.Value, s.seen.Value+1)
		}
	}
	s.shrank = false
	s.lock.SetLVB(EncodeLVB(next))
	s.seen, s.seenOK, s.trusted = next, true, true
	s.maxCounter = next.Value
	s.publishes.Add(1)
}

// newEpoch returns a random, non-zero epoch.
func newEpoch() uint64 {
	var b [8]byte
	for {
		_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
		if e := binary.LittleEndian.Uint64(b[:]); e != 0 {
			return e
		}
	}
}

// serveDemand converts the lock up for the local users waiting, or retries
// a failed metadata sync.
func (s *Store) serveDemand() error {
	s.mu.Lock()
	want := lockc.NL
	if s.demand[lockc.EX] > 0 {
		want = lockc.EX
	} else if s.demand[lockc.CR] > 0 {
		want = lockc.CR
	}
	held := modeOf(s.state.Load())
	stale := s.stale
	s.mu.Unlock()
	if want == lockc.NL {
		return nil
	}
	if lockc.Covers(held, want) {
		if stale != syncNone {
			s.syncAfterGrant(held, syncNone)
		}
		return nil
	}
	if held != lockc.NL {
		// Up-conversions always start from NL: converting CR to EX in
		// place risks a conversion deadlock with another node doing the
		// same.
		if err := s.convertDown(lockc.NL); err != nil {
			return err
		}
	}
	// QueueConvert: behind conversions already waiting, so that a node
	// that just gave the lock up does not take it straight back.
	if err := s.lock.Convert(s.ctx, want, lockc.QueueConvert); err != nil {
		if errors.Is(err, lockc.ErrLost) || s.ctx.Err() != nil {
			return err
		}
		s.failWaiters(fmt.Errorf("cluster %s: convert to %v: %w", s.id, want, err))
		return nil
	}
	s.upConverts.Add(1)
	s.syncAfterGrant(want, s.judgeLVB())
	return nil
}

// failWaiters fails the slow-path waiters present now with err.
func (s *Store) failWaiters(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failGen++
	s.failErr = err
	s.broadcastLocked()
}

// judgeLVB reads the LVB of a fresh grant and decides how much of the
// metadata to re-read (specs/locks.md §5): nothing if it is the value this
// node last saw, a refresh if it moved on in the same epoch, a full reload
// if it is invalid, unknown after a known value, in another epoch, or went
// backwards.
func (s *Store) judgeLVB() syncKind {
	b, state := s.lock.LVB()
	c, ok := DecodeLVB(b)
	s.mu.Lock()
	defer s.mu.Unlock()
	first := !s.granted
	s.granted = true
	if ok {
		s.maxCounter = max(s.maxCounter, c.Value)
	}
	if state == lockc.LVBValid && ok {
		kind := syncReload
		switch {
		case s.seenOK && c.Value == s.seen.Value && c.Epoch == s.seen.Epoch:
			kind = syncNone
		case s.seenOK && c.Epoch == s.seen.Epoch && c.Value > s.seen.Value:
			kind = syncRefresh
		case first:
			// The core loaded the metadata when it was opened; Refresh
			// catches up from there (and reloads on its own if the
			// metadata shrank).
			kind = syncRefresh
		}
		s.seen, s.seenOK, s.trusted = c, true, true
		return kind
	}
	s.seenOK, s.trusted = false, false
	if state == lockc.LVBInvalid {
		s.invalidSeen.Add(1)
		return syncReload
	}
	if first {
		// A fresh resource: nobody published since the cluster started.
		return syncRefresh
	}
	return syncReload // content lost after a known value
}

// syncAfterGrant brings the core up to date (kind, or what a failed earlier
// attempt still owes) and opens the gate in mode m; if the sync fails the
// gate stays closed and the waiters get the error.
func (s *Store) syncAfterGrant(m lockc.Mode, kind syncKind) {
	s.mu.Lock()
	kind = max(kind, s.stale)
	s.mu.Unlock()
	err := s.syncCore(kind)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.stale = kind
		s.failGen++
		s.failErr = fmt.Errorf("cluster %s: bring metadata up to date: %w", s.id, err)
		s.setModeLocked(m)
		return
	}
	s.stale = syncNone
	if kind != syncNone {
		s.syncGen++
	}
	// The waiters that asked for this grant get in before the manager can
	// look at a blocking notification: otherwise two nodes could pass the
	// lock back and forth with neither's users ever getting in.
	s.handOutLocked(m)
	s.setModeLocked(m)
}

// syncCore re-reads the metadata: Refresh, or a full reload through
// Options.Reopen (Refresh when there is none). No user is inside.
func (s *Store) syncCore(kind syncKind) error {
	switch kind {
	case syncNone:
		return nil
	case syncReload:
		s.reloads.Add(1)
		if s.reopen != nil {
			fresh, err := s.reopen(s.ctx)
			if err != nil {
				return fmt.Errorf("reload: %w", err)
			}
			s.swapMu.Lock()
			old := s.setCore(fresh)
			s.swapMu.Unlock()
			return old.Close()
		}
	}
	s.refreshes.Add(1)
	return s.core.Load().s.Refresh(s.ctx)
}
