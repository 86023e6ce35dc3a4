package lockagent

import (
	"context"
	"fmt"
	"sync"

	"github.com/clustersnap/clustersnap/lockc"
)

// lock is a lock granted on the server. Its mode, LVB and token are as the
// server's engine reported them in the last reply.
type lock struct {
	space *space
	id    uint64
	bast  chan lockc.Mode

	mu    sync.Mutex
	mode  lockc.Mode
	lvb   lockc.LVB
	state lockc.LVBState
	token uint64
	gone  bool // unlocked, or lost with its lockspace
}

// tokenLock is a lock whose engine offers fencing tokens.
type tokenLock struct{ *lock }

// Token is the token the server's engine reported in the last reply.
func (t *tokenLock) Token() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.token
}

var (
	_ lockc.Lock    = (*lock)(nil)
	_ lockc.Tokener = (*tokenLock)(nil)
)

// update takes the lock's state from a reply.
func (l *lock) update(m message) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.mode, l.lvb, l.state, l.token = m.Mode, m.LVB, m.LVBState, m.Token
}

func (l *lock) Mode() lockc.Mode {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.mode
}

func (l *lock) LVB() (lockc.LVB, lockc.LVBState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lvb, l.state
}

func (l *lock) Blocking() <-chan lockc.Mode { return l.bast }

// deliver passes on a blocking notification without blocking, coalesced
// with an undelivered one to the higher mode. Only the client's read loop
// calls it, so each round either sends or empties the channel.
func (l *lock) deliver(m lockc.Mode) {
	for {
		select {
		case l.bast <- m:
			return
		default:
		}
		select {
		case old := <-l.bast:
			m = max(m, old)
		default:
		}
	}
}

// SetLVB stages v on the server's lock.
func (l *lock) SetLVB(v lockc.LVB) { l.stage(request{Op: opSetLVB, LVB: v}) }

// InvalidateLVB stages an invalidation on the server's lock.
func (l *lock) InvalidateLVB() { l.stage(request{Op: opInvalidateLVB}) }

// stage runs SetLVB or InvalidateLVB on the server, which answers at once
// with the lock's LVB as its engine now reports it. A lock that is gone
// stages nothing, as lockc's engines ignore it.
func (l *lock) stage(rq request) {
	if l.isGone() {
		return
	}
	rq.Lock = l.id
	m, err := l.space.c.call(context.Background(), rq)
	if err == nil && m.HasState {
		l.update(m)
	}
}

func (l *lock) Convert(ctx context.Context, m lockc.Mode, flags ...lockc.Flag) error {
	if l.isGone() {
		return l.goneErr("convert")
	}
	rep, err := l.space.c.call(ctx, request{Op: opConvert, Lock: l.id, Mode: m, Flags: flags})
	if rep.HasState {
		l.update(rep)
	}
	if l.space.isLost.Load() {
		l.drop()
		return fmt.Errorf("lockspace %s: convert: %w", l.space.name, l.space.Err())
	}
	return err
}

func (l *lock) Unlock(ctx context.Context) error {
	if l.isGone() {
		return l.goneErr("unlock")
	}
	_, err := l.space.c.call(ctx, request{Op: opUnlock, Lock: l.id})
	if err == nil || l.space.isLost.Load() {
		l.drop()
	}
	return err
}

func (l *lock) isGone() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.gone || l.space.isLost.Load()
}

func (l *lock) goneErr(what string) error {
	return fmt.Errorf("lockspace %s: %s: %w", l.space.name, what, lockc.ErrUnlocked)
}

// drop forgets the lock: it is unlocked or lost. An undelivered blocking
// notification goes with it, as engines withdraw theirs.
func (l *lock) drop() {
	l.mu.Lock()
	l.gone = true
	l.mu.Unlock()
	l.space.c.mu.Lock()
	delete(l.space.c.locks, l.id)
	l.space.c.mu.Unlock()
	select {
	case <-l.bast:
	default:
	}
}
