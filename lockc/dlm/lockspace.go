package dlm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/clustersnap/clustersnap/lockc"
)

// probeName is the resource of the liveness probe's lock: one NL lock per
// lockspace file, converted NL→NL. NL is compatible with every mode and
// moves no LVB, so the probe never delays or disturbs anyone's locks; it
// does keep a resource of that name alive.
var probeName = []byte("\xfflockc/dlm liveness probe")

// Errors that say why a lockspace was lost.
var (
	errClosed  = errors.New("closed")
	errCrashed = errors.New("crashed (test)")
	errStalled = errors.New("liveness probe stalled: the lockspace is stopped (recovery, or this node lost quorum)")
)

// lockspace is one device file of a joined lockspace: one lock owner.
type lockspace struct {
	e      *Engine
	name   string
	nodeID uint32
	minor  uint32
	ver    version
	f      *os.File

	mu      sync.Mutex
	nextKey uint64
	locks   map[uint64]*lock // locks with a request written, by key
	losing  bool             // lose has begun
	onLost  []func()
	err     error

	isLost     atomic.Bool
	lost       chan struct{} // closed on loss
	readerDone chan struct{} // closed when the reader returns
	released   chan struct{} // closed once the kernel has the fd back and the lockspace is left

	probeMu sync.Mutex // serialises uses of probe
	probe   *lock
}

var (
	_ lockc.Lockspace    = (*lockspace)(nil)
	_ lockc.LostChecker  = (*lockspace)(nil)
	_ lockc.LostNotifier = (*lockspace)(nil)
)

// newLockspace starts the reader and the liveness probe on f, the device
// file of an already joined lockspace.
func newLockspace(e *Engine, name string, nodeID, minor uint32, ver version, f *os.File) (*lockspace, error) {
	ls := &lockspace{
		e: e, name: name, nodeID: nodeID, minor: minor, ver: ver, f: f,
		locks:      map[uint64]*lock{},
		lost:       make(chan struct{}),
		readerDone: make(chan struct{}),
		released:   make(chan struct{}),
	}
	go ls.read()
	ctx, cancel := context.WithTimeout(context.Background(), e.o.StallBound)
	defer cancel()
	probe, err := ls.request(ctx, probeName, lockc.NL, lkfExpedite, false)
	if err != nil {
		ls.lose(fmt.Errorf("probe lock: %w", err))
		return nil, fmt.Errorf("open lockspace %s: probe lock: %w", name, err)
	}
	ls.probe = probe
	go ls.watch()
	return ls, nil
}

func (ls *lockspace) NodeID() uint32 { return ls.nodeID }

func (ls *lockspace) Name() string { return ls.name }

func (ls *lockspace) Lost() <-chan struct{} { return ls.lost }

func (ls *lockspace) IsLost() bool { return ls.isLost.Load() }

func (ls *lockspace) Err() error {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	return ls.err
}

// OnLost has f called once the lockspace is lost, before IsLost turns
// true and Lost is closed, and before the kernel releases the locks (the
// device file is closed only after).
func (ls *lockspace) OnLost(f func()) {
	ls.mu.Lock()
	if !ls.losing {
		ls.onLost = append(ls.onLost, f)
		ls.mu.Unlock()
		return
	}
	ls.mu.Unlock()
	f()
}

// Close loses the lockspace (OnLost, IsLost, Lost), closes the device
// file, whereupon the kernel force-unlocks every lock of it, and leaves the
// lockspace. It waits for the kernel a bounded time (a stopped lockspace
// can hold the release up; it then completes in the background).
func (ls *lockspace) Close() error {
	ls.lose(errClosed)
	ls.awaitRelease()
	return nil
}

// awaitRelease waits, a bounded time, for release to finish.
func (ls *lockspace) awaitRelease() {
	t := time.NewTimer(releaseBound)
	defer t.Stop()
	select {
	case <-ls.released:
	case <-t.C:
	}
}

// read is the lockspace's reader: it reads results from the device file
// through the netpoller and hands them to their locks, until the file is
// closed or fails.
func (ls *lockspace) read() {
	defer close(ls.readerDone)
	buf := make([]byte, resultReadSize)
	for {
		n, err := ls.f.Read(buf)
		if err != nil {
			ls.lose(fmt.Errorf("read %s: %w", ls.f.Name(), err))
			return
		}
		r, err := decodeResult(buf[:n])
		if err != nil {
			ls.lose(fmt.Errorf("read %s: %w", ls.f.Name(), err))
			return
		}
		ls.dispatch(r)
	}
}

