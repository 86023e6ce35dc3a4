package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// connBufferSize is the size of a connection's read and write buffers: large
// enough to batch headers and small replies, small enough that big payloads
// bypass it.
const connBufferSize = 64 << 10

// unixSendBuffer is the send buffer asked for on unix sockets. The default
// (about 200 KiB) holds a fifth of a 1 MiB read reply, so the write parks
// several times waiting for the client to drain it; with room for a few
// replies, a reply goes out in one write while the client reads the last.
// The kernel caps it at net.core.wmem_max.
const unixSendBuffer = 4 << 20

// conn is one client connection.
type conn struct {
	srv *Server
	nc  net.Conn
	// stream is nc, or the TLS layer over it after STARTTLS: what r and w
	// wrap, and what payloads are read from and written to directly.
	stream io.ReadWriter
	r      *bufio.Reader
	// ctx is cancelled to close the connection hard; requests run under it.
	ctx    context.Context
	cancel context.CancelFunc

	// log is the server's logger with the connection's peer and export,
	// set before transmission starts.
	log *slog.Logger
	// bound is the export a GO or EXPORT_NAME chose, guarded by srv.mu so
	// that RemoveExport finds the connections using an export.
	bound *export
	// ended is closed once the connection has finished.
	ended chan struct{}

	// Negotiated state, written before transmission starts. metaExport
	// is the export the selected metadata contexts were chosen for;
	// nextBitmapID is the id the next dirty bitmap selected gets, so that
	// no id is given twice on a connection.
	noZeroes           bool
	tls                bool
	structured         bool
	metaExport         *export
	metaBaseAllocation bool
	metaExceptions     bool
	metaBitmaps        []selectedBitmap
	nextBitmapID       uint32
	exp                *export

	// deadlineMu orders beginShutdown's read deadline against the phases
	// setting their own.
	deadlineMu sync.Mutex
	shutting   atomic.Bool

	// w buffers the negotiation's replies.
	w *bufio.Writer
	// wmu serialises replies on stream; writers counts the goroutines
	// about to write a reply (and the reader while it holds replies back),
	// so that the last of a burst writes them. tx gathers the replies not
	// yet written; iov and iovs are the scratch space to write it, a
	// header and a payload with one writev (see writeLarge).
	wmu      sync.Mutex
	writers  atomic.Int32
	writeErr error
	tx       []byte
	iov      [3][]byte
	iovs     net.Buffers
	// tcp is the TCP socket under stream when nothing lies between
	// (no TLS) and the system lets its sends and receives be tuned
	// (see tcpSocket); nil otherwise.
	tcp *tcpSocket

	// free holds the request slots; its capacity is the in-flight bound.
	free chan *request
	work chan *request

	// bytesMu and bytesCond guard bytesUsed, the payload memory held.
	bytesMu   sync.Mutex
	bytesCond *sync.Cond
	bytesUsed int64

	// dirty records a write since the last flush, for the flush at close.
	dirty atomic.Bool

	// counters count the requests answered, for Server.Stats.
	counters connCounters

	// readCost and writeCost estimate READs' and WRITEs' recent backend
	// time, for the choice of running them inline (runsInline).
	readCost, writeCost costEstimate
}

// selectedBitmap is a dirty bitmap a connection selected, by the bitmap's
// name, and the context id its block status chunks carry.
type selectedBitmap struct {
	name string
	id   uint32
}

// request is one transmission request and the scratch space to answer it.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	off    uint64
	length uint32
	// errno, when not zero, is the answer decided while reading.
	errno uint32
	// buf is the payload (WRITE) or read buffer (READ), from the pool.
	buf *[]byte
	// reserved is what the request holds of the connection's byte budget.
	reserved int64
	// hdr is scratch space for reply headers.
	hdr [structuredReplyHeaderSize + 8]byte
}

