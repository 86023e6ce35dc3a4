package snapset

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/lockc"
)

var (
	// ErrSetMismatch is wrapped by Join's refusal of a node whose set is
	// not the cluster's (a *MismatchError says how they differ).
	ErrSetMismatch = errors.New("this node's snapshot set differs from the cluster's")
	// ErrSetChanged is wrapped by Enter's refusal once another node
	// published a set that is not this member's.
	ErrSetChanged = errors.New("the cluster's snapshot set changed")
	// ErrClosed is wrapped by Enter's refusal after Close.
	ErrClosed = errors.New("origin lock closed")
)

// MismatchError is Join's refusal of a node whose set is not the one the
// cluster published. It wraps ErrSetMismatch.
type MismatchError struct {
	Resource string
	Local    Set   // this node's set
	Cluster  Value // the cluster's, as its LVB publishes it
}

func (e *MismatchError) Error() string {
	diff := ""
	switch n, c := e.Local.Len(), int(e.Cluster.Count); {
	case n < c:
		diff = fmt.Sprintf("%d snapshot(s) fewer than the cluster", c-n)
	case n > c:
		diff = fmt.Sprintf("%d snapshot(s) more than the cluster", n-c)
	default:
		diff = "as many snapshots as the cluster, but not the same COWs"
	}
	return fmt.Sprintf("origin lock %s: %v: this node serves %s; the cluster serves %s: this node has %s; "+
		"every node serving the origin must serve the same --snapshot list, or its origin writes would overwrite chunks without copying them",
		e.Resource, ErrSetMismatch, e.Local, e.Cluster, diff)
}

// Unwrap returns ErrSetMismatch.
func (e *MismatchError) Unwrap() error { return ErrSetMismatch }

// The bits of Member.state, all zero while the gate is open.
const (
	stateClosed uint32 = 1 << iota // newcomers wait (drain, conversion) or fail (stopped)
	stateLost                      // the lockspace's OnLost ran
	stateAsk                       // the lockspace notifies no loss: admit on the slow path only
)

// Member is a node's membership of an origin's snapshot set: its lock on
// the origin resource, held in PR while the node's set is the cluster's,
// and the gate that admits the node's origin writes under it.
type Member struct {
	ls       lockc.Lockspace
	lock     lockc.Lock
	resource string

	// state is the gate's word (the state* bits); users counts the
	// writes inside; drained wakes a drain under way when the last one
	// leaves (buffered: a drain between its count and its wait does not
	// miss it).
	state   atomic.Uint32
	users   atomic.Int64
	drained chan struct{}
	leaveFn func() // m.leave, made once so that Enter does not allocate

	// mu orders slow-path admissions with a drain's closing of the gate,
	// and guards opened and stopErr.
	mu sync.Mutex
	// opened is closed while the gate is open or stopped; waiters in
	// Enter wait for it.
	opened     chan struct{}
	openedDone bool
	stopErr    error

	// opMu serializes the lock's operations (one at a time, as lockc
	// requires): the manager's giving way, Change, Close. set and cur
	// change under it.
	opMu sync.Mutex
	set  Set
	cur  atomic.Pointer[Value]

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	done   chan struct{} // closed when the manager returns
	once   sync.Once

	// follower, if set, follows other nodes' changes (JoinFollowing).
	follower Follower

	mut mutation // zero: none (tests set one, see export_test.go)
	// drainWaits, if set (by tests), is called when a drain starts to
	// wait for changes inside.
	drainWaits func()
}

// mutation breaks the member on purpose, for tests that must catch it.
type mutation uint8

const (
	mutNone        mutation = iota
	mutAdmitClosed          // the slow path admits while the gate is closed
	mutNoDrain              // giving way converts without waiting for the writes inside
)

// Join makes this node a member of the snapshot set published on resource
// in ls, serving set. It takes the resource in NL, then PR (queued behind
// a change under way). If the LVB publishes a set, set must match it, or
// Join fails with a *MismatchError (errors.Is ErrSetMismatch) and holds
// nothing. If it publishes none (the first node, or a node died in EX
// while changing it), Join converts to EX, publishes set as the next
// generation unless another node published meanwhile, and comes back to
// PR. A value block that is not a snapshot set fails with ErrForeignValue.
//
// The member's gate is open when Join returns. The caller keeps ls and
// closes it after the member.
func Join(ctx context.Context, ls lockc.Lockspace, resource string, set Set) (*Member, error) {
	return JoinFollowing(ctx, ls, resource, set, nil)
}

