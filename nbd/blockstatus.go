package nbd

import (
	"encoding/binary"
	"fmt"
)

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
	for _, b := range c.metaBitmaps {
		extents, err := c.dirtyExtents(b.name, off, length)
		if err != nil {
			return nil, err
		}
		answers = append(answers, contextExtents{b.id, extents})
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

// dirtyExtents returns the extents of the dirty bitmap called name from off.
func (c *conn) dirtyExtents(name string, off, length int64) ([]statusExtent, error) {
	got, err := c.exp.dirtyBitmapper.DirtyExtents(c.ctx, name, off, length)
	if err != nil {
		return nil, fmt.Errorf("export %s: dirty bitmap %s: %w", c.exp.Name, name, err)
	}
	out := make([]statusExtent, len(got))
	for i, e := range got {
		out[i].length = e.Length
		if e.Dirty {
			out[i].flags = DirtyExtentDirty
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
