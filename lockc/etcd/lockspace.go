package etcd

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/clustersnap/clustersnap/lockc"
)

// lockspace is one node's membership of a lockspace: a lockc.Lockspace.
type lockspace struct {
	e     *Engine
	c     *clientv3.Client
	name  string
	keys  layout
	node  uint32
	lease clientv3.LeaseID
	ttl   time.Duration // as granted by the server

	// ctx lives until the membership ends; every etcd request of the
	// membership runs under it, so a loss stops them all.
	ctx    context.Context
	cancel context.CancelFunc

	// fence is the self-fencing deadline, in nanoseconds on the monotonic
	// clock since base: past it the lease may have expired on the server.
	base  time.Time
	fence atomic.Int64

	nextLock atomic.Uint64

	mu sync.Mutex
	// locks are this membership's locks that are held or requested, by
	// resource (hex); the watch looks here for whom an event concerns.
	locks map[string]map[*lock]struct{}
	// changed[res] is closed when an event on res arrives; eventRev[res]
	// is the revision of the last one (resources with locks only).
	changed  map[string]chan struct{}
	eventRev map[string]int64
	// goneAt[name] is the revision of the last change of a lock this
	// membership no longer has, until the watch has passed it: changes
	// of its key up to it are history, later ones are strays (reap).
	goneAt map[string]int64
	// processed is the revision through which the watch has handled
	// every event; progress is closed (and replaced) when it advances.
	processed int64
	progress  chan struct{}
	err       error    // why the membership ended; set before lost closes
	onLost    []func() // OnLost's functions, until the loss
	isLost    atomic.Bool
	lost      chan struct{}
	done      sync.WaitGroup // the membership's goroutines
}

var (
	_ lockc.LostChecker  = (*lockspace)(nil)
	_ lockc.LostNotifier = (*lockspace)(nil)
)

// Open joins lockspace name: it takes a lease, a node id and starts the
// lockspace's watch and keep-alive. The node id is new for every Open (a
// restarted node is a new member).
func (e *Engine) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	if len(name) == 0 || len(name) > lockc.MaxResourceName {
		return nil, fmt.Errorf("lockspace %q: name must be 1 to %d bytes: %w", name, lockc.MaxResourceName, lockc.ErrBadRequest)
	}
	// A node that cannot reach etcd fails at once rather than waiting
	// unseen: whoever started it (a supervisor) sees it and can retry,
	// told why by ce.
	ctx, cancel := context.WithTimeout(ctx, e.o.DialTimeout)
	defer cancel()
	ctx, ce := withConnErrs(ctx)
	var g *clientv3.LeaseGrantResponse
	var sent time.Time
	if err := retry(ctx, func() (err error) { // a lease granted unseen expires by itself
		sent = time.Now()
		g, err = e.client.Grant(ctx, int64((e.o.TTL+time.Second-1)/time.Second))
		return err
	}); err != nil {
		return nil, fmt.Errorf("lockspace %s: lease from etcd at %s: %w", name, strings.Join(e.client.Endpoints(), ","), ce.explain(err))
	}
	ls := &lockspace{
		e: e, c: e.client, name: name, keys: newLayout(e.o.Prefix, name),
		lease: g.ID, ttl: time.Duration(g.TTL) * time.Second, base: sent,
		locks: map[string]map[*lock]struct{}{}, changed: map[string]chan struct{}{},
		eventRev: map[string]int64{}, goneAt: map[string]int64{}, progress: make(chan struct{}), lost: make(chan struct{}),
	}
	ls.fence.Store(int64(ls.ttl - e.o.Margin))
	node, rev, err := ls.takeNodeID(ctx)
	if err != nil {
		ls.revoke()
		return nil, err
	}
	ls.node = node
	ls.processed = rev
	ls.ctx, ls.cancel = context.WithCancel(context.Background())
	ls.done.Add(2)
	go ls.keepAlive()
	go ls.watch(rev + 1)
	e.mu.Lock()
	e.spaces[ls] = struct{}{}
	e.mu.Unlock()
	return ls, nil
}

// takeNodeID hands out the next node id of the lockspace, and returns the
// revision at which it did.
func (ls *lockspace) takeNodeID(ctx context.Context) (uint32, int64, error) {
	key := ls.keys.nodes()
	for {
		r, err := ls.c.Get(ctx, key)
		if err != nil {
			if ctx.Err() != nil {
				return 0, 0, fmt.Errorf("lockspace %s: node id: %w", ls.name, err)
			}
			pause(ctx)
			continue
		}
		var last uint64
		var mod int64
		if len(r.Kvs) == 1 {
			mod = r.Kvs[0].ModRevision
			last, err = strconv.ParseUint(string(r.Kvs[0].Value), 10, 32)
			if err != nil {
				return 0, 0, fmt.Errorf("lockspace %s: node counter %s: %q: %w", ls.name, key, r.Kvs[0].Value, errBadValue)
			}
		}
		next := uint32(last) + 1
		if next == 0 {
			next = 1
		}
		// A commit whose answer is lost only wastes an id: the next
		// round takes another.
		t, err := ls.c.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(key), "=", mod)).
			Then(clientv3.OpPut(key, strconv.FormatUint(uint64(next), 10))).
			Commit()
		if err != nil {
			if ctx.Err() != nil {
				return 0, 0, fmt.Errorf("lockspace %s: node id: %w", ls.name, err)
			}
			pause(ctx)
			continue
		}
		if t.Succeeded {
			return next, t.Header.Revision, nil
		}
	}
}