// Follower is how a member follows the changes other nodes make to the
// set. Both run while this node's gate is closed and drained: no origin
// change of this node is in flight, and none is admitted until they
// return.
type Follower interface {
	// Quiesced runs once the member's origin changes have drained, as it
	// gives way to a node that wants to change the set, before it lets
	// go of PR: it makes them durable (a flush of the origin), so that a
	// snapshot taken by the other node holds them also across a crash.
	// An error stops the member.
	Quiesced(ctx context.Context) error
	// Adopt runs when the member reads a value other than the one it last
	// read: another node changed the set, or published the same set again
	// after changing what its snapshots hold (a merge step), which the
	// node must catch up with (re-read the stores' metadata). It makes
	// this node serve the set that v publishes, and returns the set it
	// serves now. Its ctx admits origin changes through Enter at once. If that set
	// matches v the gate opens on it; if it does not, or Adopt fails, the
	// member stops (Enter fails), so that this node never writes the
	// origin without copying into a snapshot of the cluster's.
	Adopt(ctx context.Context, v Value) (Set, error)
}

// JoinFollowing is Join with a Follower: a member that adopts the sets
// other nodes publish instead of stopping. f may be nil (then it is Join).
func JoinFollowing(ctx context.Context, ls lockc.Lockspace, resource string, set Set, f Follower) (*Member, error) {
	lock, err := ls.Lock(ctx, []byte(resource), lockc.NL, lockc.Expedite)
	if err != nil {
		return nil, fmt.Errorf("origin lock %s: %w", resource, err)
	}
	m := newMember(ls, lock, resource, set)
	m.follower = f
	v, err := m.joinPR(ctx)
	if err != nil {
		_ = lock.Unlock(context.WithoutCancel(ctx))
		m.cancel()
		return nil, err
	}
	m.cur.Store(&v)
	if ln, ok := ls.(lockc.LostNotifier); ok {
		ln.OnLost(func() { m.state.Or(stateLost | stateClosed) })
	} else {
		m.state.Or(stateAsk)
	}
	go m.manage()
	return m, nil
}

func newMember(ls lockc.Lockspace, lock lockc.Lock, resource string, set Set) *Member {
	ctx, cancel := context.WithCancel(context.Background())
	m := &Member{
		ls: ls, lock: lock, resource: resource, set: set,
		drained: make(chan struct{}, 1),
		opened:  make(chan struct{}),
		ctx:     ctx, cancel: cancel,
		done: make(chan struct{}),
	}
	m.leaveFn = m.leave
	close(m.opened)
	m.openedDone = true
	return m
}

// joinPR converts the NL lock to PR and settles the value.
func (m *Member) joinPR(ctx context.Context) (Value, error) {
	if err := m.lock.Convert(ctx, lockc.PR, lockc.QueueConvert); err != nil {
		return Value{}, fmt.Errorf("origin lock %s: %w", m.resource, err)
	}
	return m.settle(ctx, Value{}, func(v Value) error {
		return &MismatchError{Resource: m.resource, Local: m.set, Cluster: v}
	})
}

// settle reads the value the lock (in PR) carries and returns it if it
// publishes m.set, or mismatch's error if it publishes another. With no
// value, it publishes m.set under EX as the generation after the highest
// it knows of (known, or the value a dead writer left), unless another
// node published meanwhile, and returns in PR. On error the lock is in PR
// or NL.
func (m *Member) settle(ctx context.Context, known Value, mismatch func(Value) error) (Value, error) {
	for {
		b, st := m.lock.LVB()
		if st == lockc.LVBValid {
			v, ok, err := DecodeLVB(b)
			if err != nil {
				return Value{}, fmt.Errorf("origin lock %s: %w", m.resource, err)
			}
			if ok {
				if !m.set.Matches(v) {
					return Value{}, mismatch(v)
				}
				return v, nil
			}
		}
		// No value: publish this node's set under EX. Going through NL
		// keeps two nodes doing this at once out of a conversion deadlock.
		if err := m.lock.Convert(ctx, lockc.NL); err != nil {
			return Value{}, fmt.Errorf("origin lock %s: %w", m.resource, err)
		}
		if err := m.lock.Convert(ctx, lockc.EX); err != nil {
			return Value{}, fmt.Errorf("origin lock %s: %w", m.resource, err)
		}
		b, st = m.lock.LVB()
		if v, ok, err := DecodeLVB(b); st == lockc.LVBValid && (ok || err != nil) {
			// Another node published meanwhile (or the block is foreign):
			// leaving EX republishes it as read, and the loop judges it.
			if err := m.lock.Convert(context.WithoutCancel(ctx), lockc.PR); err != nil {
				return Value{}, fmt.Errorf("origin lock %s: %w", m.resource, err)
			}
			continue
		} else if ok && err == nil {
			// A dead writer's value: its generation is still the
			// highest published.
			known.Generation = max(known.Generation, v.Generation)
		}
		v := m.set.Value(known.Generation + 1)
		m.lock.SetLVB(EncodeLVB(v))
		if err := m.lock.Convert(context.WithoutCancel(ctx), lockc.PR); err != nil {
			return Value{}, fmt.Errorf("origin lock %s: %w", m.resource, err)
		}
		return v, nil
	}
}

