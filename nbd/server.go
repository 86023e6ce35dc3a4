package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"sync"
	"time"
)

// Export is one named device the server offers.
type Export struct {
	// Name is what clients ask for; names are unique within a server.
	Name string
	// Description is shown by clients that ask for it (nbdinfo); optional.
	Description string
	// Backend does the I/O.
	Backend Backend
	// ReadOnly refuses writes, trims and zeroing with EPERM and advertises
	// the export as read-only.
	ReadOnly bool
	// MultiConn advertises that a flush on any connection makes the writes
	// completed on every connection durable, which lets clients open
	// several connections. Set it only when that holds: true for a single
	// backend shared by all connections whose Flush syncs the whole device.
	MultiConn bool
}

// Options tune a Server. Zero values select the defaults.
type Options struct {
	// MaxInFlight bounds the requests a connection runs at once; the
	// reader stops reading when it is reached. Default 64.
	MaxInFlight int
	// MaxInFlightBytes bounds the payload memory (write data and read
	// buffers) a connection holds at once. Default 64 MiB; raised to
	// MaxPayload if smaller.
	MaxInFlightBytes int64
	// MaxPayload is the largest READ or WRITE length accepted and the
	// maximum block size advertised. Default 64 MiB, as nbdkit's: clients
	// that do not negotiate block sizes (the NBD project's own test
	// client sends up to about 48 MiB) are served.
	MaxPayload int
	// HandshakeTimeout bounds the whole option negotiation. Default 1 min.
	HandshakeTimeout time.Duration
	// Logger receives connection-level events; nil discards them.
	Logger *slog.Logger
	// TLSMode says whether clients may or must upgrade to TLS with
	// NBD_OPT_STARTTLS. Default TLSOff.
	TLSMode TLSMode
	// TLS is the server's TLS configuration (certificates, and ClientAuth
	// and ClientCAs to authenticate clients); required unless TLSMode is
	// TLSOff.
	TLS *tls.Config
}

// Defaults for Options.
const (
	DefaultMaxInFlight      = 64
	DefaultMaxInFlightBytes = 64 << 20
	DefaultMaxPayload       = 64 << 20
	DefaultHandshakeTimeout = time.Minute
)

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves a set of exports over any number of listeners and
// connections. Exports may be added and removed while it serves.
type Server struct {
	opts    Options
	log     *slog.Logger
	buffers bufferPools

	mu sync.Mutex
	// exports in the order they were added, and by name.
	exports     []*export
	exportNames map[string]*export
	closing     bool
	listeners   map[net.Listener]struct{}
	conns       map[*conn]struct{}
	// done is closed when closing is set, to wake Serve loops.
	done chan struct{}
	// active counts Serve loops and connections, for Shutdown to wait on.
	active sync.WaitGroup
}

// export is an Export with what the server derives from it once.
type export struct {
	Export
	trimmer        Trimmer
	zeroer         Zeroer
	extenter       Extenter
	cowMapper      COWMapper
	dirtyBitmapper DirtyBitmapper
	// minBlock is the request alignment the backend needs (1 for none).
	minBlock int

	// connections counts the connections that selected the export, and
	// ended holds the counts of those that ended; both guarded by
	// Server.mu.
	connections uint64
	ended       ExportStats
}

// NewServer returns a server for exports. It panics on a duplicate name, a
// nil backend, or a TLS mode other than TLSOff without a TLS configuration,
// which are programming errors.
func NewServer(exports []Export, opts Options) *Server {
	if opts.TLSMode != TLSOff && opts.TLS == nil {
		panic(fmt.Sprintf("nbd: TLS mode %s needs Options.TLS", opts.TLSMode))
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = DefaultMaxInFlight
	}
	if opts.MaxPayload <= 0 {
		opts.MaxPayload = DefaultMaxPayload
	}
	if opts.MaxInFlightBytes <= 0 {
		opts.MaxInFlightBytes = DefaultMaxInFlightBytes
	}
	opts.MaxInFlightBytes = max(opts.MaxInFlightBytes, int64(opts.MaxPayload))
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = DefaultHandshakeTimeout
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		exportNames: make(map[string]*export, len(exports)),
		opts:        opts,
		log:         logger,
		listeners:   make(map[net.Listener]struct{}),
		conns:       make(map[*conn]struct{}),
		done:        make(chan struct{}),
		buffers:     newBufferPools(opts.MaxPayload),
	}
	for _, e := range exports {
		if err := s.AddExport(e); err != nil {
			panic(err.Error())
		}
	}
	return s
}

