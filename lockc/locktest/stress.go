package locktest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/lockc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// errFenced: storage refused an operation from a holder whose lock it
// knows to be stale.
var errFenced = errors.New("fenced: the lock is stale")

// fence is what a holder shows the disk so that the disk can refuse a
// stale holder: the lock's token where the engine offers tokens, otherwise
// the holder's lockspace, which must not be lost.
type fence struct {
	tok   uint64
	byTok bool
	alive func() bool // reports false once the holder's lockspace is lost
}

// newFence makes l's fence. Without tokens it relies on the loss being
// known before another node can be granted what the holder held: OnLost's
// promise, where the engine offers it.
func newFence(ls lockc.Lockspace, lost *atomic.Bool, l lockc.Lock) fence {
	if t, ok := l.(lockc.Tokener); ok {
		return fence{tok: t.Token(), byTok: true}
	}
	if lost != nil {
		return fence{alive: func() bool { return !lost.Load() }}
	}
	if c, ok := ls.(lockc.LostChecker); ok {
		return fence{alive: func() bool { return !c.IsLost() }}
	}
	return fence{alive: func() bool { return ls.Err() == nil }}
}

// counterDisk is the storage whose state an LVB counter caches: the truth
// that linearizability is checked against. It fences by token, as the
// project's metadata commits do, or, for engines without tokens, by the
// holder's loss of its lockspace, as the clusterizer's fenced devices do.
type counterDisk struct {
	mu       sync.Mutex
	value    uint64 // last committed counter
	maxToken uint64 // highest token that read or committed
	commits  uint64
}

// admit checks f under d.mu.
func (d *counterDisk) admit(f fence, what string) error {
	if !f.byTok {
		if !f.alive() {
			return fmt.Errorf("%s from a lost lockspace: %w", what, errFenced)
		}
		return nil
	}
	if f.tok < d.maxToken {
		return fmt.Errorf("%s with token %d after %d: %w", what, f.tok, d.maxToken, errFenced)
	}
	d.maxToken = f.tok
	return nil
}

// read returns the committed counter for a writer holding f.
func (d *counterDisk) read(f fence) (uint64, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.admit(f, "read"); err != nil {
		return 0, err
	}
	return d.value, nil
}

// commit stores v for a writer holding f. v must follow the committed
// value: anything else is a lost or duplicated update.
func (d *counterDisk) commit(f fence, v uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.admit(f, "commit"); err != nil {
		return err
	}
	if v != d.value+1 {
		return fmt.Errorf("commit %d over %d: lost update", v, d.value)
	}
	d.value = v
	d.commits++
	return nil
}

// peek returns the committed counter and the highest token seen.
func (d *counterDisk) peek() (value, maxToken uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.value, d.maxToken
}

