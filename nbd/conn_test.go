package nbd

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// gatedWriteBackend is a memBackend whose WRITEs at gatedOffset wait for gate.
type gatedWriteBackend struct {
	*memBackend
	gatedOffset int64
	entered     chan struct{}
	gate        chan struct{}
}

func (g *gatedWriteBackend) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if off == g.gatedOffset {
		g.entered <- struct{}{}
		select {
		case <-g.gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return g.memBackend.WriteAt(ctx, p, off, fua)
}

// onlyConn returns the server's one connection.
func onlyConn(t *testing.T, srv *Server) *conn {
	t.Helper()
	srv.mu.Lock()
	defer srv.mu.Unlock()
	require.Len(t, srv.conns, 1)
	for c := range srv.conns {
		return c
	}
	return nil
}

// makeQuick records quick requests in e until they run inline, and returns
// how many it took.
func makeQuick(t *testing.T, e *costEstimate) int {
	t.Helper()
	n := 0
	for ; n < 100 && !e.quick(); n++ {
		e.record(inlineLimit / 10)
	}
	require.True(t, e.quick())
	return n
}

func TestInlinePolicy(t *testing.T) {
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	c := newConn(context.Background(), NewServer(nil, Options{}), server)
	read := &request{typ: cmdRead}
	write := &request{typ: cmdWrite}
	assert.False(t, c.runsInline(read), "a new connection hands READs to workers")
	assert.False(t, c.runsInline(write), "a new connection hands WRITEs to workers")

	assert.Greater(t, makeQuick(t, &c.readCost), 3, "it takes a run of quick READs to run them inline")
	assert.True(t, c.runsInline(read))
	assert.False(t, c.runsInline(write), "READs and WRITEs are judged apart")
	makeQuick(t, &c.writeCost)
	assert.True(t, c.runsInline(write))
	assert.False(t, c.runsInline(&request{typ: cmdWrite, flags: cmdFlagFUA}), "a FUA write waits for the disk")
	assert.False(t, c.runsInline(&request{typ: cmdRead, errno: errInval}), "refused requests are answered by workers")
	for _, typ := range []uint16{cmdFlush, cmdTrim, cmdWriteZeroes, cmdCache, cmdBlockStatus} {
		assert.False(t, c.runsInline(&request{typ: typ}), "command %d", typ)
	}

	c.writeCost.record(2 * inlineLimit)
	assert.False(t, c.runsInline(write), "one slow WRITE hands WRITEs back to workers")
	assert.True(t, c.runsInline(read))
	c.writeCost.record(inlineLimit / 10)
	assert.False(t, c.runsInline(write), "one quick WRITE is not enough to come back")
	assert.Greater(t, makeQuick(t, &c.writeCost), 3, "coming back takes a run of quick WRITEs")
}

func TestSlowWritesAreOvertaken(t *testing.T) {
	backend := &gatedWriteBackend{
		memBackend:  newMemBackend(1 << 20),
		gatedOffset: 8192,
		entered:     make(chan struct{}, 1),
		gate:        make(chan struct{}),
	}
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{})
	rc := transmitting(t, srv, "disk", false)
	// As if this connection's WRITEs had been quick and then one slow.
	c := onlyConn(t, srv)
	makeQuick(t, &c.writeCost)
	c.writeCost.record(10 * inlineLimit)

	rc.sendRequest(0, cmdWrite, 1, 8192, 4, []byte("slow")) // blocks in the backend
	<-backend.entered
	rc.sendRequest(0, cmdWrite, 2, 0, 4, []byte("fast"))
	errno, cookie := rc.readSimpleReply()
	assert.Equal(t, uint32(0), errno)
	assert.Equal(t, uint64(2), cookie, "the second write overtakes the blocked one")
	rc.sendRequest(0, cmdRead, 3, 0, 4, nil)
	errno, cookie = rc.readSimpleReply()
	assert.Equal(t, uint32(0), errno)
	assert.Equal(t, uint64(3), cookie, "the read overtakes the blocked write")
	got := make([]byte, 4)
	rc.read(got)
	assert.Equal(t, "fast", string(got))

	close(backend.gate)
	errno, cookie = rc.readSimpleReply()
	assert.Equal(t, uint32(0), errno)
	assert.Equal(t, uint64(1), cookie)
	rc.sendRequest(0, cmdRead, 4, 8192, 4, nil)
	errno, cookie = rc.readSimpleReply()
	require.Equal(t, uint32(0), errno)
	require.Equal(t, uint64(4), cookie)
	rc.read(got)
	assert.Equal(t, "slow", string(got))
}

