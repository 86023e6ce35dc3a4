package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"time"
)

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
		var why string
		req.errno, why = c.check(req)
		if req.errno != 0 {
			c.log.Debug("nbd request refused", "cmd", req.typ, "flags", req.flags, "offset", req.off, "length", req.length, "errno", req.errno, "reason", why)
		}
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
	if c.tcp != nil {
		if done, err := c.tcp.readPayload(c, p[n:]); done {
			return err
		}
	}
	_, err := c.readFullFrom(c.stream, p[n:], false)
	return err
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
