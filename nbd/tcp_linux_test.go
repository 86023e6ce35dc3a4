package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// tcpPair returns the two ends of a loopback TCP connection, closed when the
// test ends.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	l, err := netListen(t)
	require.NoError(t, err)
	client, server = acceptPair(t, l)
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	return client, server
}

// tcpConn returns the client end of a loopback TCP connection and a conn
// on the server end, ready to send replies and read payloads.
func tcpConn(t *testing.T) (net.Conn, *conn) {
	t.Helper()
	client, server := tcpPair(t)
	c := newConn(context.Background(), NewServer(nil, Options{}), server)
	c.tx = make([]byte, 0, connBufferSize)
	c.tcp = newTCPSocket(c.stream)
	require.NotNil(t, c.tcp, "a plain TCP connection writes and reads its socket directly")
	// A reply that never comes fails the test instead of hanging it.
	require.NoError(t, client.SetReadDeadline(time.Now().Add(30*time.Second)))
	return client, c
}

// requireLargeReply has c send a reply of hdr and data with what tx holds
// gathered, and requires the client to read exactly those bytes, in that
// order, and the send to succeed.
func requireLargeReply(t *testing.T, client net.Conn, c *conn, hdr, data []byte) {
	t.Helper()
	want := append(append(append([]byte(nil), c.tx...), hdr...), data...)
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		c.send(hdr, data)
	}()
	got := make([]byte, len(want))
	_, err := io.ReadFull(client, got)
	require.NoError(t, err)
	<-sent
	require.NoError(t, c.writeErr)
	assert.True(t, bytes.Equal(want, got), "the client reads the gathered replies, the header and the payload, in order")
}

// TestLargeRepliesOverTCP sends replies too large to gather over TCP, where
// writeLarge sends what is gathered and the header with MSG_MORE and then
// the payload: the client must get exactly the gathered bytes, the header
// and the payload, in that order, whether the header fits beside the
// gathered replies or not.
func TestLargeRepliesOverTCP(t *testing.T) {
	client, c := tcpConn(t)

	hdr := make([]byte, structuredReplyHeaderSize+8)
	data := make([]byte, 1<<20)
	for _, gathered := range []int{0, 100, connBufferSize - len(hdr), connBufferSize - len(hdr) + 1, connBufferSize} {
		t.Run(fmt.Sprint(gathered), func(t *testing.T) {
			fill := byte(gathered)
			c.tx = c.tx[:gathered]
			for i := range c.tx {
				c.tx[i] = fill + byte(i)
			}
			for i := range hdr {
				hdr[i] = ^byte(i) + fill
			}
			for i := range data {
				data[i] = byte(i*7) + fill
			}
			requireLargeReply(t, client, c, hdr, data)
			assert.Empty(t, c.tx, "what was gathered went out with the reply")
		})
	}
}

// TestLargeReplyToClosedTCPPeer checks that a large reply to a client that
// has gone fails the connection with the socket's error, without a panic or
// a SIGPIPE.
func TestLargeReplyToClosedTCPPeer(t *testing.T) {
	client, c := tcpConn(t)
	require.NoError(t, client.(*net.TCPConn).SetLinger(0)) // close with a reset
	require.NoError(t, client.Close())

	hdr := make([]byte, structuredReplyHeaderSize+8)
	data := make([]byte, 1<<20)
	// The reset may arrive after the first reply is queued; a later one
	// sees it.
	for range 100 {
		c.tx = append(c.tx[:0], "gathered"...)
		c.send(hdr, data)
		if c.writeErr != nil {
			break
		}
	}
	require.Error(t, c.writeErr)
	assert.True(t, errors.Is(c.writeErr, syscall.ECONNRESET) || errors.Is(c.writeErr, syscall.EPIPE), "got %v", c.writeErr)
	assert.Error(t, c.ctx.Err(), "a failed reply closes the connection")
}

// soRcvLowat reads the socket option under a TCP connection.
func soRcvLowat(t *testing.T, nc net.Conn) int {
	t.Helper()
	rc, err := nc.(*net.TCPConn).SyscallConn()
	require.NoError(t, err)
	var v int
	var gerr error
	require.NoError(t, rc.Control(func(fd uintptr) {
		v, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVLOWAT)
	}))
	require.NoError(t, gerr)
	return v
}

// readPayloadInPieces has c read a 1 MiB payload of random bytes that the
// client sends in pieces of the given sizes and then the rest, calling
// between(i, sent) after piece i; it requires the read to end without error
// (within 10 s: a reader left waiting fails the test) and the payload to
// arrive whole.
func readPayloadInPieces(t *testing.T, client net.Conn, c *conn, pieces []int, between func(i, sent int)) {
	t.Helper()
	payload := make([]byte, 1<<20)
	_, err := rand.Read(payload)
	require.NoError(t, err)
	got := make([]byte, len(payload))
	read := make(chan error, 1)
	go func() { read <- c.readPayloadData(got) }()
	sent := 0
	for i, piece := range pieces {
		_, err := client.Write(payload[sent : sent+piece])
		require.NoError(t, err)
		sent += piece
		between(i, sent)
	}
	_, err = client.Write(payload[sent:])
	require.NoError(t, err)
	select {
	case err := <-read:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the reader still waits with the whole payload sent")
	}
	assert.True(t, bytes.Equal(payload, got), "the payload arrives whole")
}