func TestLargePayloadsAroundTheBuffers(t *testing.T) {
	for _, structured := range []bool{false, true} {
		name := "simple"
		if structured {
			name = "structured"
		}
		t.Run(name, func(t *testing.T) {
			srv := NewServer([]Export{{Name: "disk", Backend: newMemBackend(1 << 20)}}, Options{})
			rc := transmitting(t, srv, "disk", structured)

			// More than the read buffer holds, sent with its header in one
			// write: part of it arrives buffered, the rest is read directly.
			big := make([]byte, 3*connBufferSize+5)
			_, err := rand.Read(big)
			require.NoError(t, err)
			rc.sendRequest(0, cmdWrite, 1, 100, uint32(len(big)), big)
			errno, cookie := rc.readSimpleReply()
			require.Equal(t, uint32(0), errno)
			require.Equal(t, uint64(1), cookie)

			// Small and large reads in one burst: small replies are
			// gathered, large ones written beside them.
			type want struct {
				off  uint64
				data []byte
			}
			wants := map[uint64]want{}
			var burst []byte
			for i, r := range []struct{ off, length int }{
				{100, 512}, {100, len(big)}, {200, 1}, {100 + connBufferSize, connBufferSize}, {0, 0}, {1000, 3000},
			} {
				cookie := uint64(10 + i)
				burst = append(burst, encodeRequest(0, cmdRead, cookie, uint64(r.off), uint32(r.length))...)
				data := make([]byte, r.length)
				copy(data, big[max(r.off-100, 0):])
				if r.off < 100 {
					clear(data) // before the write: zeroes
				}
				wants[cookie] = want{uint64(r.off), data}
			}
			rc.write(burst)
			for range len(wants) {
				var cookie uint64
				var data []byte
				if structured {
					c := rc.readChunk()
					cookie = c.cookie
					w, ok := wants[cookie]
					require.True(t, ok, "unexpected cookie %d", cookie)
					if len(w.data) == 0 {
						assert.Equal(t, replyTypeNone, c.typ)
						assert.Empty(t, c.payload)
					} else {
						require.Equal(t, replyTypeOffsetData, c.typ)
						require.Len(t, c.payload, 8+len(w.data))
						data = c.payload[8:]
					}
					assert.Equal(t, replyFlagDone, c.flags)
				} else {
					var errno uint32
					errno, cookie = rc.readSimpleReply()
					require.Equal(t, uint32(0), errno)
					w, ok := wants[cookie]
					require.True(t, ok, "unexpected cookie %d", cookie)
					data = make([]byte, len(w.data))
					rc.read(data)
				}
				w := wants[cookie]
				assert.Equal(t, len(w.data), len(data), "cookie %d", cookie)
				assert.True(t, len(w.data) == 0 || string(w.data) == string(data), "cookie %d: data at offset %d differs", cookie, w.off)
				delete(wants, cookie)
			}
			assert.Zero(t, len(wants), "replies missing")
		})
	}
}

func TestInlineWriteDuringShutdown(t *testing.T) {
	backend := &gatedWriteBackend{
		memBackend:  newMemBackend(1 << 20),
		gatedOffset: 0,
		entered:     make(chan struct{}, 1),
		gate:        make(chan struct{}),
	}
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{})
	rc := transmitting(t, srv, "disk", false)
	c := onlyConn(t, srv)
	makeQuick(t, &c.writeCost)
	rc.sendRequest(0, cmdWrite, 1, 0, 4, []byte("data")) // run by the reader, which it holds up
	<-backend.entered
	c.beginShutdown()
	close(backend.gate)
	errno, cookie := rc.readSimpleReply()
	assert.Equal(t, uint32(0), errno, "the write in progress completes")
	assert.Equal(t, uint64(1), cookie)
	rc.requireClosed()
	require.NoError(t, srv.Shutdown(context.Background()))
	backend.mu.Lock()
	defer backend.mu.Unlock()
	assert.Equal(t, 1, backend.flushes, "the written export is flushed at close")
	assert.Equal(t, "data", string(backend.data[:4]))
}

