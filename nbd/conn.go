package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// connBufferSize is the size of a connection's read and write buffers: large
// enough to batch headers and small replies, small enough that big payloads
// bypass it.
const connBufferSize = 64 << 10

// inlineLimit is how long READs' or WRITEs' backend calls may recently have
// taken for the reader to run them itself instead of handing them to a
// worker. Handing off costs each request goroutine wake-ups and, while the
// worker's disk I/O and the reader's socket I/O are both in system calls, the
// runtime's moving of processors between threads: on a small machine that
// costs more CPU than the overlap gains when the data is in the page cache
// (copying 1 MiB to or from it takes 0.1 to 0.3 ms). Requests that wait for a
// disk or a commit take longer; they run on workers, where they overlap with
// later requests and writes can be committed together.
const inlineLimit = time.Millisecond

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

	// Negotiated state, written before transmission starts.
	noZeroes           bool
	tls                bool
	structured         bool
	metaExport         string
	metaBaseAllocation bool
	metaExceptions     bool
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
	// rawTCP is the TCP socket under stream when there is no TLS layer
	// between, nil otherwise: replies too large to gather are written to it
	// with MSG_MORE (writeLarge) and large payloads read from it with a
	// receive low-water mark (readPayloadRest). sendMoreFd, recvFd and
	// resetLowatFd are the functions handed to its Write, Read and Control,
	// made once so that a request allocates nothing; more, moreErr,
	// recvDst, recvN and recvErr are their arguments and results, and lowat
	// the socket's SO_RCVLOWAT.
	rawTCP       syscall.RawConn
	sendMoreFd   func(fd uintptr) bool
	more         []byte
	moreSent     int
	moreErr      error
	recvFd       func(fd uintptr) bool
	resetLowatFd func(fd uintptr)
	recvDst      []byte
	recvN        int
	recvErr      error
	lowat        int
	// noMore and noLowat say the socket refused MSG_MORE or SO_RCVLOWAT
	// (an old kernel's MPTCP may): the connection goes on without. sendmsg
	// and setLowat are the system calls, replaced in tests.
	noMore   bool
	noLowat  bool
	sendmsg  func(fd int, p []byte, flags int) (int, error)
	setLowat func(fd, bytes int) error

	// free holds the request slots; its capacity is the in-flight bound.
	free chan *request
	work chan *request

	// bytesMu and bytesCond guard bytesUsed, the payload memory held.
	bytesMu   sync.Mutex
	bytesCond *sync.Cond
	bytesUsed int64

	// dirty records a write since the last flush, for the flush at close.
	dirty atomic.Bool

	// readCost and writeCost estimate READs' and WRITEs' recent backend
	// time, for the choice of running them inline (runsInline).
	readCost, writeCost costEstimate
}

// costEstimate tracks how long a kind of request has recently taken in the
// backend, in nanoseconds: a slower request sets it, a quicker one moves it
// an eighth of the way down. Concurrent updates may lose one another's
// sample, which the estimate can afford.
type costEstimate struct{ ns atomic.Int64 }

// unprovenCost is where an estimate starts: above inlineLimit, so that a
// connection hands requests to workers until a run of them has been quick.
const unprovenCost = 2 * inlineLimit

// record folds in one request's backend time.
func (e *costEstimate) record(d time.Duration) {
	old := e.ns.Load()
	if int64(d) >= old {
		e.ns.Store(int64(d))
		return
	}
	e.ns.Store(old - (old-int64(d))/8)
}

// quick reports whether such requests have recently been quick enough to run
// inline.
func (e *costEstimate) quick() bool { return e.ns.Load() < int64(inlineLimit) }

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
	}
	if uc, ok := nc.(*net.UnixConn); ok {
		// Best effort: a smaller buffer costs speed, not correctness.
		_ = uc.SetWriteBuffer(unixSendBuffer)
	}
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
	c.findRawTCP()
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

