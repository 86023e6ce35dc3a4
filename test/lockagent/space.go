package lockagent

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/lockc"
)

// space is a lockspace on the server. It is lost when the server says so,
// when the client crashes its node or closes it, or when the connection
// ends.
type space struct {
	c    *Client
	id   uint64
	node uint32
	name string

	mu      sync.Mutex
	losing  bool     // lose has begun: OnLost calls its function at once
	crashed bool     // lost by Client.Crash or LoseNode: the server must not close it
	onLost  []func() // registered OnLost functions, until the loss
	err     error    // why it was lost
	isLost  atomic.Bool
	lost    chan struct{}
}

var (
	_ lockc.Lockspace    = (*space)(nil)
	_ lockc.LostChecker  = (*space)(nil)
	_ lockc.LostNotifier = (*space)(nil)
)

func (s *space) NodeID() uint32        { return s.node }
func (s *space) Name() string          { return s.name }
func (s *space) Lost() <-chan struct{} { return s.lost }
func (s *space) IsLost() bool          { return s.isLost.Load() }

func (s *space) Err() error {
	if !s.isLost.Load() {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// OnLost calls f when the lockspace is lost on this client: before IsLost
// turns true and Lost is closed.
func (s *space) OnLost(f func()) {
	s.mu.Lock()
	if s.losing {
		s.mu.Unlock()
		f()
		return
	}
	s.onLost = append(s.onLost, f)
	s.mu.Unlock()
}

// lose marks the lockspace lost with err (which wraps lockc.ErrLost), once:
// OnLost functions first, then IsLost, then Lost.
func (s *space) lose(err error) {
	s.mu.Lock()
	if s.losing {
		s.mu.Unlock()
		return
	}
	s.losing = true
	s.err = err
	fns := s.onLost
	s.onLost = nil
	s.mu.Unlock()
	for _, f := range fns {
		f()
	}
	s.isLost.Store(true)
	close(s.lost)
}

// Lock requests a new lock on the server.
func (s *space) Lock(ctx context.Context, resource []byte, m lockc.Mode, flags ...lockc.Flag) (lockc.Lock, error) {
	if s.isLost.Load() {
		return nil, fmt.Errorf("lockspace %s: lock %q: %w", s.name, resource, s.Err())
	}
	rep, err := s.c.call(ctx, request{Op: opLock, Space: s.id, Resource: resource, Mode: m, Flags: flags})
	if err != nil {
		return nil, err
	}
	l := rep.lock
	if l == nil {
		return nil, fmt.Errorf("lockspace %s: lock %q: %w", s.name, resource, lockc.ErrLost)
	}
	if s.isLost.Load() {
		// The grant raced this client's loss of the lockspace: the lock
		// is gone with it.
		l.drop()
		return nil, fmt.Errorf("lockspace %s: lock %q: %w", s.name, resource, s.Err())
	}
	if rep.HasToken {
		return &tokenLock{l}, nil
	}
	return l, nil
}

// Close closes the lockspace on the server, after losing it here. A
// lockspace this client crashed is not closed on the server: a close there
// could release its locks and publish their LVBs before the crash arrives,
// as a crashed node never does.
func (s *space) Close() error {
	s.lose(fmt.Errorf("lockspace %s: closed: %w", s.name, lockc.ErrLost))
	s.mu.Lock()
	crashed := s.crashed
	s.mu.Unlock()
	if crashed {
		s.c.mu.Lock()
		delete(s.c.spaces, s.id)
		s.c.mu.Unlock()
		return nil
	}
	_, err := s.c.call(context.Background(), request{Op: opClose, Space: s.id})
	s.c.mu.Lock()
	delete(s.c.spaces, s.id)
	s.c.mu.Unlock()
	return err
}