func TestQuickReadsRunInline(t *testing.T) {
	backend := newGatedBackend(1<<20, 4096)
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{})
	rc := transmitting(t, srv, "disk", false)
	makeQuick(t, &onlyConn(t, srv).readCost)

	rc.sendRequest(0, cmdRead, 1, 4096, 512, nil) // run by the reader, which it holds up
	<-backend.entered
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		rc.sendRequest(0, cmdRead, 2, 0, 512, nil)
	}()
	close(backend.gate)
	for _, want := range []uint64{1, 2} {
		errno, cookie := rc.readSimpleReply()
		assert.Equal(t, uint32(0), errno)
		assert.Equal(t, want, cookie, "the reader answers the inline READ before reading the next request")
		rc.read(make([]byte, 512))
	}
	<-sent
}

func TestInlineRepliesShareAWrite(t *testing.T) {
	backend := newMemBackend(1 << 20)
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{})
	rc := transmitting(t, srv, "disk", false)
	makeQuick(t, &onlyConn(t, srv).readCost)

	const reads, length = 8, 512
	var burst []byte
	for i := range reads {
		burst = append(burst, encodeRequest(0, cmdRead, uint64(i), uint64(i)*length, length)...)
	}
	rc.write(burst)
	// net.Pipe hands over one write per read at most: a single read that
	// returns every reply shows the reader wrote them together.
	got := make([]byte, 2*reads*(simpleReplyHeaderSize+length))
	n, err := rc.conn.Read(got)
	require.NoError(t, err)
	assert.Equal(t, reads*(simpleReplyHeaderSize+length), n, "the replies to a burst of inline READs share one write")
}

// unixPair returns both ends of a connected unix socket pair.
func unixPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		conns[i], err = net.FileConn(f)
		f.Close()
		require.NoError(t, err)
	}
	return conns[0], conns[1]
}

// transmittingUnix is transmitting over a unix socket pair, which unlike
// net.Pipe buffers what the client writes.
func transmittingUnix(t *testing.T, srv *Server) *rawClient {
	t.Helper()
	client, server := unixPair(t)
	rc := &rawClient{t: t, conn: client, served: make(chan struct{})}
	go func() {
		defer close(rc.served)
		srv.ServeConn(context.Background(), server)
	}()
	t.Cleanup(func() {
		client.Close()
		<-rc.served
	})
	var greeting [18]byte
	rc.read(greeting[:])
	require.Equal(t, nbdMagic, binary.BigEndian.Uint64(greeting[0:]))
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	rc.goExport("disk")
	return rc
}

func TestShutdownMidPayloadOverSocket(t *testing.T) {
	backend := newMemBackend(8 << 20)
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{})
	rc := transmittingUnix(t, srv)
	payload := make([]byte, 4<<20)
	_, err := rand.Read(payload)
	require.NoError(t, err)
	req := append(encodeRequest(0, cmdWrite, 7, 4096, uint32(len(payload))), payload...)
	// The socket buffers a few hundred KiB at most: once this write
	// returns, the server has read the header and is reading the payload.
	rc.write(req[:2<<20])
	onlyConn(t, srv).beginShutdown()
	rc.write(req[2<<20:])
	errno, cookie := rc.readSimpleReply()
	assert.Equal(t, uint32(0), errno, "the request in progress is read whole and run")
	assert.Equal(t, uint64(7), cookie)
	rc.requireClosed()
	require.NoError(t, srv.Shutdown(context.Background()))
	backend.mu.Lock()
	defer backend.mu.Unlock()
	assert.True(t, string(payload) == string(backend.data[4096:4096+len(payload)]), "the payload was written")
}

// tcpPair returns the two ends of a loopback TCP connection, closed when the
// test ends.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	l, err := netListen(t)
	require.NoError(t, err)
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	server = <-accepted
	require.NotNil(t, server)
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
	c.findRawTCP()
	require.NotNil(t, c.rawTCP, "a plain TCP connection writes and reads its socket directly")
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
	assert.Equal(t, 1, c.lowat)
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
	c.sendmsg = func(int, []byte, int) (int, error) {
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
	assert.True(t, c.noMore)
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
			c.setLowat = func(fd, bytes int) error {
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
			assert.True(t, c.noLowat)
			assert.LessOrEqual(t, soRcvLowat(t, c.nc), 1, "no mark is left up")
		})
	}
}
