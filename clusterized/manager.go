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

// metadataView is what the lock manager needs of the store it serves, whose
// metadata view it keeps in step with the lock. The manager calls these
// with no user inside the gate.
type metadataView interface {
	// reload replaces the core with a fresh instance (a full reload); it
	// reports false, having done nothing, if the store has no way to.
	reload(ctx context.Context) (bool, error)
	// refresh has the core re-read what other nodes changed.
	refresh(ctx context.Context) error
	// syncLazy has the core write the exceptions committed lazily.
	syncLazy(ctx context.Context) error
	// unsettled is how many prepared exceptions the core counts as not
	// settled, which hold the lock as users inside do.
	unsettled() int
}

// syncKind is how far the core's view of the metadata must be brought up to
// date after a grant.
type syncKind uint8

const (
	syncNone    syncKind = iota
	syncRefresh          // the metadata changed: Refresh (incremental when it only grew)
	syncReload           // the LVB cannot vouch for anything: reload everything
)

// lockManager holds the node's cluster lock for a store: it converts the
// lock up for the local users waiting at the gate, gives it down when
// another node needs it (draining the gate first), publishes the counter
// as it leaves EX, judges the LVB of every grant and has the store's
// metadata brought up to date accordingly, and stops the store when the
// lock fails or the lockspace is lost. One goroutine (run) makes every
// conversion; users only wait for it (wait).
//
// Locking: mu guards the fields below it and orders the slow-path
// admissions into the gate with drains (see gate). The gate's state word
// changes only under mu: the manager goroutine opens it in a new mode,
// drain and stop close it. dirty is set by users without mu and cleared by
// publish, with no user inside. The manager calls into the store (view)
// without holding mu.
//
// A lockManager is ready once start has run.
type lockManager struct {
	// dirty says the metadata may have changed under the current EX: a
	// Prepare (lazy commits may wait to be written), merge or
	// invalidation. Every Prepare reads it, so it leads the struct, next
	// to the fields read-only after start.
	dirty atomic.Bool

	id     string // the cluster id, for errors
	nodeID uint32
	ls     lockc.Lockspace
	lock   lockc.Lock
	gate   *gate
	view   metadataView
	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wake   chan struct{} // local demand to look at
	done   chan struct{} // closed when run returns

	mu         sync.Mutex
	changed    chan struct{} // closed and replaced on every change a waiter looks for
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

	upConverts, downConverts, publishes, refreshes, reloads, invalidSeen, drains atomic.Uint64
}

// start readies m to hold lock, taken in NL in ls, for the store of cluster
// id whose gate is g and metadata view is view, and starts its goroutine.
func (m *lockManager) start(id string, ls lockc.Lockspace, lock lockc.Lock, g *gate, view metadataView) {
	m.id, m.nodeID, m.ls, m.lock, m.gate, m.view = id, ls.NodeID(), ls, lock, g, view
	m.wake = make(chan struct{}, 1)
	m.done = make(chan struct{})
	m.changed = make(chan struct{})
	m.ctx, m.cancel = context.WithCancel(context.Background())
	go m.run()
}

// stats returns the counters of cluster work.
func (m *lockManager) stats() Stats {
	return Stats{
		UpConverts:   m.upConverts.Load(),
		DownConverts: m.downConverts.Load(),
		Publishes:    m.publishes.Load(),
		Refreshes:    m.refreshes.Load(),
		Reloads:      m.reloads.Load(),
		InvalidLVBs:  m.invalidSeen.Load(),
		Drains:       m.drains.Load(),
	}
}

// markDirty notes a change of the metadata under the current EX; the
// load first keeps the flag's line shared while it is set.
func (m *lockManager) markDirty() {
	if !m.dirty.Load() {
		m.dirty.Store(true)
	}
}