// TestPayloadLowWaterMarkOverTCP reads a WRITE's payload that arrives in
// pieces over TCP: while the reader waits, the socket's low-water mark asks
// for what is still missing, up to payloadLowat, never more; the payload
// arrives whole; and the mark is back to 1 before the next request is read.
func TestPayloadLowWaterMarkOverTCP(t *testing.T) {
	client, c := tcpConn(t)
	// Each piece is at least the mark, so it wakes the reader, and leaves
	// it waiting for the rest: the mark it then sets is the rest, capped
	// (256 KiB after the first piece, 124 KiB after the second).
	readPayloadInPieces(t, client, c, []int{100 << 10, 800 << 10}, func(_, sent int) {
		want := min(1<<20-sent, payloadLowat)
		require.Eventually(t, func() bool { return soRcvLowat(t, c.nc) == want },
			10*time.Second, time.Millisecond, "mark while %d bytes are missing", 1<<20-sent)
	})
	assert.Equal(t, 1, soRcvLowat(t, c.nc), "the mark is back to 1 for the next request")
	assert.Equal(t, 1, c.tcp.lowat)
}

// TestPayloadCutShortOverTCP checks that a client closing in the middle of a
// payload, while the reader waits with a low-water mark above what it sent,
// ends the read with an error instead of leaving it waiting.
func TestPayloadCutShortOverTCP(t *testing.T) {
	client, c := tcpConn(t)
	server := c.nc
	got := make([]byte, 1<<20)
	read := make(chan error, 1)
	go func() { read <- c.readPayloadData(got) }()
	_, err := client.Write(make([]byte, 100<<10))
	require.NoError(t, err)
	require.Eventually(t, func() bool { return soRcvLowat(t, server) == payloadLowat },
		10*time.Second, time.Millisecond)
	require.NoError(t, client.Close())
	select {
	case err := <-read:
		assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
	case <-time.After(10 * time.Second):
		t.Fatal("the read still waits after the client closed")
	}
}

// TestLargeReplyWhereMSGMoreIsRefused checks that a socket refusing
// MSG_MORE (as an old kernel's MPTCP may) gets its large replies whole with
// a plain writev, that time and from then on.
func TestLargeReplyWhereMSGMoreIsRefused(t *testing.T) {
	client, c := tcpConn(t)
	refused := 0
	c.tcp.sendmsg = func(int, []byte, int) (int, error) {
		refused++
		return 0, unix.EOPNOTSUPP
	}
	hdr := []byte("reply header")
	data := bytes.Repeat([]byte("payload "), 1<<17)
	for round := range 2 {
		t.Logf("round %d", round)
		c.tx = append(c.tx[:0], "gathered replies"...)
		requireLargeReply(t, client, c, hdr, data)
	}
	assert.True(t, c.tcp.noMore)
	assert.Equal(t, 1, refused, "after one refusal MSG_MORE is not tried again")
}

// TestPayloadWhereLowWaterMarkIsRefused checks that a socket refusing
// SO_RCVLOWAT, at once or after a mark was set, still gets its payload read
// whole, and that a mark set before the refusal is taken down rather than
// left asking for more than is to come.
func TestPayloadWhereLowWaterMarkIsRefused(t *testing.T) {
	for _, failAfter := range []int{0, 1} {
		t.Run(fmt.Sprintf("after %d marks", failAfter), func(t *testing.T) {
			client, c := tcpConn(t)
			marks := 0
			refused := make(chan struct{}, 1)
			c.tcp.setLowat = func(fd, bytes int) error {
				if bytes != 1 {
					if marks == failAfter {
						select {
						case refused <- struct{}{}:
						default:
						}
						return unix.ENOPROTOOPT
					}
					marks++
				}
				return setRcvLowat(fd, bytes)
			}
			// Each piece leaves the reader waiting; piece failAfter
			// meets the refusal. A mark set before it must be taken
			// down: the rest, shorter than that mark, must still wake
			// the reader.
			readPayloadInPieces(t, client, c, []int{100 << 10, 800 << 10}, func(i, _ int) {
				switch {
				case i < failAfter:
					require.Eventually(t, func() bool { return soRcvLowat(t, c.nc) == payloadLowat },
						10*time.Second, time.Millisecond, "the mark after the first piece")
				case i == failAfter:
					select {
					case <-refused:
					case <-time.After(10 * time.Second):
						t.Fatal("the reader never tried a mark after piece", i)
					}
					if failAfter > 0 {
						require.Eventually(t, func() bool { return soRcvLowat(t, c.nc) == 1 },
							10*time.Second, time.Millisecond, "the mark taken down after the refusal")
					}
				}
			})
			assert.True(t, c.tcp.noLowat)
			assert.LessOrEqual(t, soRcvLowat(t, c.nc), 1, "no mark is left up")
		})
	}
}