// AddExport serves e from now on: clients that negotiate after AddExport
// returns see it in their export list and can select it. It fails on a
// name already exported or a nil backend.
func (s *Server) AddExport(e Export) error {
	if e.Backend == nil {
		return fmt.Errorf("nbd: export %q has no backend", e.Name)
	}
	x := &export{Export: e, minBlock: 1}
	x.trimmer, _ = e.Backend.(Trimmer)
	x.zeroer, _ = e.Backend.(Zeroer)
	x.extenter, _ = e.Backend.(Extenter)
	x.cowMapper, _ = e.Backend.(COWMapper)
	x.dirtyBitmapper, _ = e.Backend.(DirtyBitmapper)
	if bs, ok := e.Backend.(BlockSizer); ok && bs.MinBlockSize() > 1 {
		x.minBlock = bs.MinBlockSize()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, dup := s.exportNames[e.Name]; dup {
		return fmt.Errorf("nbd: export %q defined twice", e.Name)
	}
	s.exports = append(s.exports, x)
	s.exportNames[e.Name] = x
	return nil
}

// RemoveExport stops serving the export called name: clients that
// negotiate after it no longer see it, and every connection using it stops
// reading requests (one partly received is answered with ESHUTDOWN), lets
// the requests it has finish, and closes. RemoveExport returns once those
// connections have closed, so the export's backend gets no more I/O; if ctx
// ends first they are closed hard, and it returns ctx.Err() once they have.
func (s *Server) RemoveExport(ctx context.Context, name string) error {
	s.mu.Lock()
	x := s.exportNames[name]
	if x == nil {
		s.mu.Unlock()
		return fmt.Errorf("nbd: export %q: not served", name)
	}
	delete(s.exportNames, name)
	s.exports = slices.DeleteFunc(s.exports, func(y *export) bool { return y == x })
	var using []*conn
	for c := range s.conns {
		if c.bound == x {
			using = append(using, c)
		}
	}
	s.mu.Unlock()
	for _, c := range using {
		c.beginShutdown()
	}
	var err error
	for _, c := range using {
		select {
		case <-c.ended:
			continue
		case <-ctx.Done():
			err = ctx.Err()
		}
		for _, c := range using {
			c.abort()
		}
		break
	}
	for _, c := range using {
		<-c.ended
	}
	if err != nil {
		return fmt.Errorf("nbd: export %q: %w", name, err)
	}
	return nil
}

// exportList returns the exports, in the order they were added.
func (s *Server) exportList() []*export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.exports)
}

// bind returns the export called name and records that c uses it, or nil
// if there is none.
func (s *Server) bind(c *conn, name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	x := s.exportNames[name]
	if x != nil {
		c.bound = x
		x.connections++
	}
	return x
}

// Serve accepts connections on l and serves each in its own goroutine until
// Shutdown (it then returns ErrServerClosed) or until ctx is cancelled (it
// returns ctx.Err(); connections accepted under ctx are then closed hard).
// Serve closes l when it returns.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.active.Add(1)
	s.mu.Unlock()
	defer s.active.Done()

	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()

	var tempDelay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			select {
			case <-s.done:
				return ErrServerClosed
			default:
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Transient (EMFILE and friends surface as errors
				// too, but only timeouts are promised to pass).
				tempDelay = min(max(2*tempDelay, 5*time.Millisecond), time.Second)
				time.Sleep(tempDelay)
				continue
			}
			return fmt.Errorf("nbd: accept on %s: %w", l.Addr(), err)
		}
		tempDelay = 0
		c, ok := s.track(ctx, nc)
		if !ok {
			nc.Close()
			return ErrServerClosed
		}
		go func() {
			defer s.active.Done()
			c.serve()
		}()
	}
}

// ServeConn serves one already-accepted connection and returns when it ends:
// the client disconnects, the connection breaks, Shutdown finishes with it,
// or ctx is cancelled (which closes it at once and cancels the requests
// running on it). ServeConn closes nc.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) {
	c, ok := s.track(ctx, nc)
	if !ok {
		nc.Close()
		return
	}
	defer s.active.Done()
	c.serve()
}

// track registers a new connection, or refuses it once shutting down.
func (s *Server) track(ctx context.Context, nc net.Conn) (*conn, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return nil, false
	}
	c := newConn(ctx, s, nc)
	s.conns[c] = struct{}{}
	s.active.Add(1)
	return c, true
}

// untrack forgets a finished connection, keeping its counts in its
// export's.
func (s *Server) untrack(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	if c.bound != nil {
		c.counters.addTo(&c.bound.ended)
	}
	s.mu.Unlock()
}

// Shutdown stops the server gracefully: it closes the listeners, stops every
// connection from reading new requests (a request already partly received is
// answered with ESHUTDOWN), lets the requests in flight finish and be
// answered, flushes the exports written to, and closes the connections.
// Connections still negotiating are closed at once. If ctx ends first, the
// remaining connections are closed hard and their requests cancelled; Shutdown
// then waits for them to unwind and returns ctx.Err().
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if !s.closing {
		s.closing = true
		close(s.done)
	}
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()

	for _, c := range conns {
		c.beginShutdown()
	}
	finished := make(chan struct{})
	go func() {
		s.active.Wait()
		close(finished)
	}()
	select {
	case <-finished:
		return nil
	case <-ctx.Done():
	}
	s.mu.Lock()
	for c := range s.conns {
		c.abort()
	}
	s.mu.Unlock()
	<-finished
	return ctx.Err()
}

// lookup returns the export called name, or nil.
func (s *Server) lookup(name string) *export {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.exportNames[name]
}

// isClosing reports whether Shutdown has started.
func (s *Server) isClosing() bool {
	select {
	case <-s.done:
		return true
	default:
		return false
	}
}