// wait admits a user wanting want (CR or EX) through shard once the lock
// covers it, asking for a conversion. It fails if the store stops, if the
// conversion or the metadata sync that follows fails, or when ctx ends.
func (m *lockManager) wait(ctx context.Context, want lockc.Mode, shard int) error {
	m.mu.Lock()
	arrivedFail := m.failGen
	registered := false
	// unregister ends a registered wait and reports whether the manager
	// had already let this waiter in (counted it among the users).
	unregister := func() (handedIn bool) {
		if !registered {
			return false
		}
		registered = false
		if m.tickets[want] > 0 {
			m.tickets[want]--
			return true
		}
		m.demand[want]--
		return false
	}
	// giveUp leaves after an error, undoing an admission the manager made.
	giveUp := func(err error) error {
		handedIn := unregister()
		m.mu.Unlock()
		if handedIn {
			m.gate.leave(shard)
		}
		return err
	}
	for {
		if registered && m.tickets[want] > 0 {
			unregister()
			m.mu.Unlock()
			return nil
		}
		if m.stopErr != nil {
			return giveUp(m.stopErr)
		}
		if m.failGen != arrivedFail {
			return giveUp(m.failErr)
		}
		if admits(m.gate.state.Load(), want) {
			if !unregister() {
				m.gate.admit(shard, 1)
			}
			m.mu.Unlock()
			return nil
		}
		if !registered {
			m.demand[want]++
			registered = true
			m.kick()
		}
		ch := m.changed
		m.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			m.mu.Lock()
			return giveUp(fmt.Errorf("cluster %s: waiting for the lock in %v: %w", m.id, want, ctx.Err()))
		}
		m.mu.Lock()
	}
}

// handOutLocked lets in every waiter whose mode held covers: they count as
// users from now on, so a drain that starts next waits for them, and each
// takes its ticket when it wakes. The caller holds mu.
func (m *lockManager) handOutLocked(held lockc.Mode) {
	for _, want := range []lockc.Mode{lockc.CR, lockc.EX} {
		if n := m.demand[want]; n > 0 && lockc.Covers(held, want) {
			m.demand[want] = 0
			m.tickets[want] += n
			m.gate.admit(0, uint64(n))
		}
	}
}

// kick wakes the manager to look at the local demand.
func (m *lockManager) kick() {
	select {
	case m.wake <- struct{}{}:
	default:
	}
}

// broadcastLocked wakes every slow-path waiter. The caller holds mu.
func (m *lockManager) broadcastLocked() {
	close(m.changed)
	m.changed = make(chan struct{})
}

// setModeLocked opens the gate in mode held with a new generation, or
// leaves it closed if the node is stopped or its metadata is stale. The
// caller holds mu.
func (m *lockManager) setModeLocked(held lockc.Mode) {
	m.gate.set(held, m.stopErr != nil || m.stale != syncNone)
	m.broadcastLocked()
}

// run is the manager goroutine: it converts the lock for local demand and
// gives it up (or demotes it) when another node needs it.
func (m *lockManager) run() {
	defer close(m.done)
	for {
		select {
		case <-m.ctx.Done():
			return
		case <-m.ls.Lost():
			m.stop(m.lostError())
			return
		case mode := <-m.lock.Blocking():
			if err := m.yield(mode); err != nil {
				m.stopOnError(err)
				return
			}
		case <-m.wake:
		}
		if err := m.serveDemand(); err != nil {
			m.stopOnError(err)
			return
		}
	}
}

// stopOnError stops the store for an error of the lock engine: lost if the
// lockspace is gone, else that error.
func (m *lockManager) stopOnError(err error) {
	select {
	case <-m.ls.Lost():
		m.stop(m.lostError())
		return
	default:
	}
	if m.ctx.Err() != nil {
		return // closing
	}
	m.stop(fmt.Errorf("cluster %s: lock: %w", m.id, err))
}

// lostError is the error every operation fails with once the lockspace is
// lost.
func (m *lockManager) lostError() error {
	cause := m.ls.Err()
	if cause == nil {
		cause = lockc.ErrLost
	}
	if !errors.Is(cause, lockc.ErrLost) {
		cause = fmt.Errorf("%w: %w", lockc.ErrLost, cause)
	}
	return fmt.Errorf("cluster %s: node %d lost its cluster lock, refusing shared-metadata I/O: %w", m.id, m.nodeID, cause)
}

// stop fails every waiter and every later operation with err (the first
// err, if stopped twice), and closes the gate for good.
func (m *lockManager) stop(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.stopErr == nil {
		m.stopErr = err
		m.gate.halted(err)
	}
	m.gate.close()
	m.broadcastLocked()
}

// yield answers a blocking notification for mode want: once the node's
// users are out it gives the lock down to a mode compatible with want (CR
// for a reader if it held EX, NL otherwise), publishing the counter if it
// leaves EX.
func (m *lockManager) yield(want lockc.Mode) error {
	held := m.gate.mode()
	if lockc.Compatible(held, want) {
		return nil // stale: already given up
	}
	target := lockc.NL
	if held == lockc.EX && lockc.Compatible(lockc.CR, want) {
		target = lockc.CR
	}
	return m.convertDown(target)
}

