package nbd

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// tcpSocket is a connection's TCP socket, used directly where Linux socket
// options make a difference: replies too large to gather go out with
// MSG_MORE (writeLarge) and large payloads are read with a receive low-water
// mark (readPayload). A socket that refuses either option is used without
// it from then on, the way other sockets are.
//
// The reader alone uses the receiving half; the sending half is used under
// the connection's wmu.
type tcpSocket struct {
	tc  *net.TCPConn
	raw syscall.RawConn
	// sendMoreFd, recvFd and resetLowatFd are the functions handed to
	// raw's Write, Read and Control, made once so that a request allocates
	// nothing; more, moreSent, moreErr, recvDst, recvN and recvErr are
	// their arguments and results, and lowat the socket's SO_RCVLOWAT.
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
	// (an old kernel's MPTCP may). sendmsg and setLowat are the system
	// calls, replaced in tests.
	noMore   bool
	noLowat  bool
	sendmsg  func(fd int, p []byte, flags int) (int, error)
	setLowat func(fd, bytes int) error
}

// newTCPSocket returns the TCP socket that stream is, or nil when stream is
// something else (a unix socket, a TLS layer, a pipe).
func newTCPSocket(stream io.ReadWriter) *tcpSocket {
	tc, ok := stream.(*net.TCPConn)
	if !ok {
		return nil
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return nil
	}
	t := &tcpSocket{
		tc:       tc,
		raw:      raw,
		lowat:    1,
		sendmsg:  sendmsgMore,
		setLowat: setRcvLowat,
	}
	t.sendMoreFd = t.sendMoreTo
	t.recvFd = t.recvTo
	t.resetLowatFd = t.resetLowat
	return t
}

// sendmsgMore is sendmsg(2) of p with flags, as tcpSocket.sendmsg.
func sendmsgMore(fd int, p []byte, flags int) (int, error) {
	return unix.SendmsgN(fd, p, nil, nil, flags)
}

// setRcvLowat is setsockopt(2) of SO_RCVLOWAT, as tcpSocket.setLowat.
func setRcvLowat(fd, bytes int) error {
	return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, bytes)
}

// lowatMinPayload is the least rest of a WRITE's payload that is read with a
// receive low-water mark, and payloadLowat the most the mark asks for.
const (
	lowatMinPayload = 64 << 10
	payloadLowat    = 256 << 10
)

// readPayload fills p, the rest of a WRITE's payload, from the socket, if p
// is long enough to be worth a low-water mark; done is false when it is not
// and nothing was read. Before each wait for data it sets SO_RCVLOWAT to what
// is still missing, up to payloadLowat, so that the reader is woken once per
// that many bytes rather than for every segment, which saves CPU and gains
// throughput on large sequential writes (test/bench/README.md). The mark
// never exceeds what the client must still send, so it cannot wait for data
// that will not come (and the kernel wakes the reader anyway when its
// receive window closes or the client shuts the connection down); it is put
// back to 1 before the next request's header is read.
func (t *tcpSocket) readPayload(c *conn, p []byte) (done bool, err error) {
	if len(p) < lowatMinPayload {
		return false, nil
	}
	_, err = c.readFullFrom(t, p, false)
	if t.lowat != 1 {
		t.recvErr = nil
		if cerr := t.raw.Control(t.resetLowatFd); cerr != nil {
			t.recvErr = cerr
		}
		if t.recvErr != nil {
			// A mark left up could keep the next request waiting.
			return true, errors.Join(err, t.recvErr)
		}
	}
	return true, err
}

// resetLowat puts the socket's SO_RCVLOWAT back to 1, recording a failure
// in recvErr.
func (t *tcpSocket) resetLowat(fd uintptr) {
	if err := t.setLowat(int(fd), 1); err != nil {
		t.recvErr = os.NewSyscallError("setsockopt SO_RCVLOWAT", err)
		return
	}
	t.lowat = 1
}

// Read reads what has arrived of p, waiting for at least min(len(p),
// payloadLowat) bytes when nothing has.
func (t *tcpSocket) Read(p []byte) (int, error) {
	t.recvDst, t.recvN, t.recvErr = p, 0, nil
	err := t.raw.Read(t.recvFd)
	t.recvDst = nil
	if err != nil {
		return t.recvN, err
	}
	return t.recvN, t.recvErr
}

// recvTo is Read's work on the socket's descriptor: false asks to be called
// again once the socket is readable.
func (t *tcpSocket) recvTo(fd uintptr) bool {
	for {
		n, err := unix.Read(int(fd), t.recvDst)
		switch {
		case err == nil && n == 0:
			t.recvErr = io.EOF
			return true
		case err == nil:
			t.recvN = n
			return true
		case err == unix.EINTR:
		case err == unix.EAGAIN:
			want := min(len(t.recvDst), payloadLowat)
			if want != t.lowat && !t.noLowat {
				if err := t.setLowat(int(fd), want); err == nil {
					t.lowat = want
				} else {
					// Refused: wait without a mark, as on
					// other sockets, from now on. A mark
					// set before may ask for more than is
					// still to come, so it goes first.
					t.noLowat = true
					if t.lowat != 1 {
						if err := t.setLowat(int(fd), 1); err != nil {
							t.recvErr = os.NewSyscallError("setsockopt SO_RCVLOWAT", err)
							return true
						}
						t.lowat = 1
					}
				}
			}
			return false
		default:
			t.recvErr = os.NewSyscallError("read", err)
			return true
		}
	}
}

// writeLarge writes tx and hdr with MSG_MORE, then data with a write of its
// own; done is false when the socket refused MSG_MORE before anything went
// out, and the caller writes it all the portable way. With a congestion
// control that has the kernel pace the socket (BBR), one writev of the same
// bytes leaves most of the payload's segments to be sent from the socket's
// backlog, at a high CPU cost (test/bench/README.md); with cubic the two ways
// perform alike. The connection's wmu is held.
func (t *tcpSocket) writeLarge(tx, hdr, data []byte) (done bool, err error) {
	if t.noMore {
		return false, nil
	}
	t.moreSent = 0
	for _, p := range [2][]byte{tx, hdr} {
		if err := t.sendMore(p); err != nil {
			if t.moreSent == 0 && (errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)) {
				// Nothing went out: the caller writes it all,
				// now and from now on.
				t.noMore = true
				return false, nil
			}
			return true, err
		}
	}
	_, err = t.tc.Write(data)
	return true, err
}

// sendMore writes p to the socket with MSG_MORE: the kernel holds a partial
// segment back for the write that follows.
func (t *tcpSocket) sendMore(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	t.more, t.moreErr = p, nil
	err := t.raw.Write(t.sendMoreFd)
	t.more = nil
	if err != nil {
		return err
	}
	return t.moreErr
}

// sendMoreTo is sendMore's work on the socket's descriptor: false asks to be
// called again once the socket is writable.
func (t *tcpSocket) sendMoreTo(fd uintptr) bool {
	for len(t.more) > 0 {
		n, err := t.sendmsg(int(fd), t.more, unix.MSG_MORE|unix.MSG_NOSIGNAL)
		switch err {
		case nil:
			t.more = t.more[n:]
			t.moreSent += n
		case unix.EINTR:
		case unix.EAGAIN:
			return false
		default:
			t.moreErr = os.NewSyscallError("sendmsg", err)
			return true
		}
	}
	return true
}