// Value is the cluster's value this member last read or published.
func (m *Member) Value() Value { return *m.cur.Load() }

// Set is the set this member serves.
func (m *Member) Set() Set {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	return m.set
}

// Enter admits one origin change (a write, a trim, zeroes, a merge run)
// while this node holds the origin lock in PR with its set current: leave
// ends it, once the change is done. While another node waits for EX, Enter
// waits for the set to be read again; it fails once the set changed
// (ErrSetChanged), the lockspace is lost (the lockspace's loss, wrapping
// lockc.ErrLost), the member is closed (ErrClosed), or ctx ends while it
// waits. An open gate admits without looking at ctx.
func (m *Member) Enter(ctx context.Context) (leave func(), err error) {
	if m.state.Load() == 0 {
		m.users.Add(1)
		// A drain sets stateClosed before it counts the users: this
		// load sees it, or the drain counts this user.
		if m.state.Load() == 0 {
			return m.leaveFn, nil
		}
		m.leave()
	}
	if ctx.Value(exclusiveKey{}) == m {
		// The caller is this member's own change (Update's callback, a
		// follower's Adopt): no other origin change runs anywhere.
		return noLeave, nil
	}
	return m.enterSlow(ctx)
}

// exclusiveKey marks the context of a callback that runs while no origin
// change of the cluster runs: its value is the member.
type exclusiveKey struct{}

// exclusive is ctx marked as m's exclusive callback's.
func (m *Member) exclusive(ctx context.Context) context.Context {
	return context.WithValue(ctx, exclusiveKey{}, m)
}

func noLeave() {}

// enterSlow admits under mu, which a drain holds as it closes the gate.
func (m *Member) enterSlow(ctx context.Context) (func(), error) {
	for {
		m.mu.Lock()
		if err := m.stopErrorLocked(); err != nil {
			m.mu.Unlock()
			return nil, err
		}
		if m.state.Load()&stateClosed == 0 || m.mut == mutAdmitClosed {
			m.users.Add(1)
			m.mu.Unlock()
			return m.leaveFn, nil
		}
		opened := m.opened
		m.mu.Unlock()
		select {
		case <-opened:
		case <-m.ls.Lost():
		case <-ctx.Done():
			return nil, fmt.Errorf("origin lock %s: waiting for the snapshot set: %w", m.resource, ctx.Err())
		}
	}
}

// stopErrorLocked is why the member admits nothing any more, or nil.
func (m *Member) stopErrorLocked() error {
	lost := m.state.Load()&stateLost != 0
	if !lost {
		select {
		case <-m.ls.Lost():
			lost = true
		default:
		}
	}
	if lost {
		err := m.ls.Err()
		if err == nil { // OnLost runs before Err is set
			err = lockc.ErrLost
		}
		return fmt.Errorf("origin lock %s: %w", m.resource, err)
	}
	return m.stopErr
}

// leave ends one change's stay; the last one out wakes a drain.
func (m *Member) leave() {
	if m.users.Add(-1) == 0 && m.state.Load()&stateClosed != 0 {
		select {
		case m.drained <- struct{}{}:
		default:
		}
	}
}

// closeGate sends newcomers to wait.
func (m *Member) closeGate() {
	m.mu.Lock()
	m.state.Or(stateClosed)
	if m.openedDone {
		m.opened = make(chan struct{})
		m.openedDone = false
	}
	m.mu.Unlock()
}

// openGate admits again, unless the member stopped.
func (m *Member) openGate() {
	m.mu.Lock()
	if m.stopErr == nil {
		m.state.And(^stateClosed)
	}
	m.wakeLocked()
	m.mu.Unlock()
}

func (m *Member) wakeLocked() {
	if !m.openedDone {
		close(m.opened)
		m.openedDone = true
	}
}