// readRequests reads requests until the client disconnects, the connection
// fails or shutdown starts, running quick READs and WRITEs itself and handing
// the rest to the workers. A nil result is a clean end.
func (c *conn) readRequests() error {
	// holding says the reader holds back the writing of replies while the
	// next request is already buffered (see holdReplies).
	holding := false
	defer func() {
		if holding {
			c.releaseReplies()
		}
	}()
	for !c.shutting.Load() {
		if holding && !c.nextRequestBuffered() {
			holding = false
			c.releaseReplies()
		}
		var req *request
		select {
		case req = <-c.free:
		case <-c.ctx.Done():
			return c.ctx.Err()
		}
		stopped, err := c.readFull(req.hdr[:requestHeaderSize], true)
		if stopped || err != nil {
			c.free <- req
			if err == io.EOF {
				return nil
			}
			return err
		}
		h := req.hdr[:requestHeaderSize]
		if magic := binary.BigEndian.Uint32(h[0:]); magic != requestMagic {
			c.free <- req
			c.cancel()
			return fmt.Errorf("request with bad magic %#x", magic)
		}
		req.flags = binary.BigEndian.Uint16(h[4:])
		req.typ = binary.BigEndian.Uint16(h[6:])
		req.cookie = binary.BigEndian.Uint64(h[8:])
		req.off = binary.BigEndian.Uint64(h[16:])
		req.length = binary.BigEndian.Uint32(h[24:])
		if req.typ == cmdDisc {
			c.free <- req
			return nil
		}
		req.errno = c.check(req)
		if c.shutting.Load() {
			req.errno = errShutdown
		}
		if err := c.readPayload(req); err != nil {
			c.release(req)
			return err
		}
		if c.runsInline(req) {
			if !holding && c.nextRequestBuffered() {
				holding = true
				c.holdReplies()
			}
			c.handle(req)
			c.release(req)
			continue
		}
		c.work <- req
	}
	return nil
}

// nextRequestBuffered reports whether the next request, a WRITE's payload
// included, is in the read buffer: whether the reader can go on without
// waiting for the client.
func (c *conn) nextRequestBuffered() bool {
	n := c.r.Buffered()
	if n < requestHeaderSize {
		return false
	}
	h, err := c.r.Peek(requestHeaderSize)
	if err != nil {
		return false
	}
	if binary.BigEndian.Uint16(h[6:]) == cmdWrite {
		return n-requestHeaderSize >= int(binary.BigEndian.Uint32(h[24:]))
	}
	return true
}

// runsInline reports whether the reader should run req itself: a READ, or a
// WRITE without FUA, while such requests have been quick (see inlineLimit).
// A request run inline holds up the requests behind it, so one slow request
// is enough to hand its kind back to the workers, and it takes a run of quick
// ones to bring it back.
func (c *conn) runsInline(req *request) bool {
	if req.errno != 0 {
		return false
	}
	switch req.typ {
	case cmdRead:
		return c.readCost.quick()
	case cmdWrite:
		return req.flags&cmdFlagFUA == 0 && c.writeCost.quick()
	}
	return false
}

// readPayload reserves memory for a READ or WRITE and reads a WRITE's data;
// a refused WRITE's data is read and dropped.
func (c *conn) readPayload(req *request) error {
	if req.errno != 0 || (req.typ != cmdRead && req.typ != cmdWrite) {
		if req.typ == cmdWrite {
			return c.skip(int64(req.length))
		}
		return nil
	}
	c.reserve(req, int64(req.length))
	req.buf = c.srv.getBuffer(int(req.length))
	if req.typ == cmdWrite {
		if err := c.readPayloadData(*req.buf); err != nil {
			return fmt.Errorf("read write payload: %w", err)
		}
	}
	return nil
}

// readPayloadData fills p with a WRITE's data: what the read buffer holds of
// it, then the rest straight from the stream into p, in as few reads as the
// client's sending allows.
func (c *conn) readPayloadData(p []byte) error {
	n := min(c.r.Buffered(), len(p))
	if n > 0 {
		if _, err := io.ReadFull(c.r, p[:n]); err != nil {
			return err
		}
	}
	if n == len(p) {
		return nil
	}
	if c.rawTCP != nil && len(p)-n >= lowatMinPayload {
		return c.readPayloadRest(p[n:])
	}
	_, err := c.readFullFrom(c.stream, p[n:], false)
	return err
}

// lowatMinPayload is the least rest of a WRITE's payload that is read with a
// receive low-water mark, and payloadLowat the most the mark asks for.
const (
	lowatMinPayload = 64 << 10
	payloadLowat    = 256 << 10
)

