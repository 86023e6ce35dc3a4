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

// ErrDisconnected is wrapped by the errors of calls that the connection's
// end cut short; a lockspace lost that way has an Err wrapping both it and
// lockc.ErrLost.
var ErrDisconnected = errors.New("lockagent: connection lost")

// Client drives the engines of one server. Its methods may be called from
// any goroutine.
type Client struct {
	conn io.ReadWriteCloser
	name string
	caps caps

	encMu sync.Mutex
	enc   *gob.Encoder

	mu     sync.Mutex
	next   uint64
	calls  map[uint64]chan message
	spaces map[uint64]*space
	locks  map[uint64]*lock
	err    error         // why the connection ended
	done   chan struct{} // closed when the read loop has ended
}

// NewClient reads the server's greeting from conn and returns a client for
// it. The client owns conn: Close closes it.
func NewClient(conn io.ReadWriteCloser) (*Client, error) {
	dec := gob.NewDecoder(conn)
	var hello message
	if err := dec.Decode(&hello); err != nil {
		conn.Close()
		return nil, fmt.Errorf("lockagent: greeting: %w", err)
	}
	if hello.Kind != kindHello {
		conn.Close()
		return nil, fmt.Errorf("lockagent: greeting: unexpected frame kind %d", hello.Kind)
	}
	c := &Client{
		conn: conn, name: hello.Name, caps: hello.Caps, enc: gob.NewEncoder(conn),
		calls: map[uint64]chan message{}, spaces: map[uint64]*space{}, locks: map[uint64]*lock{},
		done: make(chan struct{}),
	}
	go c.readLoop(dec)
	return c, nil
}

// Name is the name the server sent.
func (c *Client) Name() string { return c.name }

// Done is closed when the connection has ended.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the connection; the server closes what it opened for it.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.done
	return err
}

// Engine returns node's engine on the server. Its lockspaces report node
// as their NodeID.
func (c *Client) Engine(node uint32) lockc.Engine { return &engine{c: c, node: node} }

// Crash makes node's engine on the server die as a crashed process would.
// Before the server is asked, the client loses the node's lockspaces
// itself (OnLost functions, IsLost, Lost, pending calls failing with
// lockc.ErrLost), so that the loss is known here before the lock manager
// can grant another node what the crashed one held.
func (c *Client) Crash(ctx context.Context, node uint32) error {
	if !c.caps.Crash {
		return fmt.Errorf("lockagent %s: crash: %w", c.name, errors.ErrUnsupported)
	}
	c.LoseNode(node, fmt.Errorf("lockagent %s: node %d crashed: %w", c.name, node, lockc.ErrLost))
	_, err := c.call(ctx, request{Op: opCrash, Node: node})
	return err
}

// LoseNode loses node's lockspaces on the client side only, with err: for
// a test that is about to kill the machine the server runs on.
func (c *Client) LoseNode(node uint32, err error) {
	c.mu.Lock()
	var lost []*space
	for _, sp := range c.spaces {
		if sp.node == node {
			lost = append(lost, sp)
		}
	}
	c.mu.Unlock()
	for _, sp := range lost {
		sp.mu.Lock()
		sp.crashed = true
		sp.mu.Unlock()
		sp.lose(err)
	}
}

// CanWaitQueueLen reports whether the server answers WaitQueueLen.
func (c *Client) CanWaitQueueLen() bool { return c.caps.QueueLen }

// WaitQueueLen waits until the server's engines have exactly converting
// and waiting requests queued on resource, and every blocking notification
// this caused has been delivered to the client's locks.
func (c *Client) WaitQueueLen(ctx context.Context, lockspace string, resource []byte, converting, waiting int) error {
	_, err := c.call(ctx, request{Op: opWaitQueueLen, Name: lockspace, Resource: resource, Converting: converting, Waiting: waiting})
	return err
}

// CanCountResources reports whether the server answers ResourceCount.
func (c *Client) CanCountResources() bool { return c.caps.ResourceCount }

// ResourceCount returns how many resources the server's engines remember.
func (c *Client) ResourceCount(ctx context.Context) (int, error) {
	m, err := c.call(ctx, request{Op: opResourceCount})
	return m.Count, err
}

