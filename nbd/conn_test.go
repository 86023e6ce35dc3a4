package nbd

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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

// unixPair returns both ends of a connected unix socket.
func unixPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	// Socket paths are limited to ~108 bytes; t.TempDir can be longer.
	dir, err := os.MkdirTemp("", "nbdpair")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	l, err := net.Listen("unix", filepath.Join(dir, "pair.sock"))
	require.NoError(t, err)
	return acceptPair(t, l)
}

// acceptPair dials l, accepts that one connection and closes l: both ends
// of a connection on l's network.
func acceptPair(t *testing.T, l net.Listener) (client, server net.Conn) {
	t.Helper()
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	client, err := net.Dial(l.Addr().Network(), l.Addr().String())
	require.NoError(t, err)
	server = <-accepted
	require.NotNil(t, server)
	return client, server
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