// convertDown drains the gate and converts the lock down to target.
func (m *lockManager) convertDown(target lockc.Mode) error {
	if err := m.drain(); err != nil {
		return err
	}
	if m.gate.mode() == lockc.EX {
		// Lazily committed exceptions are written before any other node
		// can read the metadata or allocate: with no user inside, none
		// can be added until the next EX. If they cannot be written the
		// node keeps EX and stops, as for a lock error: its view has
		// exceptions the disk lacks, and no other node may allocate their
		// COW chunks while it might still use them. An invalid store is
		// the exception: nothing is allocated in it any more, so holding
		// EX would only keep the other nodes from finding that out.
		if err := m.writeLazy(m.ctx); err != nil {
			return fmt.Errorf("give up EX: %w", err)
		}
		m.publish()
	}
	if err := m.lock.Convert(m.ctx, target); err != nil {
		return err
	}
	m.mu.Lock()
	m.setModeLocked(target)
	m.mu.Unlock()
	m.downConverts.Add(1)
	return nil
}

// writeLazy has the store write the exceptions committed lazily under the
// current EX, if anything may have been prepared under it (dirty). That
// over-approximates (the exceptions may have been committed durably, or
// written by the core on its own), which costs the give-up of EX one core
// Sync too many, so that lazy commits cost no shared counter. An invalid
// store writes nothing more, and is no error here. Called with no user
// inside and no exception unsettled, so none can be prepared meanwhile.
func (m *lockManager) writeLazy(ctx context.Context) error {
	if !m.dirty.Load() {
		return nil
	}
	if err := m.view.syncLazy(ctx); err != nil && !errors.Is(err, exstore.ErrInvalid) {
		return err
	}
	return nil
}

// drain closes the gate and waits until no user is inside and the core
// counts no unsettled exception (gate.drain).
func (m *lockManager) drain() error {
	m.drains.Add(1)
	err := m.gate.drain(m.ctx, &m.mu, m.view.unsettled, m.ls.Lost())
	if errors.Is(err, lockc.ErrLost) {
		return m.lostError()
	}
	return err
}

// publish stages the counter this node publishes as it leaves EX: the
// value it was granted again if it changed nothing under EX (no Prepare,
// merge or invalidation: an aborted allocation counts as a change), else
// one more than the value it was granted if that was trustworthy, else a
// re-seed above every value it has seen, with a fresh epoch. A merge also
// takes a fresh epoch so that other nodes reload instead of refreshing.
// Called with no user inside.
func (m *lockManager) publish() {
	m.mu.Lock()
	defer m.mu.Unlock()
	dirty := m.dirty.Swap(false)
	next := m.seen
	if dirty || !m.trusted || m.shrank {
		next = Counter{Value: m.maxCounter + 1, Epoch: m.seen.Epoch}
		if !m.trusted || m.shrank {
			next.Epoch = newEpoch()
		}
		if m.trusted {
			next.Value = max(next.Value, m.seen.Value+1)
		}
	}
	m.shrank = false
	m.lock.SetLVB(EncodeLVB(next))
	m.seen, m.seenOK, m.trusted = next, true, true
	m.maxCounter = next.Value
	m.publishes.Add(1)
}

// serveDemand converts the lock up for the local users waiting, or retries
// a failed metadata sync.
func (m *lockManager) serveDemand() error {
	m.mu.Lock()
	want := lockc.NL
	if m.demand[lockc.EX] > 0 {
		want = lockc.EX
	} else if m.demand[lockc.CR] > 0 {
		want = lockc.CR
	}
	held := m.gate.mode()
	stale := m.stale
	m.mu.Unlock()
	if want == lockc.NL {
		return nil
	}
	if lockc.Covers(held, want) {
		if stale != syncNone {
			m.syncAfterGrant(held, syncNone)
		}
		return nil
	}
	if held != lockc.NL {
		// Up-conversions always start from NL: converting CR to EX in
		// place risks a conversion deadlock with another node doing the
		// same.
		if err := m.convertDown(lockc.NL); err != nil {
			return err
		}
	}
	// QueueConvert: behind conversions already waiting, so that a node
	// that just gave the lock up does not take it straight back.
	if err := m.lock.Convert(m.ctx, want, lockc.QueueConvert); err != nil {
		if errors.Is(err, lockc.ErrLost) || m.ctx.Err() != nil {
			return err
		}
		m.failWaiters(fmt.Errorf("cluster %s: convert to %v: %w", m.id, want, err))
		return nil
	}
	m.upConverts.Add(1)
	m.syncAfterGrant(want, m.judgeLVB())
	return nil
}

// failWaiters fails the slow-path waiters present now with err.
func (m *lockManager) failWaiters(err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failGen++
	m.failErr = err
	m.broadcastLocked()
}