// readPayloadRest fills p, the rest of a WRITE's payload, from the TCP
// socket. Before each wait for data it sets SO_RCVLOWAT to what is still
// missing, up to payloadLowat, so that the reader is woken once per that
// many bytes rather than for every segment: measured with fio's 1 MiB
// sequential writes over loopback, that is 3 to 7% more throughput for 10 to
// 15% less CPU per GiB (test/bench/README.md). The mark never exceeds what the
// client must still send, so it cannot wait for data that will not come (and
// the kernel wakes the reader anyway when its receive window closes or the
// client shuts the connection down); it is put back to 1 before the next
// request's header is read.
func (c *conn) readPayloadRest(p []byte) error {
	_, err := c.readFullFrom((*tcpPayloadReader)(c), p, false)
	if c.lowat != 1 {
		c.recvErr = nil
		if cerr := c.rawTCP.Control(c.resetLowatFd); cerr != nil {
			c.recvErr = cerr
		}
		if c.recvErr != nil {
			// A mark left up could keep the next request waiting.
			return errors.Join(err, c.recvErr)
		}
	}
	return err
}

// resetLowat puts the socket's SO_RCVLOWAT back to 1, recording a failure
// in recvErr.
func (c *conn) resetLowat(fd uintptr) {
	if err := c.setLowat(int(fd), 1); err != nil {
		c.recvErr = os.NewSyscallError("setsockopt SO_RCVLOWAT", err)
		return
	}
	c.lowat = 1
}

// tcpPayloadReader reads a payload's rest from the connection's TCP socket
// (see readPayloadRest); it is the conn itself, so that handing it to
// readFullFrom allocates nothing.
type tcpPayloadReader conn

// Read reads what has arrived of p, waiting for at least min(len(p),
// payloadLowat) bytes when nothing has.
func (r *tcpPayloadReader) Read(p []byte) (int, error) {
	c := (*conn)(r)
	c.recvDst, c.recvN, c.recvErr = p, 0, nil
	err := c.rawTCP.Read(c.recvFd)
	c.recvDst = nil
	if err != nil {
		return c.recvN, err
	}
	return c.recvN, c.recvErr
}

// recvTo is tcpPayloadReader.Read's work on the socket's descriptor: false
// asks to be called again once the socket is readable.
func (c *conn) recvTo(fd uintptr) bool {
	for {
		n, err := unix.Read(int(fd), c.recvDst)
		switch {
		case err == nil && n == 0:
			c.recvErr = io.EOF
			return true
		case err == nil:
			c.recvN = n
			return true
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			want := min(len(c.recvDst), payloadLowat)
			if want != c.lowat && !c.noLowat {
				if err := c.setLowat(int(fd), want); err == nil {
					c.lowat = want
				} else {
					// Refused: wait without a mark, as on
					// other sockets, from now on. A mark
					// set before may ask for more than is
					// still to come, so it goes first.
					c.noLowat = true
					if c.lowat != 1 {
						if err := c.setLowat(int(fd), 1); err != nil {
							c.recvErr = os.NewSyscallError("setsockopt SO_RCVLOWAT", err)
							return true
						}
						c.lowat = 1
					}
				}
			}
			return false
		default:
			c.recvErr = os.NewSyscallError("read", err)
			return true
		}
	}
}

// readFull fills p. During shutdown the reader's deadline has passed: if
// mayStop and nothing of p has arrived it reports stopped, otherwise the
// deadline is lifted so that the request in progress is read whole.
func (c *conn) readFull(p []byte, mayStop bool) (stopped bool, err error) {
	return c.readFullFrom(c.r, p, mayStop)
}

// readFullFrom is readFull from src, which is c.r or the stream under it.
func (c *conn) readFullFrom(src io.Reader, p []byte, mayStop bool) (stopped bool, err error) {
	n := 0
	for n < len(p) {
		m, err := io.ReadFull(src, p[n:])
		n += m
		if err == nil {
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) && c.shutting.Load() {
			if n == 0 && mayStop {
				return true, nil
			}
			c.deadlineMu.Lock()
			_ = c.nc.SetReadDeadline(time.Time{})
			c.deadlineMu.Unlock()
			continue
		}
		if err == io.ErrUnexpectedEOF || (err == io.EOF && n > 0) {
			return false, fmt.Errorf("connection closed mid-request: %w", io.ErrUnexpectedEOF)
		}
		return false, err
	}
	return false, nil
}

