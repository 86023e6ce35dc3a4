package nbd

import (
	"context"
	"errors"
	"net"
	"os"
	"time"
)

// ServeStdio serves a single client on the process's standard input and
// output, as an inetd service or a private server started by
// `nbdinfo -- [ snapd ... ]`, `nbdcopy -- [ ... ]` or qemu's nbd+unix
// command URIs. in and out are usually os.Stdin and os.Stdout; the log must
// then go elsewhere (stderr), since stdout carries the protocol. It returns
// when the client disconnects, like ServeConn, and closes in and out.
//
// When in and out are the same socket (libnbd and inetd pass one socket as
// both), it is served as a network connection. Otherwise in and out are used
// as two pipes, switched to non-blocking mode so that Shutdown and ctx can
// interrupt them.
func (s *Server) ServeStdio(ctx context.Context, in, out *os.File) error {
	if sameFile(in, out) {
		if nc, err := net.FileConn(in); err == nil {
			// FileConn made a duplicate; the originals are closed
			// now so that only nc holds the connection open.
			in.Close()
			out.Close()
			s.ServeConn(ctx, nc)
			return nil
		}
	}
	pc, err := newPipeConn(in, out)
	if err != nil {
		return err
	}
	s.ServeConn(ctx, pc)
	return nil
}

// sameFile reports whether a and b are the same open file (stdin and stdout
// both being one socket).
func sameFile(a, b *os.File) bool {
	ai, err := a.Stat()
	if err != nil {
		return false
	}
	bi, err := b.Stat()
	return err == nil && os.SameFile(ai, bi)
}

// pipeConn is a net.Conn made of a pipe to read and a pipe to write.
type pipeConn struct {
	in, out *os.File
}

// newPipeConn takes over in and out (closing them), using non-blocking
// duplicates whose deadlines and Close interrupt blocked calls.
func newPipeConn(in, out *os.File) (*pipeConn, error) {
	pin, err := nonblockingDup(in)
	if err != nil {
		return nil, err
	}
	pout, err := nonblockingDup(out)
	if err != nil {
		pin.Close()
		return nil, err
	}
	in.Close()
	out.Close()
	return &pipeConn{in: pin, out: pout}, nil
}

// Read reads from the input pipe.
func (p *pipeConn) Read(b []byte) (int, error) { return p.in.Read(b) }

// Write writes to the output pipe.
func (p *pipeConn) Write(b []byte) (int, error) { return p.out.Write(b) }

// Close closes both pipes.
func (p *pipeConn) Close() error { return errors.Join(p.in.Close(), p.out.Close()) }

// LocalAddr names the connection "stdio".
func (p *pipeConn) LocalAddr() net.Addr { return stdioAddr{} }

// RemoteAddr names the connection "stdio".
func (p *pipeConn) RemoteAddr() net.Addr { return stdioAddr{} }

// SetDeadline sets both pipes' deadlines.
func (p *pipeConn) SetDeadline(t time.Time) error {
	return errors.Join(p.in.SetReadDeadline(t), p.out.SetWriteDeadline(t))
}

// SetReadDeadline sets the input pipe's deadline.
func (p *pipeConn) SetReadDeadline(t time.Time) error { return p.in.SetReadDeadline(t) }

// SetWriteDeadline sets the output pipe's deadline.
func (p *pipeConn) SetWriteDeadline(t time.Time) error { return p.out.SetWriteDeadline(t) }

// stdioAddr is the address of a stdio connection.
type stdioAddr struct{}

// Network returns "stdio".
func (stdioAddr) Network() string { return "stdio" }

// String returns "stdio".
func (stdioAddr) String() string { return "stdio" }