// judgeLVB reads the LVB of a fresh grant and decides how much of the
// metadata to re-read (specs/locks.md §5): nothing if it is the value this
// node last saw, a refresh if it moved on in the same epoch, a full reload
// if it is invalid, unknown after a known value, in another epoch, or went
// backwards.
func (m *lockManager) judgeLVB() syncKind {
	b, state := m.lock.LVB()
	c, ok := DecodeLVB(b)
	m.mu.Lock()
	defer m.mu.Unlock()
	first := !m.granted
	m.granted = true
	if ok {
		m.maxCounter = max(m.maxCounter, c.Value)
	}
	if state == lockc.LVBValid && ok {
		kind := syncReload
		switch {
		case m.seenOK && c.Value == m.seen.Value && c.Epoch == m.seen.Epoch:
			kind = syncNone
		case m.seenOK && c.Epoch == m.seen.Epoch && c.Value > m.seen.Value:
			kind = syncRefresh
		case first:
			// The core loaded the metadata when it was opened; Refresh
			// catches up from there (and reloads on its own if the
			// metadata shrank).
			kind = syncRefresh
		}
		m.seen, m.seenOK, m.trusted = c, true, true
		return kind
	}
	m.seenOK, m.trusted = false, false
	if state == lockc.LVBInvalid {
		m.invalidSeen.Add(1)
		return syncReload
	}
	if first {
		// A fresh resource: nobody published since the cluster started.
		return syncRefresh
	}
	return syncReload // content lost after a known value
}

// syncAfterGrant brings the core up to date (kind, or what a failed earlier
// attempt still owes) and opens the gate in mode held; if the sync fails
// the gate stays closed and the waiters get the error.
func (m *lockManager) syncAfterGrant(held lockc.Mode, kind syncKind) {
	m.mu.Lock()
	kind = max(kind, m.stale)
	m.mu.Unlock()
	err := m.syncCore(kind)
	m.mu.Lock()
	defer m.mu.Unlock()
	if err != nil {
		m.stale = kind
		m.failGen++
		m.failErr = fmt.Errorf("cluster %s: bring metadata up to date: %w", m.id, err)
		m.setModeLocked(held)
		return
	}
	m.stale = syncNone
	if kind != syncNone {
		m.syncGen++
	}
	// The waiters that asked for this grant get in before the manager can
	// look at a blocking notification: otherwise two nodes could pass the
	// lock back and forth with neither's users ever getting in.
	m.handOutLocked(held)
	m.setModeLocked(held)
}

// syncCore re-reads the metadata: Refresh, or a full reload (Refresh when
// the store cannot reload). No user is inside.
func (m *lockManager) syncCore(kind syncKind) error {
	switch kind {
	case syncNone:
		return nil
	case syncReload:
		m.reloads.Add(1)
		if reloaded, err := m.view.reload(m.ctx); reloaded || err != nil {
			return err
		}
	}
	m.refreshes.Add(1)
	return m.view.refresh(m.ctx)
}

// notePrepareMerge records that a merge step was prepared on the metadata
// as last re-read.
func (m *lockManager) notePrepareMerge() {
	m.mu.Lock()
	m.mergeGen = m.syncGen
	m.mu.Unlock()
}

// rereadSinceMerge reports whether the metadata was re-read (another node
// changed it) since the last PrepareMerge.
func (m *lockManager) rereadSinceMerge() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.syncGen != m.mergeGen
}

// noteShrank records that a merge removed exceptions under the current EX:
// the next counter takes a fresh epoch.
func (m *lockManager) noteShrank() {
	m.mu.Lock()
	m.shrank = true
	m.mu.Unlock()
}

// shutdown stops the manager goroutine and waits for it; it reports false
// if the store was closed before.
func (m *lockManager) shutdown() bool {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return false
	}
	m.closed = true
	m.mu.Unlock()
	m.cancel()
	<-m.done
	return true
}

// unlock gives the lock up after shutdown, publishing the counter (after
// writing the lazy commits waiting) if the node holds EX.
func (m *lockManager) unlock() error {
	var errs []error
	if m.gate.mode() == lockc.EX {
		// The core would write waiting lazy commits as it closes, after
		// the unlock: write them while this node still holds EX.
		if err := m.writeLazy(context.Background()); err != nil {
			errs = append(errs, err)
		}
		m.publish()
	}
	if err := m.lock.Unlock(context.Background()); err != nil && !errors.Is(err, lockc.ErrLost) {
		errs = append(errs, fmt.Errorf("cluster %s: unlock: %w", m.id, err))
	}
	return errors.Join(errs...)
}