// skip reads and drops n bytes of payload.
func (c *conn) skip(n int64) error {
	var scratch [4096]byte
	for n > 0 {
		chunk := scratch[:min(n, int64(len(scratch)))]
		if _, err := c.readFull(chunk, false); err != nil {
			return fmt.Errorf("skip refused payload: %w", err)
		}
		n -= int64(len(chunk))
	}
	return nil
}

// check decides the error a request gets without running it, 0 if none.
func (c *conn) check(req *request) uint32 {
	x := c.exp
	if req.flags&^cmdFlagsKnown != 0 {
		return errInval
	}
	if req.flags&(cmdFlagNoHole|cmdFlagFastZero) != 0 && req.typ != cmdWriteZeroes {
		return errInval
	}
	if req.flags&cmdFlagDF != 0 && (req.typ != cmdRead || !c.structured) {
		return errInval
	}
	if req.flags&cmdFlagReqOne != 0 && req.typ != cmdBlockStatus {
		return errInval
	}
	writes := false
	switch req.typ {
	case cmdRead, cmdCache:
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		writes = true
	case cmdFlush:
		return 0
	case cmdBlockStatus:
		if !c.structured || (!c.metaBaseAllocation && !c.metaExceptions) || req.length == 0 {
			return errInval
		}
	default:
		return errInval
	}
	if writes && x.ReadOnly {
		return errPerm
	}
	if (req.typ == cmdRead || req.typ == cmdWrite) && req.length > uint32(c.srv.opts.MaxPayload) {
		return errInval
	}
	size := uint64(x.Backend.Size())
	end := req.off + uint64(req.length)
	if end < req.off || end > size {
		if writes {
			return errNoSpc
		}
		return errInval
	}
	if mb := uint64(x.minBlock); mb > 1 && (req.off%mb != 0 || uint64(req.length)%mb != 0) {
		return errInval
	}
	return 0
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

// handle runs one request and answers it.
func (c *conn) handle(req *request) {
	if req.errno != 0 {
		c.replyError(req, req.errno)
		return
	}
	x := c.exp
	off := int64(req.off)
	length := int64(req.length)
	fua := req.flags&cmdFlagFUA != 0
	var err error
	switch req.typ {
	case cmdRead:
		data := (*req.buf)[:length]
		if length == 0 {
			c.replyRead(req, data)
			return
		}
		start := time.Now()
		err = x.Backend.ReadAt(c.ctx, data, off)
		c.readCost.record(time.Since(start))
		if err == nil {
			c.replyRead(req, data)
			return
		}
	case cmdWrite:
		if length > 0 {
			start := time.Now()
			err = x.Backend.WriteAt(c.ctx, (*req.buf)[:length], off, fua)
			if !fua {
				// FUA writes never run inline; their syncs
				// say nothing of the others.
				c.writeCost.record(time.Since(start))
			}
		}
	case cmdFlush:
		// Cleared before flushing: a write completing meanwhile marks
		// the connection dirty again for the flush at close.
		c.dirty.Store(false)
		if err = x.Backend.Flush(c.ctx); err != nil {
			c.dirty.Store(true)
		}
	case cmdTrim:
		if x.trimmer != nil && length > 0 {
			err = x.trimmer.Trim(c.ctx, off, length, fua)
		}
	case cmdWriteZeroes:
		if length > 0 {
			err = c.writeZeroes(req, off, length, fua)
		}
	case cmdCache:
		// A hint with nothing to prefetch into: the backends read
		// through the page cache or their own caches.
	case cmdBlockStatus:
		var reply []byte
		if reply, err = c.blockStatus(req, off, length); err == nil {
			c.send(reply[:structuredReplyHeaderSize], reply[structuredReplyHeaderSize:])
			return
		}
	}
	if req.typ == cmdWrite || req.typ == cmdTrim || req.typ == cmdWriteZeroes {
		c.dirty.Store(true)
	}
	if err != nil {
		c.srv.log.Debug("nbd request failed", "export", x.Name, "command", req.typ, "offset", off, "length", length, "err", err)
		c.replyError(req, replyErrno(err, req.typ != cmdRead && req.typ != cmdBlockStatus && req.typ != cmdCache))
		return
	}
	c.replySimple(req, 0)
}

// writeZeroes zeroes a range through the backend's Zeroer, or by writing
// zero-filled buffers when it has none (which is never fast).
func (c *conn) writeZeroes(req *request, off, length int64, fua bool) error {
	x := c.exp
	opts := ZeroOptions{
		NoHole: req.flags&cmdFlagNoHole != 0,
		Fast:   req.flags&cmdFlagFastZero != 0,
		FUA:    fua,
	}
	if x.zeroer != nil {
		return x.zeroer.WriteZeroes(c.ctx, off, length, opts)
	}
	if opts.Fast {
		return ErrZeroNotFast
	}
	chunk := int(min(length, int64(c.srv.opts.MaxPayload), zeroWriteChunk))
	buf := c.srv.getBuffer(chunk)
	defer c.srv.putBuffer(buf)
	zeroes := (*buf)[:chunk]
	clear(zeroes)
	for done := int64(0); done < length; {
		n := min(int64(len(zeroes)), length-done)
		if err := x.Backend.WriteAt(c.ctx, zeroes[:n], off+done, false); err != nil {
			return err
		}
		done += n
	}
	if fua {
		return x.Backend.Flush(c.ctx)
	}
	return nil
}

// maxExtentsPerReply bounds a block status reply; the client asks again for
// the rest.
const maxExtentsPerReply = 1 << 16

// statusExtent is one extent of a block status reply.
type statusExtent struct {
	length int64
	flags  uint32
}

// blockStatus builds the whole answer to a BLOCK_STATUS: one chunk per
// selected metadata context, the last flagged DONE.
func (c *conn) blockStatus(req *request, off, length int64) ([]byte, error) {
	type contextExtents struct {
		id      uint32
		extents []statusExtent
	}
	var answers []contextExtents
	if c.metaBaseAllocation {
		extents, err := c.allocationExtents(off, length)
		if err != nil {
			return nil, err
		}
		answers = append(answers, contextExtents{metaContextBaseAllocationID, extents})
	}
	if c.metaExceptions {
		extents, err := c.exceptionExtents(off, length)
		if err != nil {
			return nil, err
		}
		answers = append(answers, contextExtents{metaContextExceptionsID, extents})
	}
	limit := maxExtentsPerReply
	if req.flags&cmdFlagReqOne != 0 {
		limit = 1
	}
	var reply []byte
	for i, a := range answers {
		extents, err := c.clipExtents(a.extents, off, length, limit)
		if err != nil {
			return nil, err
		}
		var flags uint16
		if i == len(answers)-1 {
			flags = replyFlagDone
		}
		reply = binary.BigEndian.AppendUint32(reply, structuredReplyMagic)
		reply = binary.BigEndian.AppendUint16(reply, flags)
		reply = binary.BigEndian.AppendUint16(reply, replyTypeBlockStatus)
		reply = binary.BigEndian.AppendUint64(reply, req.cookie)
		reply = binary.BigEndian.AppendUint32(reply, uint32(4+8*len(extents)))
		reply = binary.BigEndian.AppendUint32(reply, a.id)
		for _, e := range extents {
			reply = binary.BigEndian.AppendUint32(reply, uint32(e.length))
			reply = binary.BigEndian.AppendUint32(reply, e.flags)
		}
	}
	return reply, nil
}

// allocationExtents returns the base:allocation extents from off.
func (c *conn) allocationExtents(off, length int64) ([]statusExtent, error) {
	if c.exp.extenter == nil {
		return []statusExtent{{length: length}}, nil
	}
	got, err := c.exp.extenter.Extents(c.ctx, off, length)
	if err != nil {
		return nil, err
	}
	out := make([]statusExtent, len(got))
	for i, e := range got {
		out[i].length = e.Length
		if e.Hole {
			out[i].flags |= 1
		}
		if e.Zero {
			out[i].flags |= 2
		}
	}
	return out, nil
}

// exceptionExtents returns the MetaContextExceptions extents from off.
func (c *conn) exceptionExtents(off, length int64) ([]statusExtent, error) {
	got, err := c.exp.cowMapper.COWExtents(c.ctx, off, length)
	if err != nil {
		return nil, err
	}
	out := make([]statusExtent, len(got))
	for i, e := range got {
		out[i].length = e.Length
		if e.InCOW {
			out[i].flags = COWExtentInCOW
		}
	}
	return out, nil
}

// clipExtents checks a backend's extents of [off, off+length) and clips them
// to the range and to limit extents.
func (c *conn) clipExtents(got []statusExtent, off, length int64, limit int) ([]statusExtent, error) {
	out := got[:0]
	remaining := length
	for _, e := range got {
		if remaining == 0 || len(out) == limit {
			break
		}
		if e.length <= 0 {
			return nil, fmt.Errorf("export %s: backend reported an extent of length %d at offset %d", c.exp.Name, e.length, off+length-remaining)
		}
		e.length = min(e.length, remaining)
		remaining -= e.length
		out = append(out, e)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("export %s: backend reported no extents at offset %d", c.exp.Name, off)
	}
	return out, nil
}

// replySimple sends a simple reply with no data.
func (c *conn) replySimple(req *request, errno uint32) {
	h := req.hdr[:simpleReplyHeaderSize]
	binary.BigEndian.PutUint32(h[0:], simpleReplyMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], req.cookie)
	c.send(h, nil)
}

