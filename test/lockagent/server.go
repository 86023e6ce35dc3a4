package lockagent

import (
	"context"
	"encoding/gob"
	"errors"
	"fmt"
	"io"
	"sync"

	"github.com/clustersnap/clustersnap/lockc"
)

// ServerConfig says which engines a server drives.
type ServerConfig struct {
	// Name is sent to the client first (a guest's number, say), so that a
	// listener that accepts several servers knows which is which.
	Name string
	// Engine returns node's engine; it is called once per node id, on the
	// node's first Open, and again after a Crash of the node.
	Engine func(node uint32) (lockc.Engine, error)
	// Crash, if set, makes the node's engine die as a crashed process
	// would: its lockspaces lost, its locks dropped by the lock manager
	// without being released. The server forgets the node's lockspaces
	// and locks afterwards.
	Crash func(ctx context.Context, node uint32) error
	// QueueWaiter, if set, answers WaitQueueLen.
	QueueWaiter interface {
		WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error
	}
	// ResourceCount, if set, answers ResourceCount.
	ResourceCount func() int
}

// Serve serves one client on conn until the client goes away or ctx ends,
// then closes every lockspace it opened and conn.
func Serve(ctx context.Context, conn io.ReadWriteCloser, cfg ServerConfig) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s := &server{
		cfg:     cfg,
		ctx:     ctx,
		enc:     gob.NewEncoder(conn),
		engines: map[uint32]lockc.Engine{},
		spaces:  map[uint64]*serverSpace{},
		locks:   map[uint64]*serverLock{},
		calls:   map[uint64]context.CancelFunc{},
	}
	go func() {
		<-ctx.Done()
		conn.Close()
	}()
	err := s.send(message{Kind: kindHello, Name: cfg.Name, Caps: caps{
		Crash: cfg.Crash != nil, QueueLen: cfg.QueueWaiter != nil, ResourceCount: cfg.ResourceCount != nil,
	}})
	if err == nil {
		err = s.readLoop(gob.NewDecoder(conn))
	}
	cancel()
	s.wg.Wait()
	s.mu.Lock()
	spaces := make([]*serverSpace, 0, len(s.spaces))
	for _, sp := range s.spaces {
		spaces = append(spaces, sp)
	}
	s.mu.Unlock()
	for _, sp := range spaces {
		_ = sp.ls.Close()
	}
	if errors.Is(err, io.EOF) || ctx.Err() != nil {
		return nil
	}
	return err
}

// server is one connection's state. Calls that may block run in their own
// goroutines, started in arrival order; SetLVB and InvalidateLVB run in the
// read loop, so they take effect before any later call of the client.
type server struct {
	cfg ServerConfig
	ctx context.Context
	wg  sync.WaitGroup

	encMu sync.Mutex
	enc   *gob.Encoder

	mu      sync.Mutex
	next    uint64
	engines map[uint32]lockc.Engine
	spaces  map[uint64]*serverSpace
	locks   map[uint64]*serverLock
	calls   map[uint64]context.CancelFunc // pending calls, for opCancel
}

// serverSpace is a lockspace opened for the client.
type serverSpace struct {
	id   uint64
	node uint32
	ls   lockc.Lockspace
}

// serverLock is a lock granted to the client, with the goroutine that
// forwards its blocking notifications.
type serverLock struct {
	id    uint64
	space *serverSpace
	l     lockc.Lock
	flush chan chan struct{} // asks the forwarder to send what it has
	halt  chan chan struct{} // asks the forwarder to return
	stop  chan struct{}      // closed when the lock is gone
}

// send writes one frame.
func (s *server) send(m message) error {
	s.encMu.Lock()
	defer s.encMu.Unlock()
	return s.enc.Encode(m)
}

func (s *server) readLoop(dec *gob.Decoder) error {
	for {
		var rq request
		if err := dec.Decode(&rq); err != nil {
			return err
		}
		switch rq.Op {
		case opCancel:
			s.mu.Lock()
			if cancel, ok := s.calls[rq.Target]; ok {
				cancel()
			}
			s.mu.Unlock()
		case opSetLVB, opInvalidateLVB:
			s.reply(rq, s.stage(rq))
		default:
			callCtx, cancel := context.WithCancel(s.ctx)
			if rq.Ended {
				cancel()
			}
			s.mu.Lock()
			s.calls[rq.ID] = cancel
			s.mu.Unlock()
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				m := s.call(callCtx, rq)
				s.mu.Lock()
				delete(s.calls, rq.ID)
				s.mu.Unlock()
				cancel()
				s.reply(rq, m)
				if m.NewLock {
					s.startForwarding(m.Lock)
				}
			}()
		}
	}
}