// call sends rq and waits for its reply. When ctx ends first, it asks the
// server to cancel the call and goes on waiting for the reply: the server's
// engine ends the call (at once, as lockc promises) and says how.
func (c *Client) call(ctx context.Context, rq request) (message, error) {
	reply := make(chan message, 1)
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return message{}, err
	}
	c.next++
	rq.ID = c.next
	c.calls[rq.ID] = reply
	c.mu.Unlock()
	rq.Ended = ctx.Err() != nil
	if err := c.send(rq); err != nil {
		c.mu.Lock()
		delete(c.calls, rq.ID)
		c.mu.Unlock()
		return message{}, fmt.Errorf("lockagent %s: %w: %w: %w", c.name, ErrDisconnected, lockc.ErrLost, err)
	}
	select {
	case m := <-reply:
		return m, c.replyErr(ctx, m)
	case <-ctx.Done():
	}
	_ = c.send(request{Op: opCancel, Target: rq.ID})
	m := <-reply
	return m, c.replyErr(ctx, m)
}

// replyErr is the error of a reply; a cancelled call reports ctx's own
// error (DeadlineExceeded or Canceled) as lockc's engines do.
func (c *Client) replyErr(ctx context.Context, m message) error {
	err := fromWire(m.Err)
	if err != nil && errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return fmt.Errorf("%w: %w", err, ctx.Err())
	}
	return err
}

func (c *Client) send(rq request) error {
	c.encMu.Lock()
	defer c.encMu.Unlock()
	return c.enc.Encode(rq)
}

// readLoop dispatches the server's frames until the connection ends, then
// fails every pending call and loses every lockspace.
func (c *Client) readLoop(dec *gob.Decoder) {
	var err error
	for {
		var m message
		if err = dec.Decode(&m); err != nil {
			break
		}
		switch m.Kind {
		case kindReply:
			c.adopt(&m)
			c.mu.Lock()
			reply, ok := c.calls[m.ID]
			delete(c.calls, m.ID)
			c.mu.Unlock()
			if ok {
				reply <- m
			}
		case kindBlocking:
			c.mu.Lock()
			l := c.locks[m.Lock]
			c.mu.Unlock()
			if l != nil {
				l.deliver(m.Mode)
			}
		case kindLost:
			c.mu.Lock()
			sp := c.spaces[m.Space]
			c.mu.Unlock()
			if sp != nil {
				sp.lose(fmt.Errorf("lockagent %s: %w", c.name, fromWire(m.Err)))
			}
		}
	}
	lost := fmt.Errorf("lockagent %s: %w: %w: %w", c.name, ErrDisconnected, lockc.ErrLost, err)
	c.mu.Lock()
	c.err = lost
	calls := c.calls
	c.calls = map[uint64]chan message{}
	spaces := make([]*space, 0, len(c.spaces))
	for _, sp := range c.spaces {
		spaces = append(spaces, sp)
	}
	c.mu.Unlock()
	for _, sp := range spaces {
		sp.lose(lost)
	}
	for _, reply := range calls {
		reply <- message{Err: toWire(lost)}
	}
	close(c.done)
}

// adopt makes and registers the lockspace or lock a reply creates.
func (c *Client) adopt(m *message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case m.NewSpace:
		m.space = &space{c: c, id: m.Space, node: m.Node, name: m.Name, lost: make(chan struct{})}
		c.spaces[m.Space] = m.space
	case m.NewLock:
		sp := c.spaces[m.Space]
		if sp == nil {
			return
		}
		m.lock = &lock{space: sp, id: m.Lock, bast: make(chan lockc.Mode, 1)}
		m.lock.update(*m)
		c.locks[m.Lock] = m.lock
	}
}

// engine is a node's engine on the server.
type engine struct {
	c    *Client
	node uint32
}

// Open joins the lockspace on the server.
func (e *engine) Open(ctx context.Context, name string) (lockc.Lockspace, error) {
	m, err := e.c.call(ctx, request{Op: opOpen, Node: e.node, Name: name})
	if err != nil {
		return nil, err
	}
	if m.space == nil {
		return nil, fmt.Errorf("lockagent %s: open %s: no lockspace in the reply", e.c.name, name)
	}
	return m.space, nil
}