// replyError answers a failed request: with an error chunk where structured
// replies are required (READ and BLOCK_STATUS once negotiated), else simply.
func (c *conn) replyError(req *request, errno uint32) {
	if !c.structured || (req.typ != cmdRead && req.typ != cmdBlockStatus) {
		c.replySimple(req, errno)
		return
	}
	h := req.hdr[:structuredReplyHeaderSize+6]
	c.putChunkHeader(h, req, replyTypeError, 6)
	binary.BigEndian.PutUint32(h[structuredReplyHeaderSize:], errno)
	binary.BigEndian.PutUint16(h[structuredReplyHeaderSize+4:], 0) // no message
	c.send(h, nil)
}

// replyRead sends the data of a successful READ: one OFFSET_DATA chunk with
// structured replies (which also honours DF), a simple reply otherwise.
func (c *conn) replyRead(req *request, data []byte) {
	if !c.structured {
		h := req.hdr[:simpleReplyHeaderSize]
		binary.BigEndian.PutUint32(h[0:], simpleReplyMagic)
		binary.BigEndian.PutUint32(h[4:], 0)
		binary.BigEndian.PutUint64(h[8:], req.cookie)
		c.send(h, data)
		return
	}
	if len(data) == 0 {
		h := req.hdr[:structuredReplyHeaderSize]
		c.putChunkHeader(h, req, replyTypeNone, 0)
		c.send(h, nil)
		return
	}
	h := req.hdr[:structuredReplyHeaderSize+8]
	c.putChunkHeader(h, req, replyTypeOffsetData, uint32(8+len(data)))
	binary.BigEndian.PutUint64(h[structuredReplyHeaderSize:], req.off)
	c.send(h, data)
}