// dispatch hands a result to its lock: a completion to the operation
// waiting for it, a blocking notification to the lock's channel.
func (ls *lockspace) dispatch(r result) {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	l := ls.locks[r.param]
	if l == nil {
		return // a lock already forgotten (unlocked, refused, undone)
	}
	if r.bast {
		l.notify(r.mode)
		return
	}
	if r.status == 0 {
		l.highBast = -1 // granted again: notifications start over
	}
	select {
	case l.done <- r:
	default:
		// No operation waits: a completion the kernel repeats. The
		// channel holds one result, and every operation takes it.
	}
}

// lose makes the lockspace lost: OnLost functions, then IsLost, then Lost;
// then releases the device file in the background.
func (ls *lockspace) lose(cause error) {
	ls.mu.Lock()
	if ls.losing {
		ls.mu.Unlock()
		return
	}
	ls.losing = true
	fns := ls.onLost
	ls.onLost = nil
	ls.mu.Unlock()
	for _, f := range fns {
		f()
	}
	ls.mu.Lock()
	ls.err = fmt.Errorf("lockspace %s node %d: %w: %w", ls.name, ls.nodeID, lockc.ErrLost, cause)
	ls.isLost.Store(true)
	close(ls.lost)
	var unlocks [][]byte
	if errors.Is(cause, errClosed) {
		unlocks = ls.unlockAll()
	}
	ls.mu.Unlock()
	go ls.release(unlocks)
}

// unlockAll marks every granted lock without a running operation unlocked
// and returns the requests that release them, publishing what each
// staged, as Unlock would. ls.mu must be held.
func (ls *lockspace) unlockAll() [][]byte {
	var reqs [][]byte
	for _, l := range ls.locks {
		if l.dead || l.busy || l == ls.probe {
			continue
		}
		l.dead = true
		v, lf := l.outgoing(l.mode, -1)
		req, err := encodeLock(ls.ver, cmdUnlock, lockParams{flags: lf | lkfValBlk, lkid: l.lkid, castParam: l.key, lvb: v})
		if err == nil {
			reqs = append(reqs, req)
		}
	}
	return reqs
}

// release sends unlocks (a Close's), closes the device file (the kernel
// force-unlocks what is left; the close waits for writes blocked in the
// kernel) and leaves the lockspace.
func (ls *lockspace) release(unlocks [][]byte) {
	defer close(ls.released)
	defer ls.e.forget(ls)
	for _, req := range unlocks {
		_, _ = writeFile(ls.f, req) // the closing file's force-unlock covers a failure
	}
	_ = ls.f.Close()
	<-ls.readerDone
	_ = ls.e.remove(ls.ver, ls.minor, ls.name)
}

// register allocates a lock for a new request.
func (ls *lockspace) register(name []byte) *lock {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.nextKey++
	l := &lock{
		ls: ls, key: ls.nextKey, name: name,
		done: make(chan result, 1), bast: make(chan lockc.Mode, 1), highBast: -1,
	}
	ls.locks[l.key] = l
	return l
}

// forget drops l: no result for it is dispatched any more.
func (ls *lockspace) forget(l *lock) {
	ls.mu.Lock()
	delete(ls.locks, l.key)
	ls.mu.Unlock()
}

// write sends req and returns what the kernel answered, or ErrLost if the
// lockspace is lost while the write is blocked in the kernel (a stopped
// lockspace blocks every request).
func (ls *lockspace) write(req []byte) (int, error) {
	type written struct {
		n   int
		err error
	}
	done := make(chan written, 1)
	go func() {
		n, err := writeFile(ls.f, req)
		done <- written{n, err}
	}()
	select {
	case w := <-done:
		if w.err != nil && ls.isLost.Load() {
			return 0, ls.Err()
		}
		return w.n, w.err
	case <-ls.lost:
		return 0, ls.Err()
	}
}

// barrier sends one request through the device file and waits for its
// answer, which the kernel queues after every result queued before it.
func (ls *lockspace) barrier(ctx context.Context) error {
	ls.probeMu.Lock()
	defer ls.probeMu.Unlock()
	return ls.probe.Convert(ctx, lockc.NL)
}