// testLinearizable: nodes × workers increment a counter kept on disk and
// cached in the LVB under EX, and read it under PR, while nodes crash. No
// update is lost (each commit follows the last), a valid LVB under EX or PR
// always equals the disk, and a reader never sees a smaller valid value
// without an Invalid or Unknown state in between.
func testLinearizable(e *env) {
	const (
		nodes      = 3
		workers    = 2 // per node
		ops        = 150
		crashEvery = 37 // operations, over all workers
	)
	crasher, canCrash := e.c.(Crasher)
	res := []byte("counter")
	disk := &counterDisk{}
	var ticks, commits, crashes, fenced, lostOps atomic.Int64

	// release ends a write or read: converts a cached lock back to NL, or
	// unlocks a lock of its own.
	release := func(l lockc.Lock, cached bool) error {
		if cached {
			return l.Convert(e.ctx, lockc.NL)
		}
		return l.Unlock(e.ctx)
	}
	acquire := func(ls lockc.Lockspace, nl lockc.Lock, m lockc.Mode, cached bool) (lockc.Lock, error) {
		if cached {
			return nl, nl.Convert(e.ctx, m)
		}
		return ls.Lock(e.ctx, res, m)
	}
	write := func(node uint32, ls lockc.Lockspace, lost *atomic.Bool, nl lockc.Lock, cached bool) error {
		l, err := acquire(ls, nl, lockc.EX, cached)
		if err != nil {
			return err
		}
		f := newFence(ls, lost, l)
		v, st := l.LVB()
		n, hasCounter := decode(v)
		d, err := disk.read(f)
		if err != nil {
			_ = release(l, cached)
			return err
		}
		var next uint64
		if st == lockc.LVBValid {
			if !assert.True(e.t, hasCounter, "valid LVB %x without a counter", v) ||
				!assert.Equal(e.t, d, n, "a valid LVB under EX differs from the disk") {
				return errors.New("stop")
			}
			next = n + 1
		} else {
			assert.LessOrEqual(e.t, n, d, "an LVB ahead of the disk was published before being durable")
			next = max(d, n) + 1
		}
		if err := disk.commit(f, next); err != nil {
			_ = release(l, cached)
			if !errors.Is(err, errFenced) {
				e.t.Error(err)
				return errors.New("stop")
			}
			return err
		}
		if canCrash && commits.Add(1)%11 == 0 {
			// Die after the durable write, before publishing it.
			crasher.Crash(node)
			crashes.Add(1)
		}
		l.SetLVB(counter(next))
		return release(l, cached)
	}
	read := func(ls lockc.Lockspace, nl lockc.Lock, cached bool, lastSeen *uint64) error {
		l, err := acquire(ls, nl, lockc.PR, cached)
		if err != nil {
			return err
		}
		f := newFence(ls, nil, l)
		v, st := l.LVB()
		d, maxTok := disk.peek()
		live := ls.Err() == nil // checked after peek: the lock was held during it
		if st == lockc.LVBValid {
			n, ok := decode(v)
			assert.True(e.t, ok, "valid LVB %x without a counter", v)
			if live {
				if f.byTok {
					assert.Less(e.t, maxTok, f.tok, "a writer used the disk while PR (token %d) was held", f.tok)
				}
				assert.Equal(e.t, d, n, "a valid LVB under PR differs from the disk")
			}
			assert.GreaterOrEqual(e.t, n, *lastSeen, "the counter went backwards while valid")
			*lastSeen = n
		} else {
			*lastSeen = 0 // the value may be re-seeded
		}
		return release(l, cached)
	}

	var wg sync.WaitGroup
	for node := uint32(1); node <= nodes; node++ {
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var ls lockc.Lockspace
				var lost *atomic.Bool // set by OnLost, where the engine offers it
				var nl lockc.Lock
				join := func() bool {
					var err error
					if ls != nil {
						_ = ls.Close()
					}
					ls, err = e.c.Node(node).Open(e.ctx, e.ls)
					if !assert.NoError(e.t, err) {
						return false
					}
					lost = nil
					if n, ok := ls.(lockc.LostNotifier); ok {
						flag := new(atomic.Bool)
						n.OnLost(func() { flag.Store(true) })
						lost = flag
					}
					nl, err = ls.Lock(e.ctx, res, lockc.NL)
					if isLost(err) {
						return true // crashed again at once: the next operation rejoins
					}
					return assert.NoError(e.t, err)
				}
				if !join() {
					return
				}
				defer func() {
					if ls != nil { // nil after a failed rejoin
						_ = ls.Close()
					}
				}()
				var lastSeen uint64
				for i := range ops {
					if n := ticks.Add(1); canCrash && n%crashEvery == 0 {
						crasher.Crash(uint32(n/crashEvery)%nodes + 1)
						crashes.Add(1)
					}
					cached := (i/2+w)%2 == 0
					var err error
					if nl == nil {
						err = lockc.ErrLost
					} else if (i+w)%3 == 0 {
						err = write(node, ls, lost, nl, cached)
					} else {
						err = read(ls, nl, cached, &lastSeen)
					}
					switch {
					case err == nil:
					case errors.Is(err, errFenced):
						fenced.Add(1)
						if !join() {
							return
						}
					case isLost(err):
						lostOps.Add(1)
						if !join() {
							return
						}
					default:
						e.t.Errorf("node %d worker %d op %d: %v", node, w, i, err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()

	value, _ := disk.peek()
	e.t.Logf("%d commits, %d crashes, %d lost operations, %d fenced", disk.commits, crashes.Load(), lostOps.Load(), fenced.Load())
	assert.Equal(e.t, disk.commits, value, "every commit added exactly one")
	assert.Positive(e.t, disk.commits)
	if canCrash {
		assert.Positive(e.t, crashes.Load())
	}
	final := e.lock(e.open(nodes+1), string(res), lockc.EX)
	if v, st := final.LVB(); st == lockc.LVBValid {
		n, _ := decode(v)
		assert.Equal(e.t, value, n, "the final valid LVB is the last commit")
	}
	e.unlock(final)
	e.assertNoResources()
}

// testIsolation: lockspaces of different names share nothing, and
// resource names are arbitrary bytes up to 64 (no terminator, no prefix
// matching).
func testIsolation(e *env) {
	a := e.openNamed(1, "iso-a")
	b := e.openNamed(2, "iso-b")
	la := e.lock(a, "r", lockc.EX, lockc.NoQueue)
	lb := e.lock(b, "r", lockc.EX, lockc.NoQueue)
	la.SetLVB(counter(1))
	e.convert(la, lockc.EX)
	_, st := lb.LVB()
	assert.Equal(e.t, lockc.LVBUnknown, st, "another lockspace's publish")
	e.unlock(la)
	e.unlock(lb)

	long := make([]byte, lockc.MaxResourceName)
	for i := range long {
		long[i] = byte(255 - 4*i) // includes 0xff and 0x03, no text
	}
	long[10] = 0
	names := [][]byte{
		long,
		append(append([]byte{}, long[:63]...), long[63]^1),
		long[:63],
		[]byte("r"),
		[]byte("r\x00"),
		{0},
	}
	c := e.open(3)
	d := e.open(4)
	var locks []lockc.Lock
	for i, name := range names {
		l, err := c.Lock(e.ctx, name, lockc.EX, lockc.NoQueue)
		require.NoError(e.t, err, "name %d (%x)", i, name)
		l.SetLVB(counter(uint64(i)))
		e.convert(l, lockc.EX)
		locks = append(locks, l)
	}
	for i, name := range names {
		nl, err := d.Lock(e.ctx, name, lockc.NL)
		require.NoError(e.t, err)
		v, st := nl.LVB()
		assert.Equal(e.t, lockc.LVBValid, st, "name %d", i)
		assert.Equal(e.t, counter(uint64(i)), v, "name %d (%x) has its own LVB", i, name)
		e.unlock(nl)
	}
	for _, l := range locks {
		e.unlock(l)
	}
	e.assertNoResources()
}

// testSoak: workers on several nodes take, convert, publish and release
// locks on many resources, closing and rejoining now and then. At the end
// every resource's granted modes are compatible and the remembered
// resources are exactly the held ones; after release nothing remains.
func testSoak(e *env) {
	const (
		nodes      = 3
		resources  = 200
		steps      = 3000
		closeEvery = 700
	)
	rng := rand.New(rand.NewPCG(1, 2))
	names := make([][]byte, resources)
	for i := range names {
		names[i] = make([]byte, 1+rng.IntN(lockc.MaxResourceName))
		for j := range names[i] {
			names[i][j] = byte(rng.Uint32())
		}
		names[i][0] = byte(i) // distinct
		if len(names[i]) > 1 {
			names[i][1] = byte(i >> 8)
		}
	}
	blockCtx, stopBlocking := context.WithCancel(e.ctx)
	defer stopBlocking()
	type holding struct {
		ls   lockc.Lockspace
		held map[int]lockc.Lock
	}
	final := make([]holding, nodes)
	var stepped, released sync.WaitGroup
	release := make(chan struct{})
	for node := range nodes {
		stepped.Add(1)
		released.Add(1)
		go func() {
			defer released.Done()
			doneStepping := sync.OnceFunc(stepped.Done)
			defer doneStepping()
			rng := rand.New(rand.NewPCG(uint64(node), 7))
			ls, err := e.c.Node(uint32(node+1)).Open(e.ctx, e.ls)
			if !assert.NoError(e.t, err) {
				return
			}
			held := map[int]lockc.Lock{}
			ok := func(err error, allowed ...error) bool {
				for _, a := range allowed {
					if errors.Is(err, a) {
						return true
					}
				}
				return assert.NoError(e.t, err)
			}
			for i := range steps {
				if i%closeEvery == closeEvery-1 {
					assert.NoError(e.t, ls.Close())
					for _, l := range held {
						assert.ErrorIs(e.t, l.Unlock(e.ctx), lockc.ErrUnlocked)
					}
					clear(held)
					ls, err = e.c.Node(uint32(node+1)).Open(e.ctx, e.ls)
					if !assert.NoError(e.t, err, "node %d: open the lockspace again", node+1) {
						return // holding nothing, with no lockspace to close
					}
				}
				r := rng.IntN(resources)
				m := modes[rng.IntN(len(modes))]
				if l, isHeld := held[r]; isHeld {
					switch x := rng.IntN(10); {
					case x < 4:
						if !ok(l.Unlock(e.ctx)) {
							return
						}
						delete(held, r)
					case x < 8:
						old := l.Mode()
						err := l.Convert(e.ctx, m, lockc.NoQueue)
						if !ok(err, lockc.ErrWouldBlock) {
							return
						}
						if err != nil {
							assert.Equal(e.t, old, l.Mode())
						} else {
							assert.Equal(e.t, m, l.Mode())
						}
					default:
						l.SetLVB(counter(uint64(i)))
						if !ok(l.Convert(e.ctx, l.Mode())) {
							return
						}
					}
					continue
				}
				flags := []lockc.Flag{lockc.NoQueue}
				ctx := e.ctx
				if len(held) == 0 {
					// Holders never block, so an empty-handed
					// worker may wait; once a worker finishes,
					// waits are cancelled so that none waits on a
					// finished worker's locks.
					flags, ctx = nil, blockCtx
				}
				l, err := ls.Lock(ctx, names[r], m, flags...)
				if !ok(err, lockc.ErrWouldBlock, context.Canceled) {
					return
				}
				if err == nil {
					held[r] = l
				}
			}
			stopBlocking()
			final[node] = holding{ls: ls, held: held}
			doneStepping()
			<-release
			for _, l := range held {
				assert.NoError(e.t, l.Unlock(e.ctx))
			}
			assert.NoError(e.t, ls.Close())
		}()
	}
	stepped.Wait()
	byResource := map[int][]lockc.Mode{}
	for _, h := range final {
		for r, l := range h.held {
			byResource[r] = append(byResource[r], l.Mode())
		}
	}
	assert.NotEmpty(e.t, byResource, "the soak should end with locks held")
	for r, ms := range byResource {
		for i := range ms {
			for j := range ms {
				if i != j {
					assert.True(e.t, lockc.Compatible(ms[i], ms[j]), "resource %d granted %v", r, ms)
				}
			}
		}
	}
	if rc, ok := e.c.(ResourceCounter); ok {
		assert.Equal(e.t, len(byResource), rc.ResourceCount(), "remembered resources while held")
	}
	close(release)
	released.Wait()
	e.assertNoResources()
}
