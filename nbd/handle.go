package nbd

import (
	"fmt"
	"time"
)

// check decides the error a request gets without running it, 0 if none,
// and why, for the debug log.
func (c *conn) check(req *request) (uint32, string) {
	x := c.exp
	if req.flags&^cmdFlagsKnown != 0 {
		return errInval, "unknown flags"
	}
	if req.flags&(cmdFlagNoHole|cmdFlagFastZero) != 0 && req.typ != cmdWriteZeroes {
		return errInval, "NO_HOLE or FAST_ZERO on a command other than WRITE_ZEROES"
	}
	if req.flags&cmdFlagDF != 0 && (req.typ != cmdRead || !c.structured) {
		return errInval, "DF on a command other than a structured READ"
	}
	if req.flags&cmdFlagReqOne != 0 && req.typ != cmdBlockStatus {
		return errInval, "REQ_ONE on a command other than BLOCK_STATUS"
	}
	writes := false
	switch req.typ {
	case cmdRead, cmdCache:
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		writes = true
	case cmdFlush:
		return 0, ""
	case cmdBlockStatus:
		if !c.structured || (!c.metaBaseAllocation && !c.metaExceptions && len(c.metaBitmaps) == 0) || req.length == 0 {
			return errInval, "BLOCK_STATUS without structured replies, a negotiated meta context, or a length"
		}
	default:
		return errInval, "unknown command"
	}
	if writes && x.ReadOnly {
		return errPerm, "a write to a read-only export"
	}
	if (req.typ == cmdRead || req.typ == cmdWrite) && req.length > uint32(c.srv.opts.MaxPayload) {
		return errInval, fmt.Sprintf("length over the maximum payload of %d bytes", c.srv.opts.MaxPayload)
	}
	size := uint64(x.Backend.Size())
	end := req.off + uint64(req.length)
	if end < req.off || end > size {
		if writes {
			return errNoSpc, fmt.Sprintf("a write past the export's end (%d bytes)", size)
		}
		return errInval, fmt.Sprintf("past the export's end (%d bytes)", size)
	}
	if mb := uint64(x.minBlock); mb > 1 && (req.off%mb != 0 || uint64(req.length)%mb != 0) {
		return errInval, fmt.Sprintf("not aligned to the export's minimum block of %d bytes", mb)
	}
	return 0, ""
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
			c.counters.countSuccess(req.typ, 0)
			c.replyRead(req, data)
			return
		}
		start := time.Now()
		err = x.Backend.ReadAt(c.ctx, data, off)
		c.readCost.record(time.Since(start))
		if err == nil {
			c.counters.countSuccess(req.typ, length)
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
			c.counters.countSuccess(req.typ, length)
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
	c.counters.countSuccess(req.typ, length)
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