// putChunkHeader fills a final structured reply chunk header.
func (c *conn) putChunkHeader(h []byte, req *request, typ uint16, length uint32) {
	binary.BigEndian.PutUint32(h[0:], structuredReplyMagic)
	binary.BigEndian.PutUint16(h[4:], replyFlagDone)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], req.cookie)
	binary.BigEndian.PutUint32(h[16:], length)
}

// send writes one reply. Replies are gathered in tx and the last writer of a
// burst writes them, so replies that finish together share a write; a reply
// that does not fit goes out at once with what is gathered (its payload is
// not copied: see writeLarge).
func (c *conn) send(hdr, data []byte) {
	c.writers.Add(1)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.writeErr == nil {
		if len(c.tx)+len(hdr)+len(data) <= cap(c.tx) {
			c.tx = append(c.tx, hdr...)
			c.tx = append(c.tx, data...)
		} else {
			// The header joins what is gathered where it fits,
			// which saves a TLS layer a record of its own.
			if len(c.tx)+len(hdr) <= cap(c.tx) {
				c.tx = append(c.tx, hdr...)
				hdr = nil
			}
			c.writeErr = c.writeLarge(hdr, data)
			c.tx = c.tx[:0]
		}
	}
	c.doneWriting()
}

// writeLarge writes what is gathered in tx, then hdr (if any) and data, a
// payload too large to gather. Over a unix socket or TLS that is one writev.
// On a TCP socket the bytes before the payload go out with MSG_MORE and the
// payload with a write of its own: with a congestion control that has the
// kernel pace the socket (BBR), one writev of the same bytes left most of
// the payload's segments to be sent from the socket's backlog (a quarter of
// the server's CPU under __sk_flush_backlog in perf, against under 1% this
// way), and fio's 1 MiB sequential reads over loopback came out at 0.72 of
// nbdkit's throughput instead of 1.2 (test/bench/README.md). With cubic the
// two ways measured alike. wmu is held.
func (c *conn) writeLarge(hdr, data []byte) error {
	if c.rawTCP == nil || c.noMore {
		c.iov = [3][]byte{c.tx, hdr, data}
		c.iovs = c.iov[:]
		_, err := c.iovs.WriteTo(c.stream)
		c.iov = [3][]byte{}
		return err
	}
	c.moreSent = 0
	for _, p := range [2][]byte{c.tx, hdr} {
		if err := c.sendMore(p); err != nil {
			if c.moreSent == 0 && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)) {
				// Nothing went out: write it all the plain way,
				// now and from now on.
				c.noMore = true
				return c.writeLarge(hdr, data)
			}
			return err
		}
	}
	_, err := c.stream.Write(data)
	return err
}