// reply sends m as rq's reply.
func (s *server) reply(rq request, m message) {
	m.Kind, m.ID = kindReply, rq.ID
	_ = s.send(m) // a broken connection ends the read loop
}

// fail is a reply carrying err.
func fail(err error) message { return message{Err: toWire(err)} }

// call runs one blocking call.
func (s *server) call(ctx context.Context, rq request) message {
	switch rq.Op {
	case opOpen:
		return s.open(ctx, rq)
	case opLock:
		return s.lock(ctx, rq)
	case opConvert:
		sl, err := s.lockOf(rq.Lock)
		if err != nil {
			return fail(err)
		}
		err = sl.l.Convert(ctx, rq.Mode, rq.Flags...)
		m := lockState(sl.l)
		m.Err = toWire(err)
		return m
	case opUnlock:
		sl, err := s.lockOf(rq.Lock)
		if err != nil {
			return fail(err)
		}
		// The forwarder stops first, so that no notification it took
		// before the unlock follows the reply; the client drops the ones
		// before it with the lock, as the engine withdraws undelivered ones.
		s.halt(sl)
		err = sl.l.Unlock(ctx)
		if err == nil || errors.Is(err, lockc.ErrUnlocked) || errors.Is(err, lockc.ErrLost) {
			s.forget(sl)
		} else {
			s.wg.Add(1)
			go s.forward(sl)
		}
		return fail(err)
	case opClose:
		sp, err := s.spaceOf(rq.Space)
		if err != nil {
			return fail(err)
		}
		err = sp.ls.Close()
		s.forgetSpace(sp)
		return fail(err)
	case opCrash:
		if s.cfg.Crash == nil {
			return fail(fmt.Errorf("lockagent %s: crash: %w", s.cfg.Name, errors.ErrUnsupported))
		}
		err := s.cfg.Crash(ctx, rq.Node)
		s.mu.Lock()
		var gone []*serverSpace
		for _, sp := range s.spaces {
			if sp.node == rq.Node {
				gone = append(gone, sp)
			}
		}
		delete(s.engines, rq.Node)
		s.mu.Unlock()
		for _, sp := range gone {
			s.forgetSpace(sp)
		}
		return fail(err)
	case opWaitQueueLen:
		if s.cfg.QueueWaiter == nil {
			return fail(fmt.Errorf("lockagent %s: queue lengths: %w", s.cfg.Name, errors.ErrUnsupported))
		}
		if err := s.cfg.QueueWaiter.WaitQueueLen(ctx, rq.Name, rq.Resource, rq.Converting, rq.Waiting); err != nil {
			return fail(err)
		}
		s.flushBlocking()
		return message{}
	case opResourceCount:
		if s.cfg.ResourceCount == nil {
			return fail(fmt.Errorf("lockagent %s: resource count: %w", s.cfg.Name, errors.ErrUnsupported))
		}
		return message{Count: s.cfg.ResourceCount()}
	}
	return fail(fmt.Errorf("lockagent %s: unknown operation %d: %w", s.cfg.Name, rq.Op, lockc.ErrBadRequest))
}

// open opens a lockspace on the node's engine.
func (s *server) open(ctx context.Context, rq request) message {
	s.mu.Lock()
	eng, ok := s.engines[rq.Node]
	s.mu.Unlock()
	if !ok {
		var err error
		if eng, err = s.cfg.Engine(rq.Node); err != nil {
			return fail(fmt.Errorf("lockagent %s: node %d: %w", s.cfg.Name, rq.Node, err))
		}
		s.mu.Lock()
		if prev, ok := s.engines[rq.Node]; ok {
			eng = prev
		} else {
			s.engines[rq.Node] = eng
		}
		s.mu.Unlock()
	}
	ls, err := eng.Open(ctx, rq.Name)
	if err != nil {
		return fail(err)
	}
	s.mu.Lock()
	s.next++
	sp := &serverSpace{id: s.next, node: rq.Node, ls: ls}
	s.spaces[sp.id] = sp
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		select {
		case <-ls.Lost():
			_ = s.send(message{Kind: kindLost, Space: sp.id, Err: toWire(ls.Err())})
		case <-s.ctx.Done():
		}
	}()
	return message{NewSpace: true, Space: sp.id, Node: rq.Node, Name: rq.Name}
}

