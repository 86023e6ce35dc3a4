package clusterload

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/clustersnap/clustersnap/nbd"
)

// NBD transmission constants (the protocol's, simple replies only: the
// handshake of nbd.Negotiate asks for no structured replies).
const (
	nbdRequestMagic     = 0x25609513
	nbdSimpleReplyMagic = 0x67446698
	nbdCmdRead          = 0
	nbdCmdWrite         = 1
	nbdCmdDisc          = 2
	nbdCmdFlush         = 3
)

// Client is one NBD connection that sends one request at a time and
// waits for its reply, so that the caller knows exactly which requests
// the server acknowledged: a request whose reply did not arrive is in
// flight forever (it may or may not have happened).
type Client struct {
	conn   net.Conn
	size   uint64
	handle uint64
}

// Dial connects to export at addr on network ("tcp", "unix") and
// negotiates it.
func Dial(ctx context.Context, network, addr, export string) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd %s %s: %w", addr, export, err)
	}
	info, err := nbd.Negotiate(ctx, conn, export)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("nbd %s %s: %w", addr, export, err)
	}
	return &Client{conn: conn, size: info.Size}, nil
}

// ErrReply is a server's error reply to a request; every such error is a
// *ReplyError.
var ErrReply = errors.New("the server answered with an error")

// ReplyError is a server's error reply to one request: the errno it sent
// (the protocol's values, which are Linux's: 5 EIO, 108 ESHUTDOWN).
type ReplyError struct {
	Cmd   uint16
	Off   uint64
	Errno uint32
}

func (e *ReplyError) Error() string {
	return fmt.Sprintf("request %d at %d: %v (errno %d)", e.Cmd, e.Off, ErrReply, e.Errno)
}

// Is makes errors.Is(err, ErrReply) hold for every ReplyError.
func (e *ReplyError) Is(target error) bool { return target == ErrReply }

// Size is the export's size.
func (c *Client) Size() uint64 { return c.size }

// do sends one request and waits for its reply; data is the payload of a
// write, length the length of a read. ctx bounds the exchange. After any
// error but ErrReply the connection is unusable.
func (c *Client) do(ctx context.Context, cmd uint16, off uint64, length uint32, data []byte) ([]byte, error) {
	c.handle++
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Time{}
	}
	if err := c.conn.SetDeadline(deadline); err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Now()) })
	defer stop()
	req := make([]byte, 28, 28+len(data))
	binary.BigEndian.PutUint32(req[0:], nbdRequestMagic)
	binary.BigEndian.PutUint16(req[4:], 0)
	binary.BigEndian.PutUint16(req[6:], cmd)
	binary.BigEndian.PutUint64(req[8:], c.handle)
	binary.BigEndian.PutUint64(req[16:], off)
	binary.BigEndian.PutUint32(req[24:], length)
	req = append(req, data...)
	if _, err := c.conn.Write(req); err != nil {
		return nil, fmt.Errorf("send request %d: %w", cmd, err)
	}
	var hdr [16]byte
	if _, err := io.ReadFull(c.conn, hdr[:]); err != nil {
		return nil, fmt.Errorf("read reply to request %d: %w", cmd, err)
	}
	if binary.BigEndian.Uint32(hdr[0:]) != nbdSimpleReplyMagic || binary.BigEndian.Uint64(hdr[8:]) != c.handle {
		return nil, fmt.Errorf("reply to request %d: bad magic or handle", cmd)
	}
	if e := binary.BigEndian.Uint32(hdr[4:]); e != 0 {
		return nil, &ReplyError{Cmd: cmd, Off: off, Errno: e}
	}
	if cmd != nbdCmdRead {
		return nil, nil
	}
	buf := make([]byte, length)
	if _, err := io.ReadFull(c.conn, buf); err != nil {
		return nil, fmt.Errorf("read %d bytes at %d: %w", length, off, err)
	}
	return buf, nil
}

// Write writes data at off and waits for the reply.
func (c *Client) Write(ctx context.Context, off uint64, data []byte) error {
	_, err := c.do(ctx, nbdCmdWrite, off, uint32(len(data)), data)
	return err
}

// Read reads length bytes at off.
func (c *Client) Read(ctx context.Context, off uint64, length uint32) ([]byte, error) {
	return c.do(ctx, nbdCmdRead, off, length, nil)
}

// Flush asks the server to make durable every write it acknowledged
// before the flush.
func (c *Client) Flush(ctx context.Context) error {
	_, err := c.do(ctx, nbdCmdFlush, 0, 0, nil)
	return err
}

// Close says goodbye (NBD_CMD_DISC, no reply) and closes the connection.
func (c *Client) Close() error {
	var req [28]byte
	binary.BigEndian.PutUint32(req[0:], nbdRequestMagic)
	binary.BigEndian.PutUint16(req[6:], nbdCmdDisc)
	_ = c.conn.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = c.conn.Write(req[:])
	return c.conn.Close()
}
