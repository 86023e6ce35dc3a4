package nbd

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Limits on option negotiation, so that a client cannot make the server
// buffer or loop without bound before it has picked an export.
const (
	// maxOptionLength is the largest option payload read into memory;
	// longer ones are skipped and refused with NBD_REP_ERR_TOO_BIG.
	maxOptionLength = 64 << 10
	// maxSkippedOptionLength is the largest option payload skipped; a
	// client sending more is closed on.
	maxSkippedOptionLength = 16 << 20
	// maxOptions bounds the options of one negotiation.
	maxOptions = 4096
	// maxStringLength is the protocol's limit on names and queries.
	maxStringLength = 4096
)

// errClientAborted reports a negotiation the client ended with NBD_OPT_ABORT
// or by closing; it is not a failure worth logging.
var errClientAborted = errors.New("client ended the negotiation")

// negotiate runs the fixed-newstyle handshake until the client picks an
// export (c.exp is then set) or the negotiation fails.
func (c *conn) negotiate() error {
	var greeting [18]byte
	binary.BigEndian.PutUint64(greeting[0:], nbdMagic)
	binary.BigEndian.PutUint64(greeting[8:], optionMagic)
	binary.BigEndian.PutUint16(greeting[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := c.w.Write(greeting[:]); err != nil {
		return fmt.Errorf("send greeting: %w", err)
	}
	if err := c.w.Flush(); err != nil {
		return fmt.Errorf("send greeting: %w", err)
	}
	var clientFlags [4]byte
	if _, err := io.ReadFull(c.r, clientFlags[:]); err != nil {
		return fmt.Errorf("read client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(clientFlags[:])
	if flags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 {
		return fmt.Errorf("client flags %#x: unknown flags", flags)
	}
	c.noZeroes = flags&clientFlagNoZeroes != 0

	var hdr [optionHeaderSize]byte
	data := make([]byte, 0, 256)
	for range maxOptions {
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			if err == io.EOF {
				return errClientAborted
			}
			return fmt.Errorf("read option header: %w", err)
		}
		if magic := binary.BigEndian.Uint64(hdr[0:]); magic != optionMagic {
			return fmt.Errorf("option header: bad magic %#x", magic)
		}
		opt := binary.BigEndian.Uint32(hdr[8:])
		length := binary.BigEndian.Uint32(hdr[12:])
		if length > maxOptionLength {
			if length > maxSkippedOptionLength {
				return fmt.Errorf("option %d: length %d is too large", opt, length)
			}
			if err := discard(c.r, int64(length)); err != nil {
				return fmt.Errorf("option %d: skip %d bytes: %w", opt, length, err)
			}
			if err := c.optionReply(opt, repErrTooBig, []byte("option too long")); err != nil {
				return err
			}
			continue
		}
		if cap(data) < int(length) {
			data = make([]byte, length)
		}
		data = data[:length]
		if _, err := io.ReadFull(c.r, data); err != nil {
			return fmt.Errorf("option %d: read %d bytes: %w", opt, length, err)
		}
		if c.srv.isClosing() {
			_ = c.optionReply(opt, repErrShutdown, []byte("server is shutting down"))
			return fmt.Errorf("option %d: server is shutting down", opt)
		}
		done, err := c.handleOption(opt, data)
		if err != nil || done {
			return err
		}
	}
	return fmt.Errorf("more than %d options", maxOptions)
}

// handleOption answers one option. done reports that transmission starts.
func (c *conn) handleOption(opt uint32, data []byte) (done bool, err error) {
	if c.srv.opts.TLSMode == TLSRequire && !c.tls {
		switch opt {
		case optStartTLS, optAbort:
		case optExportName:
			return false, fmt.Errorf("EXPORT_NAME %q before STARTTLS: TLS is required", data)
		default:
			return false, c.optionReply(opt, repErrTLSReqd, []byte("TLS is required: use STARTTLS"))
		}
	}
	switch opt {
	case optStartTLS:
		return false, c.optStartTLS(data)
	case optExportName:
		return true, c.optExportName(string(data))
	case optAbort:
		// The client may close without reading the ACK.
		_ = c.optionReply(opt, repAck, nil)
		return false, errClientAborted
	case optList:
		if len(data) != 0 {
			return false, c.optionReply(opt, repErrInvalid, []byte("LIST takes no data"))
		}
		for _, x := range c.srv.exportList() {
			payload := binary.BigEndian.AppendUint32(nil, uint32(len(x.Name)))
			payload = append(payload, x.Name...)
			payload = append(payload, x.Description...)
			if err := c.optionReplyNoFlush(opt, repServer, payload); err != nil {
				return false, err
			}
		}
		return false, c.optionReply(opt, repAck, nil)
	case optInfo, optGo:
		return c.optInfoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, c.optionReply(opt, repErrInvalid, []byte("STRUCTURED_REPLY takes no data"))
		}
		c.structured = true
		return false, c.optionReply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return false, c.optMetaContext(opt, data)
	default:
		return false, c.optionReply(opt, repErrUnsup, nil)
	}
}

// optStartTLS upgrades the connection to TLS in place. The negotiation then
// carries on over TLS with everything agreed before it forgotten.
func (c *conn) optStartTLS(data []byte) error {
	switch {
	case c.srv.opts.TLSMode == TLSOff:
		return c.optionReply(optStartTLS, repErrUnsup, []byte("TLS is not configured"))
	case len(data) != 0:
		return c.optionReply(optStartTLS, repErrInvalid, []byte("STARTTLS takes no data"))
	case c.tls:
		return c.optionReply(optStartTLS, repErrInvalid, []byte("TLS is already negotiated"))
	}
	if err := c.optionReply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	// The client must wait for the ACK before its TLS hello, so nothing
	// can be buffered; anything that is would be lost to the TLS layer.
	if n := c.r.Buffered(); n > 0 {
		return fmt.Errorf("STARTTLS: client sent %d bytes before the TLS handshake", n)
	}
	tc := tls.Server(c.nc, c.srv.opts.TLS)
	if err := tc.HandshakeContext(c.ctx); err != nil {
		return fmt.Errorf("STARTTLS: TLS handshake: %w", err)
	}
	// c.nc stays the raw connection: deadlines and Close act on it, and
	// reach the TLS stream through it.
	c.stream = tc
	c.r.Reset(tc)
	c.w.Reset(tc)
	c.tls = true
	c.structured = false
	c.metaExport = nil
	c.metaBaseAllocation = false
	c.metaExceptions = false
	c.metaBitmaps = nil
	return nil
}

// optExportName ends the negotiation the old way; an unknown name can only be
// answered by closing.
func (c *conn) optExportName(name string) error {
	x := c.srv.bind(c, name)
	if x == nil {
		return fmt.Errorf("EXPORT_NAME: no export %q", name)
	}
	c.selectExport(x)
	var reply [10 + 124]byte
	binary.BigEndian.PutUint64(reply[0:], uint64(x.Backend.Size()))
	binary.BigEndian.PutUint16(reply[8:], c.transmissionFlags(x))
	out := reply[:]
	if c.noZeroes {
		out = reply[:10]
	}
	if _, err := c.w.Write(out); err != nil {
		return fmt.Errorf("EXPORT_NAME reply: %w", err)
	}
	return c.w.Flush()
}

// optInfoGo answers INFO and GO; GO with a known export starts transmission.
func (c *conn) optInfoGo(opt uint32, data []byte) (done bool, err error) {
	name, rest, ok := cutString(data)
	if !ok || len(rest) < 2 {
		return false, c.optionReply(opt, repErrInvalid, []byte("malformed request"))
	}
	nInfos := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*nInfos {
		return false, c.optionReply(opt, repErrInvalid, []byte("malformed information request list"))
	}
	var x *export
	if opt == optGo {
		x = c.srv.bind(c, name)
	} else {
		x = c.srv.lookup(name)
	}
	if x == nil {
		return false, c.optionReply(opt, repErrUnknown, []byte("no such export"))
	}
	var wantName, wantDescription bool
	for i := range nInfos {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDescription = true
		}
	}

	var info [12]byte
	binary.BigEndian.PutUint16(info[0:], infoExport)
	binary.BigEndian.PutUint64(info[2:], uint64(x.Backend.Size()))
	binary.BigEndian.PutUint16(info[10:], c.transmissionFlags(x))
	if err := c.optionReplyNoFlush(opt, repInfo, info[:]); err != nil {
		return false, err
	}
	var blockSize [14]byte
	binary.BigEndian.PutUint16(blockSize[0:], infoBlockSize)
	binary.BigEndian.PutUint32(blockSize[2:], uint32(x.minBlock))
	binary.BigEndian.PutUint32(blockSize[6:], uint32(max(4096, x.minBlock)))
	binary.BigEndian.PutUint32(blockSize[10:], uint32(c.srv.opts.MaxPayload))
	if err := c.optionReplyNoFlush(opt, repInfo, blockSize[:]); err != nil {
		return false, err
	}
	if wantName {
		payload := binary.BigEndian.AppendUint16(nil, infoName)
		payload = append(payload, x.Name...)
		if err := c.optionReplyNoFlush(opt, repInfo, payload); err != nil {
			return false, err
		}
	}
	if wantDescription && x.Description != "" {
		payload := binary.BigEndian.AppendUint16(nil, infoDescription)
		payload = append(payload, x.Description...)
		if err := c.optionReplyNoFlush(opt, repInfo, payload); err != nil {
			return false, err
		}
	}
	if err := c.optionReply(opt, repAck, nil); err != nil {
		return false, err
	}
	if opt == optGo {
		c.selectExport(x)
		return true, nil
	}
	return false, nil
}

// metaContext is a metadata context an export offers: its name, the bare
// namespaces a LIST query may name to match it, and (for a dirty bitmap)
// the bitmap's name.
type metaContext struct {
	name       string
	namespaces []string
	bitmap     string
}

// metaContexts returns the contexts x offers now: base:allocation, then
// MetaContextExceptions for a COWMapper, then a DirtyBitmapNamespace context
// per bitmap of a DirtyBitmapper (names a query could not carry, and empty
// ones, are left out).
func metaContexts(x *export) []metaContext {
	out := []metaContext{{name: metaContextBaseAllocation, namespaces: []string{"base:"}}}
	if x.cowMapper != nil {
		out = append(out, metaContext{name: MetaContextExceptions, namespaces: []string{"clustersnap:"}})
	}
	if x.dirtyBitmapper != nil {
		for _, b := range x.dirtyBitmapper.DirtyBitmaps() {
			name := DirtyBitmapNamespace + b
			if b == "" || len(name) > maxStringLength {
				continue
			}
			out = append(out, metaContext{name: name, namespaces: []string{"qemu:", DirtyBitmapNamespace}, bitmap: b})
		}
	}
	return out
}

// optMetaContext answers LIST_META_CONTEXT and SET_META_CONTEXT with the
// contexts of metaContexts. SET replaces the selection with the contexts
// named exactly, giving each an id not used before on the connection; LIST
// also takes a bare namespace ("base:", "clustersnap:", "qemu:",
// "qemu:dirty-bitmap:") and, with no query at all, lists every context of
// the export.
func (c *conn) optMetaContext(opt uint32, data []byte) error {
	if !c.structured {
		return c.optionReply(opt, repErrInvalid, []byte("structured replies not negotiated"))
	}
	name, rest, ok := cutString(data)
	if !ok || len(rest) < 4 {
		return c.optionReply(opt, repErrInvalid, []byte("malformed request"))
	}
	nQueries := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	queries := make(map[string]bool)
	for range nQueries {
		var q string
		q, rest, ok = cutString(rest)
		if !ok {
			return c.optionReply(opt, repErrInvalid, []byte("malformed query"))
		}
		queries[q] = true
	}
	if len(rest) != 0 {
		return c.optionReply(opt, repErrInvalid, []byte("trailing data"))
	}
	x := c.srv.lookup(name)
	if x == nil {
		return c.optionReply(opt, repErrUnknown, []byte("no such export"))
	}

	set := opt == optSetMetaContext
	if set {
		c.metaExport = x
		c.metaBaseAllocation = false
		c.metaExceptions = false
		c.metaBitmaps = nil
	}
	for _, ctx := range metaContexts(x) {
		matched := queries[ctx.name] || (!set && nQueries == 0)
		for _, ns := range ctx.namespaces {
			matched = matched || (!set && queries[ns])
		}
		if !matched {
			continue
		}
		id := uint32(0) // LIST replies carry no usable id
		if set {
			switch {
			case ctx.name == metaContextBaseAllocation:
				id = metaContextBaseAllocationID
				c.metaBaseAllocation = true
			case ctx.name == MetaContextExceptions:
				id = metaContextExceptionsID
				c.metaExceptions = true
			default:
				id = c.nextBitmapID
				c.nextBitmapID++
				c.metaBitmaps = append(c.metaBitmaps, selectedBitmap{name: ctx.bitmap, id: id})
			}
		}
		payload := binary.BigEndian.AppendUint32(nil, id)
		payload = append(payload, ctx.name...)
		if err := c.optionReplyNoFlush(opt, repMetaContext, payload); err != nil {
			return err
		}
	}
	return c.optionReply(opt, repAck, nil)
}

// selectExport enters transmission on x. Metadata contexts chosen for
// another export, or for an earlier export of the same name, do not carry
// over.
func (c *conn) selectExport(x *export) {
	c.exp = x
	if c.metaExport != x {
		c.metaBaseAllocation = false
		c.metaExceptions = false
		c.metaBitmaps = nil
	}
}

// transmissionFlags are the flags true of x on this connection.
func (c *conn) transmissionFlags(x *export) uint16 {
	flags := tflagHasFlags | tflagSendCache
	if c.structured {
		flags |= tflagSendDF
	}
	if x.ReadOnly {
		flags |= tflagReadOnly
	} else {
		flags |= tflagSendFlush | tflagSendFUA | tflagSendWriteZeroes | tflagSendFastZero
		if x.trimmer != nil {
			flags |= tflagSendTrim
		}
	}
	if x.MultiConn {
		flags |= tflagCanMultiConn
	}
	return flags
}

// optionReply sends an option reply and flushes it.
func (c *conn) optionReply(opt, typ uint32, payload []byte) error {
	if err := c.optionReplyNoFlush(opt, typ, payload); err != nil {
		return err
	}
	if err := c.w.Flush(); err != nil {
		return fmt.Errorf("option %d reply: %w", opt, err)
	}
	return nil
}

// optionReplyNoFlush buffers an option reply; a final reply follows.
func (c *conn) optionReplyNoFlush(opt, typ uint32, payload []byte) error {
	var hdr [20]byte
	binary.BigEndian.PutUint64(hdr[0:], optionReplyMagic)
	binary.BigEndian.PutUint32(hdr[8:], opt)
	binary.BigEndian.PutUint32(hdr[12:], typ)
	binary.BigEndian.PutUint32(hdr[16:], uint32(len(payload)))
	if _, err := c.w.Write(hdr[:]); err != nil {
		return fmt.Errorf("option %d reply: %w", opt, err)
	}
	if _, err := c.w.Write(payload); err != nil {
		return fmt.Errorf("option %d reply: %w", opt, err)
	}
	return nil
}

// cutString splits a 32-bit length-prefixed string off data.
func cutString(data []byte) (s string, rest []byte, ok bool) {
	if len(data) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(data)
	if n > maxStringLength || uint64(n) > uint64(len(data)-4) {
		return "", nil, false
	}
	return string(data[4 : 4+n]), data[4+n:], true
}

// discard reads and drops n bytes from r.
func discard(r io.Reader, n int64) error {
	_, err := io.CopyN(io.Discard, r, n)
	return err
}