// stop closes the gate for good with err (the first error stays).
func (m *Member) stop(err error) {
	m.mu.Lock()
	if m.stopErr == nil {
		m.stopErr = err
	}
	m.state.Or(stateClosed)
	m.wakeLocked()
	m.mu.Unlock()
}

// drain closes the gate and waits until no change is inside.
func (m *Member) drain(ctx context.Context) error {
	m.closeGate()
	if m.mut == mutNoDrain {
		return nil
	}
	if m.users.Load() != 0 && m.drainWaits != nil {
		m.drainWaits()
	}
	for m.users.Load() != 0 {
		select {
		case <-m.drained:
		case <-m.ls.Lost():
			return fmt.Errorf("origin lock %s: %w", m.resource, lockc.ErrLost)
		case <-ctx.Done():
			return fmt.Errorf("origin lock %s: waiting for origin writes to leave: %w", m.resource, ctx.Err())
		}
	}
	return nil
}

// manage gives way to every node that waits for EX, until Close.
func (m *Member) manage() {
	defer close(m.done)
	for {
		select {
		case <-m.lock.Blocking():
			m.opMu.Lock()
			if m.lock.Mode() == lockc.PR && m.stopped() == nil {
				m.giveWay()
			}
			m.opMu.Unlock()
		case <-m.ls.Lost():
			m.stop(fmt.Errorf("origin lock %s: %w", m.resource, lockc.ErrLost))
			return
		case <-m.ctx.Done():
			return
		}
	}
}

func (m *Member) stopped() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.stopErrorLocked()
}

// giveWay lets a node waiting for EX have it: it drains the origin writes,
// goes down to NL, queues for PR behind the EX holder, and reads the set
// again. m.opMu is held.
func (m *Member) giveWay() {
	if err := m.drain(m.ctx); err != nil {
		m.stop(err)
		return
	}
	if m.follower != nil {
		if err := m.follower.Quiesced(m.ctx); err != nil {
			m.stop(fmt.Errorf("origin lock %s: giving way: %w", m.resource, err))
			// Stopped, it must not keep the change waiting.
			_ = m.lock.Convert(context.WithoutCancel(m.ctx), lockc.NL)
			return
		}
	}
	if err := m.lock.Convert(m.ctx, lockc.NL); err != nil {
		m.stop(fmt.Errorf("origin lock %s: %w", m.resource, err))
		return
	}
	m.rejoin()
}

// rejoin converts the lock from NL back to PR, queued behind the
// conversions waiting (a change under way), and reads the set again: the
// same set opens the gate, another stops the member with ErrSetChanged and
// leaves the lock in NL. m.opMu is held.
func (m *Member) rejoin() {
	if err := m.lock.Convert(m.ctx, lockc.PR, lockc.QueueConvert); err != nil {
		m.stop(fmt.Errorf("origin lock %s: %w", m.resource, err))
		return
	}
	var changed *Value
	v, err := m.settle(m.ctx, m.Value(), func(v Value) error {
		changed = &v
		return fmt.Errorf("origin lock %s: this node serves %s; the cluster now serves %s: %w", m.resource, m.set, v, ErrSetChanged)
	})
	switch {
	case changed != nil && m.follower != nil:
		v, err = m.adopt(*changed)
	case err == nil && m.follower != nil && v != m.Value():
		// The same set, published again: another node changed what the
		// set's snapshots hold (a merge step); the follower catches up.
		v, err = m.adopt(v)
	}
	if err != nil {
		m.stop(err)
		// Hold nothing that keeps the next change waiting.
		_ = m.lock.Convert(context.WithoutCancel(m.ctx), lockc.NL)
		return
	}
	m.cur.Store(&v)
	m.openGate()
}

// adopt has the follower take on the set v publishes, in PR with the gate
// closed. m.opMu is held.
func (m *Member) adopt(v Value) (Value, error) {
	next, err := m.follower.Adopt(m.exclusive(m.ctx), v)
	if err != nil {
		return Value{}, fmt.Errorf("origin lock %s: %w: adopting the cluster's %s: %w", m.resource, ErrSetChanged, v, err)
	}
	if !next.Matches(v) {
		return Value{}, fmt.Errorf("origin lock %s: this node now serves %s; the cluster serves %s: %w", m.resource, next, v, ErrSetChanged)
	}
	m.set = next
	return v, nil
}

