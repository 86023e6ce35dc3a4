package clusterized

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/lockc"
)

// The state word of a gate: the mode the node holds, a "closed" bit that
// sends every newcomer to the slow path (draining for a conversion, lost,
// closed, metadata stale after a failed refresh), and a generation that
// changes with every mode change or metadata refresh, so that a lookup done
// before entering can tell whether its answer still holds.
const (
	modeMask  uint64 = 7
	closedBit uint64 = 1 << 3
	genShift         = 4
)

// The bits of gate.halt, which Store.stopError looks past only when one is
// set.
const (
	haltStopped uint32 = 1 << iota // stopped is set
	haltLost                       // the lockspace's OnLost ran
	haltAsk                        // the lockspace notifies no loss: ask it
)

// userShards is the number of user counters.
const userShards = 16

// userShard is one user counter, alone on its cache line.
type userShard struct {
	n atomic.Uint64
	_ [56]byte
}

// gate is the node-local admission to a store: local users enter and leave
// with a few atomic operations while the node's cached cluster lock covers
// them; the lock manager closes the gate and drains it before converting
// the lock, and opens it in the new mode after.
//
// The users inside (lookup misses holding their answer stable, prepared
// exceptions not yet committed or aborted, metadata calls under way) are
// counted in userShards padded counters, so that goroutines on different
// CPUs do not fight over one cache line; only their sum means anything (a
// user may leave through another shard than it entered by). A core that is
// an exstore.ConditionalPreparer counts its prepared exceptions itself, and
// a Prepare under a cached EX then costs the gate no atomic write at all:
// the core allocates only while the state word is the one the Prepare read,
// checked under the lock it counts under.
//
// Ordering: a user increments its shard and then re-reads the state word; a
// drain sets the closed bit and then sums the shards. Both orders are
// sequentially consistent (sync/atomic), so either the drain counts the user
// or the user sees the bit and backs out. Users admitted on the slow path
// (admit) are counted under the lock manager's mutex, which a drain holds
// as it closes the gate and as it counts. Likewise the core's lock orders a
// drain's count of unsettled exceptions, after it set the bit, with a
// Prepare's check of the word and allocation: the count includes the
// exception, or the Prepare sees the bit and allocates nothing.
//
// Layout: state, stopped and halt are read by every lookup or write, and
// written only as the gate closes or opens, or the node stops; the padding
// keeps the user counters, written by every entry, off their line. A Store
// embeds its gate by value right after its core pointer, so that the core
// shares that line too.
//
// A gate is ready once init has run; it starts open in NL.
type gate struct {
	state atomic.Uint64 // the state word
	// stopped is the error of a stopped node (lost or closed); halt tells,
	// with one load, whether a user must look closer before going on: the
	// halt* bits.
	stopped atomic.Pointer[error]
	halt    atomic.Uint32
	_       [44]byte

	users [userShards]userShard
	// drained wakes a drain under way: buffered, so that a drain between
	// its count and its wait does not miss it; extra signals cost it a
	// count.
	drained chan struct{}
}

// init readies g, open in NL with no user inside.
func (g *gate) init() {
	g.drained = make(chan struct{}, 1)
	g.state.Store(uint64(lockc.NL))
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

// mode is the mode the gate admits for (whether open or closed).
func (g *gate) mode() lockc.Mode { return modeOf(g.state.Load()) }

// usersInside sums the user counters.
func (g *gate) usersInside() uint64 {
	var n uint64
	for i := range g.users {
		n += g.users[i].n.Load()
	}
	return n
}

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
func (g *gate) enterFast(want lockc.Mode, shard int) bool {
	return g.enterIfState(g.state.Load(), want, shard)
}

// enterIfState admits a user wanting want through shard if state w admits
// it and is still the state once the user is counted.
func (g *gate) enterIfState(w uint64, want lockc.Mode, shard int) bool {
	if !admits(w, want) {
		return false
	}
	g.users[shard].n.Add(1)
	if g.state.Load() != w {
		g.leave(shard)
		return false
	}
	return true
}

// admit counts n users in through shard unconditionally: the slow path,
// under the lock manager's mutex, which orders it with drains.
func (g *gate) admit(shard int, n uint64) { g.users[shard].n.Add(n) }

// leave ends one user's stay; the last one out of a drain wakes it.
func (g *gate) leave(shard int) {
	g.users[shard].n.Add(^uint64(0))
	if g.state.Load()&closedBit != 0 && g.usersInside() == 0 {
		g.wakeDrain()
	}
}

// wakeDrain has a drain under way count again.
func (g *gate) wakeDrain() {
	select {
	case g.drained <- struct{}{}:
	default:
	}
}

// close sends every newcomer to the slow path.
func (g *gate) close() { g.state.Or(closedBit) }

// set publishes mode m with a new generation, closed or open.
func (g *gate) set(m lockc.Mode, closed bool) {
	w := uint64(m) | (genOf(g.state.Load())+1)<<genShift
	if closed {
		w |= closedBit
	}
	g.state.Store(w)
}

// halted records err as the error of a stopped node, for the users already
// past the state word.
func (g *gate) halted(err error) {
	g.stopped.Store(&err)
	g.halt.Or(haltStopped)
}

// drain closes the gate and waits until no user is inside and held(), what
// else keeps the lock (the exceptions the core counts as unsettled), is 0.
// admissions is the mutex slow-path admissions happen under: the gate is
// closed and counted under it, so no admission slips past the count. It
// returns with the gate closed: users arriving meanwhile wait for the
// conversion that follows (see "Nested users" above). It fails with
// lockc.ErrLost once lost is closed, and with ctx's error.
func (g *gate) drain(ctx context.Context, admissions *sync.Mutex, held func() int, lost <-chan struct{}) error {
	admissions.Lock()
	g.close()
	admissions.Unlock()
	for {
		admissions.Lock()
		// The users are counted before held: a Prepare that entered
		// leaves only once the core counts its exception. A Prepare that
		// did not enter allocated under the core's lock, either before
		// the count (and is in it) or after the closed bit (and was
		// refused).
		empty := g.usersInside() == 0 && held() == 0
		admissions.Unlock()
		if empty {
			return nil
		}
		// The last user out, and every exception settled while the gate
		// is closed, signal drained.
		select {
		case <-g.drained:
		case <-lost:
			return lockc.ErrLost
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
