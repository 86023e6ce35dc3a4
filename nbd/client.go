package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"
)

// ExportInfo is what a server said about an export in the handshake.
type ExportInfo struct {
	// Size is the export size in bytes.
	Size uint64
	// Flags are the export's transmission flags (NBD_FLAG_*), as sent;
	// the kernel's nbd driver takes them as they are.
	Flags uint16
	// MinBlockSize and MaxBlockSize are the server's block size
	// constraints, zero when it sent none.
	MinBlockSize, MaxBlockSize uint32
}

// ReadOnly reports whether the server serves the export read-only.
func (i ExportInfo) ReadOnly() bool { return i.Flags&tflagReadOnly != 0 }

// CheckBlockSize reports whether the device can use blocks of size bs on
// the export: within the server's constraints and dividing the size.
func (i ExportInfo) CheckBlockSize(bs uint32) error {
	switch {
	case bs < 512 || bs > 4096 || bs&(bs-1) != 0:
		return fmt.Errorf("block size %d: want 512, 1024, 2048 or 4096", bs)
	case i.MinBlockSize != 0 && bs < i.MinBlockSize:
		return fmt.Errorf("needs a block size of at least %d", i.MinBlockSize)
	case i.MaxBlockSize != 0 && bs > i.MaxBlockSize:
		return fmt.Errorf("takes a block size of at most %d", i.MaxBlockSize)
	case i.Size%uint64(bs) != 0:
		return fmt.Errorf("its size %d is not a multiple of the block size %d", i.Size, bs)
	}
	return nil
}

// maxOptionReply bounds an option reply's payload a client reads: the
// handshake's replies are a few bytes, error messages a line.
const maxOptionReply = 64 << 10

// OptionError is a server's refusal of an option (an NBD_REP_ERR_* reply).
type OptionError struct {
	// Reply is the reply type, bit 31 set.
	Reply uint32
	// Message is the server's text, if it sent any.
	Message string
}

// Error names the refusal, and quotes the server when it said more.
func (e *OptionError) Error() string {
	reason := optionErrorReason(e.Reply)
	if e.Message != "" && e.Message != reason {
		reason += fmt.Sprintf(" (server: %q)", e.Message)
	}
	return reason
}

// optionErrorReason names an NBD_REP_ERR_* reply.
func optionErrorReason(typ uint32) string {
	switch typ {
	case repErrUnsup:
		return "option not supported by the server"
	case repErrPolicy:
		return "refused by the server's policy"
	case repErrInvalid:
		return "invalid request"
	case repErrPlatform:
		return "not supported on the server's platform"
	case repErrTLSReqd:
		return "the server requires TLS"
	case repErrUnknown:
		return "no such export"
	case repErrShutdown:
		return "the server is shutting down"
	case repErrBlockSizeReqd:
		return "the server requires block size negotiation"
	case repErrTooBig:
		return "request too big"
	}
	return fmt.Sprintf("error %#x", typ)
}