// lock requests a new lock.
func (s *server) lock(ctx context.Context, rq request) message {
	sp, err := s.spaceOf(rq.Space)
	if err != nil {
		return fail(err)
	}
	l, err := sp.ls.Lock(ctx, rq.Resource, rq.Mode, rq.Flags...)
	if err != nil {
		return fail(err)
	}
	s.mu.Lock()
	s.next++
	sl := &serverLock{id: s.next, space: sp, l: l, flush: make(chan chan struct{}), halt: make(chan chan struct{}), stop: make(chan struct{})}
	s.locks[sl.id] = sl
	s.mu.Unlock()
	m := lockState(l)
	m.NewLock, m.Lock, m.Space = true, sl.id, sp.id
	return m
}

// startForwarding starts a new lock's forwarder, once the reply that
// tells the client of the lock is sent: a notification must not come first.
func (s *server) startForwarding(id uint64) {
	s.mu.Lock()
	sl, ok := s.locks[id]
	s.mu.Unlock()
	if ok {
		s.wg.Add(1)
		go s.forward(sl)
	}
}

// forward sends sl's blocking notifications until the lock is gone. On a
// flush it sends every notification the engine has delivered before it
// answers, so that a reply sent after the flush follows them on the stream.
func (s *server) forward(sl *serverLock) {
	defer s.wg.Done()
	for {
		select {
		case m := <-sl.l.Blocking():
			_ = s.send(message{Kind: kindBlocking, Lock: sl.id, Mode: m})
		case done := <-sl.flush:
			for drained := false; !drained; {
				select {
				case m := <-sl.l.Blocking():
					_ = s.send(message{Kind: kindBlocking, Lock: sl.id, Mode: m})
				default:
					drained = true
				}
			}
			close(done)
		case done := <-sl.halt:
			close(done)
			return
		case <-sl.stop:
			return
		case <-s.ctx.Done():
			return
		}
	}
}

// halt stops sl's forwarder and waits until it has returned.
func (s *server) halt(sl *serverLock) {
	done := make(chan struct{})
	select {
	case sl.halt <- done:
		<-done
	case <-sl.stop:
	case <-s.ctx.Done():
	}
}

// flushBlocking has every lock's forwarder send what the engine delivered.
func (s *server) flushBlocking() {
	s.mu.Lock()
	locks := make([]*serverLock, 0, len(s.locks))
	for _, sl := range s.locks {
		locks = append(locks, sl)
	}
	s.mu.Unlock()
	for _, sl := range locks {
		done := make(chan struct{})
		select {
		case sl.flush <- done:
			<-done
		case <-sl.stop:
		case <-s.ctx.Done():
		}
	}
}

// stage runs SetLVB or InvalidateLVB.
func (s *server) stage(rq request) message {
	sl, err := s.lockOf(rq.Lock)
	if err != nil {
		return fail(err)
	}
	if rq.Op == opSetLVB {
		sl.l.SetLVB(rq.LVB)
	} else {
		sl.l.InvalidateLVB()
	}
	return lockState(sl.l)
}

// lockState is a reply with l's mode, LVB and token.
func lockState(l lockc.Lock) message {
	m := message{HasState: true, Mode: l.Mode()}
	m.LVB, m.LVBState = l.LVB()
	if t, ok := l.(lockc.Tokener); ok {
		m.HasToken, m.Token = true, t.Token()
	}
	return m
}

func (s *server) lockOf(id uint64) (*serverLock, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sl, ok := s.locks[id]
	if !ok {
		return nil, fmt.Errorf("lockagent %s: lock %d: %w", s.cfg.Name, id, lockc.ErrUnlocked)
	}
	return sl, nil
}

func (s *server) spaceOf(id uint64) (*serverSpace, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	sp, ok := s.spaces[id]
	if !ok {
		return nil, fmt.Errorf("lockagent %s: lockspace %d: %w", s.cfg.Name, id, lockc.ErrLost)
	}
	return sp, nil
}

// forget drops a lock that is gone.
func (s *server) forget(sl *serverLock) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.locks[sl.id]; ok {
		delete(s.locks, sl.id)
		close(sl.stop)
	}
}

// forgetSpace drops a closed or crashed lockspace and its locks.
func (s *server) forgetSpace(sp *serverSpace) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.spaces, sp.id)
	for id, sl := range s.locks {
		if sl.space == sp {
			delete(s.locks, id)
			close(sl.stop)
		}
	}
}