// sendmsgMore is sendmsg(2) of p with flags, as conn.sendmsg.
func sendmsgMore(fd int, p []byte, flags int) (int, error) {
	return unix.SendmsgN(fd, p, nil, nil, flags)
}

// setRcvLowat is setsockopt(2) of SO_RCVLOWAT, as conn.setLowat.
func setRcvLowat(fd, bytes int) error {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, bytes)
}

// findRawTCP sets rawTCP when requests and replies go straight through a
// TCP socket.
func (c *conn) findRawTCP() {
	if tc, ok := c.stream.(*net.TCPConn); ok {
		if rc, err := tc.SyscallConn(); err == nil {
			c.rawTCP = rc
			c.sendMoreFd = c.sendMoreTo
			c.recvFd = c.recvTo
			c.resetLowatFd = c.resetLowat
			c.lowat = 1
			c.sendmsg = sendmsgMore
			c.setLowat = setRcvLowat
		}
	}
}

// sendMore writes p to the TCP socket with MSG_MORE: the kernel holds a
// partial segment back for the write that follows. wmu is held.
func (c *conn) sendMore(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	c.more, c.moreErr = p, nil
	err := c.rawTCP.Write(c.sendMoreFd)
	c.more = nil
	if err != nil {
		return err
	}
	return c.moreErr
}

// sendMoreTo is sendMore's work on the socket's descriptor: false asks to be
// called again once the socket is writable.
func (c *conn) sendMoreTo(fd uintptr) bool {
	for len(c.more) > 0 {
		n, err := c.sendmsg(int(fd), c.more, unix.MSG_MORE|unix.MSG_NOSIGNAL)
		switch err {
		case nil:
			c.more = c.more[n:]
			c.moreSent += n
		case unix.EINTR:
		case unix.EAGAIN:
			return false
		default:
			c.moreErr = os.NewSyscallError("sendmsg", err)
			return true
		}
	}
	return true
}

// holdReplies keeps the replies gathered in tx from being written until
// releaseReplies. The reader holds them while it runs requests inline and the
// next request is already buffered, so that its replies, like those of
// workers that finish together, share a write; it lets them go before it
// waits for the client.
func (c *conn) holdReplies() { c.writers.Add(1) }

// releaseReplies ends holdReplies, writing what is gathered unless a worker
// is about to.
func (c *conn) releaseReplies() {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.doneWriting()
}

// doneWriting ends one writer's turn, the last one writing what is gathered.
// A failed write kills the connection. wmu is held.
func (c *conn) doneWriting() {
	if c.writers.Add(-1) == 0 && c.writeErr == nil && len(c.tx) > 0 {
		_, c.writeErr = c.stream.Write(c.tx)
		c.tx = c.tx[:0]
	}
	if c.writeErr != nil {
		c.cancel()
	}
}