// Negotiate runs a client's fixed newstyle handshake on conn and selects
// export with NBD_OPT_GO, asking for the block size constraints (which tells
// the server that the client honours them). Transmission starts on conn
// right after it returns without error. It sends no other option: no TLS,
// no structured replies, as the kernel's nbd driver speaks neither.
//
// ctx bounds the handshake: its deadline becomes conn's, and its end
// interrupts a read or write in progress. conn's deadline is cleared on
// return. A refusal by the server is an *OptionError.
func Negotiate(ctx context.Context, conn net.Conn, export string) (ExportInfo, error) {
	if err := ctx.Err(); err != nil {
		return ExportInfo{}, err
	}
	deadline, hasDeadline := ctx.Deadline()
	if err := conn.SetDeadline(deadline); err != nil {
		return ExportInfo{}, err
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	info, err := negotiate(conn, export)
	stop()
	switch {
	case err == nil:
	case ctx.Err() != nil:
		err = fmt.Errorf("%w: %w", context.Cause(ctx), err)
	case hasDeadline && errors.Is(err, os.ErrDeadlineExceeded) && !time.Now().Before(deadline):
		// conn's deadline, which is ctx's, came before ctx's own timer.
		err = fmt.Errorf("%w: %w", context.DeadlineExceeded, err)
	}
	// Clearing fails only on a connection that is closed, which the
	// first request will say.
	_ = conn.SetDeadline(time.Time{})
	if err != nil {
		return ExportInfo{}, err
	}
	return info, nil
}

// negotiate is Negotiate's exchange on conn.
func negotiate(conn io.ReadWriter, export string) (ExportInfo, error) {
	var greeting [18]byte
	if _, err := io.ReadFull(conn, greeting[:]); err != nil {
		return ExportInfo{}, fmt.Errorf("read greeting: %w", err)
	}
	if binary.BigEndian.Uint64(greeting[0:]) != nbdMagic {
		return ExportInfo{}, errors.New("not an NBD server (bad greeting)")
	}
	switch binary.BigEndian.Uint64(greeting[8:]) {
	case optionMagic:
	case oldstyleMagic:
		return ExportInfo{}, errors.New("oldstyle NBD server without exports: use nbd-client")
	default:
		return ExportInfo{}, errors.New("not an NBD server (bad greeting)")
	}
	serverFlags := binary.BigEndian.Uint16(greeting[16:])
	if serverFlags&flagFixedNewstyle == 0 {
		return ExportInfo{}, errors.New("the server does not speak fixed newstyle NBD: use nbd-client")
	}
	clientFlags := clientFlagFixedNewstyle
	if serverFlags&flagNoZeroes != 0 {
		clientFlags |= clientFlagNoZeroes
	}

	var data []byte
	data = binary.BigEndian.AppendUint32(data, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, infoBlockSize)
	var msg []byte
	msg = binary.BigEndian.AppendUint32(msg, clientFlags)
	msg = binary.BigEndian.AppendUint64(msg, optionMagic)
	msg = binary.BigEndian.AppendUint32(msg, optGo)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := conn.Write(msg); err != nil {
		return ExportInfo{}, fmt.Errorf("send NBD_OPT_GO: %w", err)
	}

	var info ExportInfo
	gotExport := false
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(conn, hdr[:]); err != nil {
			return ExportInfo{}, fmt.Errorf("read the reply to NBD_OPT_GO: %w", err)
		}
		if binary.BigEndian.Uint64(hdr[0:]) != optionReplyMagic || binary.BigEndian.Uint32(hdr[8:]) != optGo {
			return ExportInfo{}, errors.New("malformed reply to NBD_OPT_GO")
		}
		typ, length := binary.BigEndian.Uint32(hdr[12:]), binary.BigEndian.Uint32(hdr[16:])
		if length > maxOptionReply {
			return ExportInfo{}, fmt.Errorf("reply to NBD_OPT_GO of %d bytes", length)
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(conn, payload); err != nil {
			return ExportInfo{}, fmt.Errorf("read the reply to NBD_OPT_GO: %w", err)
		}
		switch {
		case typ == repAck:
			if !gotExport {
				return ExportInfo{}, errors.New("the server sent no size for the export")
			}
			return info, nil
		case typ == repInfo && len(payload) >= 12 && binary.BigEndian.Uint16(payload) == infoExport:
			info.Size = binary.BigEndian.Uint64(payload[2:])
			info.Flags = binary.BigEndian.Uint16(payload[10:])
			gotExport = true
		case typ == repInfo && len(payload) >= 14 && binary.BigEndian.Uint16(payload) == infoBlockSize:
			info.MinBlockSize = binary.BigEndian.Uint32(payload[2:])
			info.MaxBlockSize = binary.BigEndian.Uint32(payload[10:])
		case typ == repInfo:
			// Information the client did not ask for: ignored, as the
			// protocol says.
		case typ&repErrBit != 0:
			// End the negotiation as the protocol asks, rather than
			// just closing; the server's answer does not matter.
			var abort []byte
			abort = binary.BigEndian.AppendUint64(abort, optionMagic)
			abort = binary.BigEndian.AppendUint32(abort, optAbort)
			abort = binary.BigEndian.AppendUint32(abort, 0)
			_, _ = conn.Write(abort)
			return ExportInfo{}, &OptionError{Reply: typ, Message: strings.TrimSpace(string(bytes.ToValidUTF8(payload, nil)))}
		default:
			return ExportInfo{}, fmt.Errorf("unexpected reply %d to NBD_OPT_GO", typ)
		}
	}
}