// Change publishes next as the cluster's set, as the next generation. It
// drains this node's origin writes, converts to EX (every other member
// drains its own and gives way), checks that the cluster still publishes
// the value this member last read (else nothing is published, and Change
// and every later Enter fail with ErrSetChanged), runs adopt if it is not
// nil (the node takes the new set on, with no origin write anywhere in
// the cluster; if adopt fails nothing is published), publishes, and comes
// back to PR with the gate open. The other members read the new value
// when they get PR back: a member whose set does not match it stops, or
// adopts it if it follows (JoinFollowing). If ctx ends while Change waits
// for EX, nothing changed and the member goes on with its set.
func (m *Member) Change(ctx context.Context, next Set, adopt func(context.Context) error) error {
	return m.Update(ctx, func(ctx context.Context, _ Set) (Set, error) {
		if adopt != nil {
			if err := adopt(ctx); err != nil {
				return Set{}, err
			}
		}
		return next, nil
	})
}

// Update is Change with the next set computed under EX: change gets the
// set this member serves (which a follower's adoptions keep current), makes
// the node serve the next one while no node writes the origin, and returns
// it, which Update publishes (the same set is published again as the next
// generation, which makes the followers catch up). If change fails nothing
// is published. change's ctx admits origin changes through Enter at once:
// an origin change made under EX (a merge step) is the cluster's only one.
func (m *Member) Update(ctx context.Context, change func(ctx context.Context, cur Set) (Set, error)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer context.AfterFunc(m.ctx, cancel)()
	defer cancel()
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := m.stopped(); err != nil {
		return err
	}
	if err := m.drain(ctx); err != nil {
		m.openGate()
		return err
	}
	if err := m.lock.Convert(ctx, lockc.NL); err != nil {
		m.stop(fmt.Errorf("origin lock %s: %w", m.resource, err))
		return m.stopped()
	}
	if err := m.lock.Convert(ctx, lockc.EX); err != nil {
		m.rejoin()
		if serr := m.stopped(); serr != nil {
			return serr
		}
		return fmt.Errorf("origin lock %s: change of the snapshot set: %w", m.resource, err)
	}
	cur := m.Value()
	b, st := m.lock.LVB()
	v, ok, derr := DecodeLVB(b)
	switch {
	case derr != nil && st == lockc.LVBValid:
		m.stop(fmt.Errorf("origin lock %s: %w", m.resource, derr))
	case st == lockc.LVBValid && ok && v != cur:
		m.stop(fmt.Errorf("origin lock %s: this node serves %s; the cluster now serves %s: %w", m.resource, m.set, v, ErrSetChanged))
	}
	if err := m.stopped(); err != nil {
		// Leaving EX republishes what was read.
		_ = m.lock.Convert(context.WithoutCancel(ctx), lockc.NL)
		return err
	}
	// An invalid or missing value here means a node died in EX after
	// this member last read the set: nothing was published since.
	next, err := change(m.exclusive(ctx), m.set)
	if err != nil {
		if cerr := m.lock.Convert(context.WithoutCancel(ctx), lockc.PR); cerr != nil {
			m.stop(fmt.Errorf("origin lock %s: %w", m.resource, cerr))
		}
		m.openGate()
		return fmt.Errorf("origin lock %s: changing the snapshot set: %w", m.resource, err)
	}
	gen := cur.Generation
	if ok && derr == nil {
		gen = max(gen, v.Generation)
	}
	nv := next.Value(gen + 1)
	m.lock.SetLVB(EncodeLVB(nv))
	if err := m.lock.Convert(context.WithoutCancel(ctx), lockc.PR); err != nil {
		m.stop(fmt.Errorf("origin lock %s: %w", m.resource, err))
		return m.stopped()
	}
	m.set = next
	m.cur.Store(&nv)
	m.openGate()
	return nil
}

// Close closes the gate (Enter fails with ErrClosed), waits for the origin
// changes inside to leave, and releases the lock. It does not close the
// lockspace.
func (m *Member) Close() error {
	var err error
	m.once.Do(func() {
		m.closeGate()
		_ = m.drain(context.Background())
		m.stop(fmt.Errorf("origin lock %s: %w", m.resource, ErrClosed))
		m.cancel()
		<-m.done
		m.opMu.Lock()
		defer m.opMu.Unlock()
		if uerr := m.lock.Unlock(context.Background()); uerr != nil && !errors.Is(uerr, lockc.ErrUnlocked) && !errors.Is(uerr, lockc.ErrLost) {
			err = fmt.Errorf("origin lock %s: %w", m.resource, uerr)
		}
	})
	return err
}
