package nbd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// listenFDsStart is the first file descriptor systemd passes (SD_LISTEN_FDS_START).
const listenFDsStart = 3

// ListenersFromEnv returns the listening sockets passed by systemd socket
// activation (or any launcher following its protocol, such as
// systemd-socket-activate or libnbd's interop harness): LISTEN_FDS
// descriptors from fd 3 on, when LISTEN_PID is this process. It returns nil
// and no error when no sockets were passed. LISTEN_PID, LISTEN_FDS and
// LISTEN_FDNAMES are unset either way, so that children do not inherit them.
// The descriptors are marked close-on-exec and handed over to the returned
// listeners, which the caller passes to Server.Serve.
func ListenersFromEnv() ([]net.Listener, error) {
	pidText, pidSet := os.LookupEnv("LISTEN_PID")
	fdsText, fdsSet := os.LookupEnv("LISTEN_FDS")
	os.Unsetenv("LISTEN_PID")
	os.Unsetenv("LISTEN_FDS")
	os.Unsetenv("LISTEN_FDNAMES")
	if !pidSet || !fdsSet {
		return nil, nil
	}
	pid, err := strconv.Atoi(pidText)
	if err != nil {
		return nil, fmt.Errorf("nbd: socket activation: LISTEN_PID %q: %w", pidText, err)
	}
	if pid != os.Getpid() {
		// Meant for another process (the variables leaked through a
		// parent that did not unset them).
		return nil, nil
	}
	n, err := strconv.Atoi(fdsText)
	if err != nil || n < 0 {
		return nil, fmt.Errorf("nbd: socket activation: LISTEN_FDS %q is not a count", fdsText)
	}
	if n == 0 {
		return nil, nil
	}
	listeners := make([]net.Listener, 0, n)
	for fd := listenFDsStart; fd < listenFDsStart+n; fd++ {
		closeOnExec(fd)
		f := os.NewFile(uintptr(fd), "LISTEN_FD_"+strconv.Itoa(fd))
		l, err := net.FileListener(f)
		// FileListener works on a duplicate; the original is ours to close.
		f.Close()
		if err != nil {
			for _, l := range listeners {
				l.Close()
			}
			return nil, fmt.Errorf("nbd: socket activation: fd %d: %w", fd, err)
		}
		listeners = append(listeners, l)
	}
	return listeners, nil
}

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