// NodeID returns the node id this membership was given.
func (ls *lockspace) NodeID() uint32 { return ls.node }

// Name returns the lockspace's name.
func (ls *lockspace) Name() string { return ls.name }

// Lost is closed when the membership ends.
func (ls *lockspace) Lost() <-chan struct{} { return ls.lost }

// IsLost implements lockc.LostChecker. It is also true once the fencing
// deadline has passed, even if the goroutine that declares the loss has
// not run yet (a process resumed after a pause).
func (ls *lockspace) IsLost() bool {
	return ls.isLost.Load() || time.Since(ls.base) >= time.Duration(ls.fence.Load())
}

// OnLost implements lockc.LostNotifier: f runs when the membership ends,
// before Lost is closed, and for a lost lease before the lease can have
// expired on the server.
func (ls *lockspace) OnLost(f func()) {
	ls.mu.Lock()
	if ls.err == nil {
		ls.onLost = append(ls.onLost, f)
		ls.mu.Unlock()
		return
	}
	ls.mu.Unlock()
	f()
}

// Err says why the membership ended, or nil.
func (ls *lockspace) Err() error {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	return ls.err
}

// Close unlocks every lock as Unlock would (PW and EX locks publish), fails
// pending requests with lockc.ErrLost, revokes the lease and closes Lost.
func (ls *lockspace) Close() error {
	var held []*lock
	ls.mu.Lock()
	for _, set := range ls.locks {
		for l := range set {
			if l.held && !l.busy && !l.gone {
				l.busy = true
				held = append(held, l)
			}
		}
	}
	ls.mu.Unlock()
	var errs []error
	for _, l := range held {
		if err := l.release(unlockMode); err != nil && !errors.Is(err, lockc.ErrUnlocked) && !errors.Is(err, lockc.ErrLost) {
			errs = append(errs, err)
		}
	}
	// A membership lost before it was closed has its lease expiring
	// already (or gone, or unreachable): revoking it would only keep a
	// node that cannot reach etcd from exiting.
	wasLost := ls.Err() != nil
	ls.end(fmt.Errorf("lockspace %s: closed by node %d: %w", ls.name, ls.node, lockc.ErrLost))
	if !wasLost {
		ls.revoke()
	}
	ls.done.Wait()
	return errors.Join(errs...)
}

// crash ends the membership as a node's death would: nothing is published,
// and the lease is revoked, which deletes its locks' entries and leaves
// its writer markers behind.
func (ls *lockspace) crash() {
	ls.end(fmt.Errorf("lockspace %s: node %d crashed: %w", ls.name, ls.node, lockc.ErrLost))
	ls.revoke()
	ls.done.Wait()
}

// end ends the membership with err (wrapping lockc.ErrLost): OnLost's
// functions run, IsLost turns true, every request of the membership stops
// and Lost closes. Ending again does nothing.
func (ls *lockspace) end(err error) {
	ls.mu.Lock()
	if ls.err != nil {
		ls.mu.Unlock()
		return
	}
	ls.err = err
	for _, f := range ls.onLost {
		f()
	}
	ls.onLost = nil
	ls.isLost.Store(true)
	for _, set := range ls.locks {
		for l := range set {
			l.gone = true
		}
	}
	ls.mu.Unlock()
	if ls.cancel != nil {
		ls.cancel()
	}
	close(ls.lost)
	ls.e.mu.Lock()
	delete(ls.e.spaces, ls)
	ls.e.mu.Unlock()
}

// revoke gives the lease back, so that the membership's entries go at once
// instead of when the lease would expire. It is bounded: a node that
// cannot reach etcd leaves it to expire.
func (ls *lockspace) revoke() {
	ctx, cancel := context.WithTimeout(context.Background(), ls.e.o.DialTimeout)
	defer cancel()
	// A lease not revoked expires by itself, later.
	_ = retry(ctx, func() error {
		if _, err := ls.c.Revoke(ctx, ls.lease); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
			return err
		}
		return nil
	})
}

// lostErr returns the membership's end as an error for an operation on a
// lock of resource res.
func (ls *lockspace) lostErr(res []byte) error {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	if ls.err == nil {
		return nil
	}
	return fmt.Errorf("resource %q: %w", res, ls.err)
}