// newConn prepares a connection whose life is bounded by parent.
func newConn(parent context.Context, s *Server, nc net.Conn) *conn {
	c := &conn{
		srv:    s,
		nc:     nc,
		stream: nc,
		r:      bufio.NewReaderSize(nc, connBufferSize),
		w:      bufio.NewWriterSize(nc, connBufferSize),
		ended:  make(chan struct{}),
	}
	if uc, ok := nc.(*net.UnixConn); ok {
		// Best effort: a smaller buffer costs speed, not correctness.
		_ = uc.SetWriteBuffer(unixSendBuffer)
	}
	c.nextBitmapID = metaContextFirstBitmapID
	c.readCost.ns.Store(int64(unprovenCost))
	c.writeCost.ns.Store(int64(unprovenCost))
	c.bytesCond = sync.NewCond(&c.bytesMu)
	c.ctx, c.cancel = context.WithCancel(parent)
	return c
}

// serve runs the connection to its end and closes it.
func (c *conn) serve() {
	stop := context.AfterFunc(c.ctx, func() { c.nc.Close() })
	defer func() {
		stop()
		c.cancel()
		c.nc.Close()
		c.srv.untrack(c)
		close(c.ended)
	}()
	remote := "unknown"
	if addr := c.nc.RemoteAddr(); addr != nil {
		// Connections made from files (socket activation, stdio)
		// may have no peer address.
		remote = addr.String()
	}
	log := c.srv.log.With("remote", remote)

	c.deadlineMu.Lock()
	if c.shutting.Load() {
		c.deadlineMu.Unlock()
		return
	}
	_ = c.nc.SetDeadline(time.Now().Add(c.srv.opts.HandshakeTimeout))
	c.deadlineMu.Unlock()
	if err := c.negotiate(); err != nil {
		if !errors.Is(err, errClientAborted) {
			log.Info("nbd negotiation failed", "err", err)
		}
		return
	}
	c.deadlineMu.Lock()
	if c.shutting.Load() {
		c.deadlineMu.Unlock()
		return
	}
	_ = c.nc.SetDeadline(time.Time{})
	c.deadlineMu.Unlock()

	log = log.With("export", c.exp.Name)
	c.log = log
	log.Debug("nbd transmission started", "structured", c.structured, "tls", c.tls)
	if err := c.transmit(); err != nil {
		log.Info("nbd connection ended", "err", err)
	}
}

// beginShutdown makes the connection stop reading requests and finish: the
// reader's blocked read returns at once.
func (c *conn) beginShutdown() {
	c.deadlineMu.Lock()
	defer c.deadlineMu.Unlock()
	c.shutting.Store(true)
	_ = c.nc.SetReadDeadline(time.Now())
}

// abort closes the connection hard.
func (c *conn) abort() {
	c.cancel()
	c.nc.Close()
}

// transmit runs the transmission phase: this goroutine reads and checks
// requests, workers run them and write the replies (except quick READs and
// WRITEs, which the reader runs itself: see runsInline).
func (c *conn) transmit() error {
	n := c.srv.opts.MaxInFlight
	c.tx = make([]byte, 0, connBufferSize)
	c.tcp = newTCPSocket(c.stream)
	c.free = make(chan *request, n)
	c.work = make(chan *request, n)
	for range n {
		c.free <- new(request)
	}
	var workers sync.WaitGroup
	for range n {
		workers.Go(func() {
			for req := range c.work {
				c.handle(req)
				c.release(req)
			}
		})
	}

	readErr := c.readRequests()
	close(c.work)
	workers.Wait()

	if c.dirty.Load() && c.ctx.Err() == nil {
		if err := c.exp.Backend.Flush(c.ctx); err != nil {
			return errors.Join(readErr, fmt.Errorf("flush at close: %w", err))
		}
	}
	return readErr
}

// reserve takes n bytes of the connection's payload budget for req, waiting
// for running requests to give some back.
func (c *conn) reserve(req *request, n int64) {
	c.bytesMu.Lock()
	for c.bytesUsed > 0 && c.bytesUsed+n > c.srv.opts.MaxInFlightBytes {
		c.bytesCond.Wait()
	}
	c.bytesUsed += n
	c.bytesMu.Unlock()
	req.reserved = n
}

// release returns req's memory and slot.
func (c *conn) release(req *request) {
	if req.buf != nil {
		c.srv.putBuffer(req.buf)
		req.buf = nil
	}
	if req.reserved > 0 {
		c.bytesMu.Lock()
		c.bytesUsed -= req.reserved
		c.bytesMu.Unlock()
		c.bytesCond.Signal()
		req.reserved = 0
	}
	c.free <- req
}
