package nbd

import "encoding/binary"

// replySimple sends a simple reply with no data.
func (c *conn) replySimple(req *request, errno uint32) {
	h := req.hdr[:simpleReplyHeaderSize]
	binary.BigEndian.PutUint32(h[0:], simpleReplyMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], req.cookie)
	c.send(h, nil)
}

// replyError answers a failed request, and counts it: with an error chunk
// where structured replies are required (READ and BLOCK_STATUS once
// negotiated), else simply.
func (c *conn) replyError(req *request, errno uint32) {
	c.counters.errors.Add(1)
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
// payload too large to gather: through the connection's tcpSocket where
// there is one, otherwise (a unix socket, TLS, or a socket refusing the
// tuning) with one writev. wmu is held.
func (c *conn) writeLarge(hdr, data []byte) error {
	if c.tcp != nil {
		if done, err := c.tcp.writeLarge(c.tx, hdr, data); done {
			return err
		}
	}
	c.iov = [3][]byte{c.tx, hdr, data}
	c.iovs = c.iov[:]
	_, err := c.iovs.WriteTo(c.stream)
	c.iov = [3][]byte{}
	return err
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
