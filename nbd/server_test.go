package nbd

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// gatedBackend is a memBackend whose reads at gatedOffset wait until the
// gate is opened (or their context ends), announcing themselves on entered.
type gatedBackend struct {
	*memBackend
	gatedOffset int64
	entered     chan struct{}
	gate        chan struct{}

	mu             sync.Mutex
	running, peak  int
	cancelledReads int
}

func newGatedBackend(size, gatedOffset int64) *gatedBackend {
	return &gatedBackend{
		memBackend:  newMemBackend(size),
		gatedOffset: gatedOffset,
		entered:     make(chan struct{}, 1024),
		gate:        make(chan struct{}),
	}
}

func (g *gatedBackend) ReadAt(ctx context.Context, p []byte, off int64) error {
	if off != g.gatedOffset && g.gatedOffset >= 0 {
		return g.memBackend.ReadAt(ctx, p, off)
	}
	g.mu.Lock()
	g.running++
	g.peak = max(g.peak, g.running)
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		g.running--
		g.mu.Unlock()
	}()
	g.entered <- struct{}{}
	select {
	case <-g.gate:
		return g.memBackend.ReadAt(ctx, p, off)
	case <-ctx.Done():
		g.mu.Lock()
		g.cancelledReads++
		g.mu.Unlock()
		return ctx.Err()
	}
}

// failingBackend fails every I/O with its error.
type failingBackend struct {
	size int64
	err  error
}

func (f failingBackend) Size() int64                                        { return f.size }
func (f failingBackend) ReadAt(context.Context, []byte, int64) error        { return f.err }
func (f failingBackend) WriteAt(context.Context, []byte, int64, bool) error { return f.err }
func (f failingBackend) Flush(context.Context) error                        { return f.err }

func TestNegotiationOptions(t *testing.T) {
	mem := newMemBackend(1 << 20)
	srv := NewServer([]Export{{Name: "disk", Description: "memory", Backend: mem}}, Options{})
	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)

	rc.sendOption(99, []byte("whatever"))
	typ, _ := rc.readOptionReply(99)
	assert.Equal(t, repErrUnsup, typ, "unknown option")

	rc.sendOption(optStartTLS, nil)
	typ, _ = rc.readOptionReply(optStartTLS)
	assert.Equal(t, repErrUnsup, typ, "STARTTLS")

	rc.sendOption(98, make([]byte, maxOptionLength+1))
	typ, _ = rc.readOptionReply(98)
	assert.Equal(t, repErrTooBig, typ, "oversized option")

	rc.sendOption(optInfo, []byte{0, 0, 0, 9, 'x'})
	typ, _ = rc.readOptionReply(optInfo)
	assert.Equal(t, repErrInvalid, typ, "name longer than the option")

	rc.sendOption(optInfo, append(infoRequest("disk"), 0))
	typ, _ = rc.readOptionReply(optInfo)
	assert.Equal(t, repErrInvalid, typ, "trailing byte")

	rc.sendOption(optGo, infoRequest("nope"))
	typ, _ = rc.readOptionReply(optGo)
	assert.Equal(t, repErrUnknown, typ, "missing export")

	rc.sendOption(optSetMetaContext, metaRequest("disk", metaContextBaseAllocation))
	typ, _ = rc.readOptionReply(optSetMetaContext)
	assert.Equal(t, repErrInvalid, typ, "meta context before structured replies")

	rc.sendOption(optList, []byte{1})
	typ, _ = rc.readOptionReply(optList)
	assert.Equal(t, repErrInvalid, typ, "LIST with data")

	rc.sendOption(optList, nil)
	typ, data := rc.readOptionReply(optList)
	require.Equal(t, repServer, typ)
	assert.Equal(t, append([]byte{0, 0, 0, 4}, "diskmemory"...), data, "name then description")
	typ, _ = rc.readOptionReply(optList)
	assert.Equal(t, repAck, typ)

	rc.sendOption(optStructuredReply, nil)
	typ, _ = rc.readOptionReply(optStructuredReply)
	require.Equal(t, repAck, typ)

	rc.sendOption(optListMetaContext, metaRequest("disk"))
	typ, data = rc.readOptionReply(optListMetaContext)
	require.Equal(t, repMetaContext, typ)
	assert.Equal(t, metaContextBaseAllocation, string(data[4:]))
	typ, _ = rc.readOptionReply(optListMetaContext)
	assert.Equal(t, repAck, typ)

	rc.sendOption(optSetMetaContext, metaRequest("disk", "qemu:dirty-bitmap:x", metaContextBaseAllocation))
	typ, data = rc.readOptionReply(optSetMetaContext)
	require.Equal(t, repMetaContext, typ)
	assert.Equal(t, metaContextBaseAllocationID, binary.BigEndian.Uint32(data))
	assert.Equal(t, metaContextBaseAllocation, string(data[4:]))
	typ, _ = rc.readOptionReply(optSetMetaContext)
	assert.Equal(t, repAck, typ)

	rc.sendOption(optInfo, infoRequest("disk", infoName, infoDescription, infoBlockSize))
	got := map[uint16][]byte{}
	for {
		typ, data = rc.readOptionReply(optInfo)
		if typ == repAck {
			break
		}
		require.Equal(t, repInfo, typ)
		got[binary.BigEndian.Uint16(data)] = data[2:]
	}
	assert.Equal(t, uint64(1<<20), binary.BigEndian.Uint64(got[infoExport]))
	assert.Equal(t, "disk", string(got[infoName]))
	assert.Equal(t, "memory", string(got[infoDescription]))
	assert.Equal(t, []uint32{1, 4096, DefaultMaxPayload}, []uint32{
		binary.BigEndian.Uint32(got[infoBlockSize][0:]),
		binary.BigEndian.Uint32(got[infoBlockSize][4:]),
		binary.BigEndian.Uint32(got[infoBlockSize][8:]),
	})

	size, flags := rc.goExport("disk")
	assert.Equal(t, uint64(1<<20), size)
	assert.Equal(t, tflagHasFlags|tflagSendFlush|tflagSendFUA|tflagSendTrim|tflagSendWriteZeroes|
		tflagSendDF|tflagSendCache|tflagSendFastZero, flags)

	// Transmission works, with structured replies and block status.
	rc.sendRequest(0, cmdWrite, 1, 0, 4, []byte("abcd"))
	errno, cookie := rc.readSimpleReply()
	assert.Equal(t, uint32(0), errno)
	assert.Equal(t, uint64(1), cookie)
	rc.sendRequest(cmdFlagDF, cmdRead, 2, 0, 4, nil)
	c := rc.readChunk()
	assert.Equal(t, chunk{flags: replyFlagDone, typ: replyTypeOffsetData, cookie: 2,
		payload: append(make([]byte, 8), "abcd"...)}, c)
	rc.sendRequest(0, cmdBlockStatus, 3, 0, 3*pageSize, nil)
	c = rc.readChunk()
	assert.Equal(t, replyTypeBlockStatus, c.typ)
	assert.Equal(t, []uint32{metaContextBaseAllocationID, pageSize, 0, 2 * pageSize, 3}, []uint32{
		binary.BigEndian.Uint32(c.payload[0:]), binary.BigEndian.Uint32(c.payload[4:]), binary.BigEndian.Uint32(c.payload[8:]),
		binary.BigEndian.Uint32(c.payload[12:]), binary.BigEndian.Uint32(c.payload[16:]),
	})
	rc.sendRequest(cmdFlagReqOne, cmdBlockStatus, 4, 0, 3*pageSize, nil)
	c = rc.readChunk()
	assert.Len(t, c.payload, 4+8, "REQ_ONE gives one extent")
	rc.sendRequest(0, cmdDisc, 5, 0, 0, nil)
	rc.requireClosed()
}

func TestNegotiationClosesConnection(t *testing.T) {
	srv := NewServer([]Export{{Name: "disk", Backend: newMemBackend(1 << 20)}}, Options{})
	cases := map[string]func(rc *rawClient){
		"unknown client flag": func(rc *rawClient) { rc.sendFlags(1 << 5) },
		"bad option magic": func(rc *rawClient) {
			rc.sendFlags(clientFlagFixedNewstyle)
			rc.write(make([]byte, optionHeaderSize))
		},
		"EXPORT_NAME of a missing export": func(rc *rawClient) {
			rc.sendFlags(clientFlagFixedNewstyle)
			rc.sendOption(optExportName, []byte("nope"))
		},
		"option too long to skip": func(rc *rawClient) {
			rc.sendFlags(clientFlagFixedNewstyle)
			msg := binary.BigEndian.AppendUint64(nil, optionMagic)
			msg = binary.BigEndian.AppendUint32(msg, 99)
			rc.write(binary.BigEndian.AppendUint32(msg, maxSkippedOptionLength+1))
		},
		"abort": func(rc *rawClient) {
			rc.sendFlags(clientFlagFixedNewstyle)
			rc.sendOption(optAbort, nil)
			typ, _ := rc.readOptionReply(optAbort)
			assert.Equal(t, repAck, typ)
		},
	}
	for name, send := range cases {
		t.Run(name, func(t *testing.T) {
			rc := dialRaw(t, srv)
			send(rc)
			rc.requireClosed()
		})
	}
}

func TestExportName(t *testing.T) {
	mem := newMemBackend(1 << 20)
	srv := NewServer([]Export{{Name: "disk", Backend: mem, ReadOnly: true, MultiConn: true}}, Options{})
	for _, noZeroes := range []bool{false, true} {
		rc := dialRaw(t, srv)
		flags := clientFlagFixedNewstyle
		if noZeroes {
			flags |= clientFlagNoZeroes
		}
		rc.sendFlags(flags)
		rc.sendOption(optExportName, []byte("disk"))
		var reply [10]byte
		rc.read(reply[:])
		assert.Equal(t, uint64(1<<20), binary.BigEndian.Uint64(reply[0:]))
		assert.Equal(t, tflagHasFlags|tflagReadOnly|tflagSendCache|tflagCanMultiConn, binary.BigEndian.Uint16(reply[8:]))
		if !noZeroes {
			var zeroes [124]byte
			rc.read(zeroes[:])
			assert.Equal(t, [124]byte{}, zeroes)
		}
		// Without structured replies, reads get simple replies.
		rc.sendRequest(0, cmdRead, 7, 0, 3, nil)
		errno, cookie := rc.readSimpleReply()
		require.Equal(t, uint32(0), errno)
		assert.Equal(t, uint64(7), cookie)
		data := make([]byte, 3)
		rc.read(data)
		assert.Equal(t, []byte{0, 0, 0}, data)
		rc.sendRequest(0, cmdDisc, 8, 0, 0, nil)
		rc.requireClosed()
	}
}

// transmitting returns a raw client in transmission on export name, with
// structured replies and base:allocation when structured is set.
func transmitting(t *testing.T, srv *Server, name string, structured bool) *rawClient {
	t.Helper()
	rc := dialRaw(t, srv)
	rc.sendFlags(clientFlagFixedNewstyle | clientFlagNoZeroes)
	if structured {
		rc.sendOption(optStructuredReply, nil)
		typ, _ := rc.readOptionReply(optStructuredReply)
		require.Equal(t, repAck, typ)
	}
	rc.goExport(name)
	return rc
}

func TestRequestErrorsKeepConnection(t *testing.T) {
	const size = 1 << 20
	srv := NewServer([]Export{
		{Name: "rw", Backend: newMemBackend(size)},
		{Name: "ro", Backend: newMemBackend(size), ReadOnly: true},
		{Name: "broken", Backend: failingBackend{size: size, err: errors.New("disk on fire")}},
	}, Options{MaxPayload: 64 << 10})

	type step struct {
		name    string
		export  string
		flags   uint16
		typ     uint16
		off     uint64
		length  uint32
		payload []byte
		errno   uint32
	}
	steps := []step{
		{"unknown command", "rw", 0, 42, 0, 512, nil, errInval},
		{"unknown flag", "rw", 1 << 9, cmdRead, 0, 512, nil, errInval},
		{"read past the end", "rw", 0, cmdRead, size, 512, nil, errInval},
		{"read wrapping around", "rw", 0, cmdRead, ^uint64(0) - 10, 512, nil, errInval},
		{"write past the end", "rw", 0, cmdWrite, size - 256, 512, make([]byte, 512), errNoSpc},
		{"zero past the end", "rw", 0, cmdWriteZeroes, size, 512, nil, errNoSpc},
		{"trim past the end", "rw", 0, cmdTrim, size, 512, nil, errNoSpc},
		{"oversize write", "rw", 0, cmdWrite, 0, 64<<10 + 1, make([]byte, 64<<10+1), errInval},
		{"oversize read", "rw", 0, cmdRead, 0, 64<<10 + 1, nil, errInval},
		{"oversize zero is fine", "rw", 0, cmdWriteZeroes, 0, 128 << 10, nil, 0},
		{"NO_HOLE on a write", "rw", cmdFlagNoHole, cmdWrite, 0, 4, []byte("abcd"), errInval},
		{"FAST_ZERO on a flush", "rw", cmdFlagFastZero, cmdFlush, 0, 0, nil, errInval},
		{"DF without structured replies", "rw", cmdFlagDF, cmdRead, 0, 4, nil, errInval},
		{"block status without a context", "rw", 0, cmdBlockStatus, 0, 4, nil, errInval},
		{"fast zero without a zeroer", "broken", cmdFlagFastZero, cmdWriteZeroes, 0, 4096, nil, errNotSup},
		{"zero-length write", "rw", 0, cmdWrite, 0, 0, nil, 0},
		{"flush", "rw", 0, cmdFlush, 0, 0, nil, 0},
		{"cache", "rw", 0, cmdCache, 0, 4096, nil, 0},
		{"write to read-only", "ro", cmdFlagFUA, cmdWrite, 0, 4, []byte("abcd"), errPerm},
		{"trim on read-only", "ro", 0, cmdTrim, 0, 4096, nil, errPerm},
		{"zero on read-only", "ro", 0, cmdWriteZeroes, 0, 4096, nil, errPerm},
		{"backend write error", "broken", 0, cmdWrite, 0, 4, []byte("abcd"), errIO},
		{"backend read error", "broken", 0, cmdRead, 0, 4, nil, errIO},
		{"backend flush error", "broken", 0, cmdFlush, 0, 0, nil, errIO},
		{"emulated zeroing error", "broken", 0, cmdWriteZeroes, 0, 4096, nil, errIO},
	}
	clients := map[string]*rawClient{}
	for _, name := range []string{"rw", "ro", "broken"} {
		clients[name] = transmitting(t, srv, name, false)
	}
	for i, s := range steps {
		rc := clients[s.export]
		rc.sendRequest(s.flags, s.typ, uint64(i), s.off, s.length, s.payload)
		errno, cookie := rc.readSimpleReply()
		assert.Equal(t, s.errno, errno, s.name)
		assert.Equal(t, uint64(i), cookie, s.name)
		// The connection is still in step: a valid read follows.
		rc.sendRequest(0, cmdRead, 1000, 0, 4, nil)
		errno, cookie = rc.readSimpleReply()
		require.Equal(t, uint64(1000), cookie, s.name)
		if s.export == "broken" {
			require.Equal(t, errIO, errno, s.name)
			continue
		}
		require.Equal(t, uint32(0), errno, s.name)
		rc.read(make([]byte, 4))
	}

	// With structured replies a failed read is an error chunk.
	rc := transmitting(t, srv, "broken", true)
	rc.sendRequest(0, cmdRead, 5, 0, 512, nil)
	c := rc.readChunk()
	assert.Equal(t, replyTypeError, c.typ)
	assert.Equal(t, replyFlagDone, c.flags)
	assert.Equal(t, uint64(5), c.cookie)
	assert.Equal(t, errIO, binary.BigEndian.Uint32(c.payload))
	rc.sendRequest(0, cmdRead, 6, 1<<20, 512, nil)
	c = rc.readChunk()
	assert.Equal(t, replyTypeError, c.typ)
	assert.Equal(t, errInval, binary.BigEndian.Uint32(c.payload))
	rc.sendRequest(0, cmdRead, 7, 0, 0, nil)
	c = rc.readChunk()
	assert.Equal(t, chunk{flags: replyFlagDone, typ: replyTypeNone, cookie: 7, payload: []byte{}}, c, "zero-length read")
}

func TestBadRequestMagicCloses(t *testing.T) {
	srv := NewServer([]Export{{Name: "disk", Backend: newMemBackend(1 << 20)}}, Options{})
	rc := transmitting(t, srv, "disk", false)
	bad := encodeRequest(0, cmdRead, 1, 0, 512)
	bad[0] ^= 0xff
	rc.write(bad)
	rc.requireClosed()
}

func TestPipeliningRepliesOutOfOrder(t *testing.T) {
	backend := newGatedBackend(1<<20, 0)
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{})
	rc := transmitting(t, srv, "disk", true)

	rc.sendRequest(0, cmdRead, 1, 0, 512, nil) // blocks in the backend
	<-backend.entered
	rc.sendRequest(0, cmdWrite, 2, 4096, 3, []byte("xyz"))
	errno, cookie := rc.readSimpleReply()
	assert.Equal(t, uint32(0), errno)
	assert.Equal(t, uint64(2), cookie, "the write overtakes the blocked read")
	rc.sendRequest(0, cmdRead, 3, 4096, 3, nil)
	c := rc.readChunk()
	assert.Equal(t, uint64(3), c.cookie)
	assert.Equal(t, "xyz", string(c.payload[8:]))

	close(backend.gate)
	c = rc.readChunk()
	assert.Equal(t, uint64(1), c.cookie)
	assert.Equal(t, replyTypeOffsetData, c.typ)
	assert.Len(t, c.payload, 8+512)
}

func TestInFlightBound(t *testing.T) {
	backend := newGatedBackend(1<<20, -1) // every read waits
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{MaxInFlight: 3})
	rc := transmitting(t, srv, "disk", false)
	const requests = 20
	sent := make(chan struct{})
	go func() {
		defer close(sent)
		for i := range requests {
			rc.sendRequest(0, cmdRead, uint64(i), uint64(i)*512, 512, nil)
		}
	}()
	for range 3 {
		<-backend.entered
	}
	close(backend.gate)
	seen := map[uint64]bool{}
	for range requests {
		errno, cookie := rc.readSimpleReply()
		require.Equal(t, uint32(0), errno)
		rc.read(make([]byte, 512))
		seen[cookie] = true
	}
	<-sent
	assert.Len(t, seen, requests)
	backend.mu.Lock()
	defer backend.mu.Unlock()
	assert.Equal(t, 3, backend.peak, "requests run concurrently, but no more than MaxInFlight")
}

func TestShutdownDrainsAndFlushes(t *testing.T) {
	backend := newGatedBackend(1<<20, 0)
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{})
	rc := transmitting(t, srv, "disk", false)
	idle := transmitting(t, srv, "disk", false)

	rc.sendRequest(0, cmdWrite, 1, 4096, 4, []byte("data"))
	errno, _ := rc.readSimpleReply()
	require.Equal(t, uint32(0), errno)
	rc.sendRequest(0, cmdRead, 2, 0, 512, nil)
	<-backend.entered

	shutdown := make(chan error, 1)
	go func() { shutdown <- srv.Shutdown(context.Background()) }()
	idle.requireClosed()
	select {
	case err := <-shutdown:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	default:
	}
	close(backend.gate)
	errno, cookie := rc.readSimpleReply()
	assert.Equal(t, uint32(0), errno)
	assert.Equal(t, uint64(2), cookie)
	rc.read(make([]byte, 512))
	rc.requireClosed()
	require.NoError(t, <-shutdown)
	backend.mu.Lock()
	defer backend.mu.Unlock()
	assert.Equal(t, 1, backend.flushes, "the written export is flushed at close")

	// A shut-down server refuses new connections.
	client, server := netPipe()
	srv.ServeConn(context.Background(), server)
	_, err := client.Read(make([]byte, 1))
	assert.Error(t, err)
}

func TestShutdownAnswersPartialRequestWithESHUTDOWN(t *testing.T) {
	srv := NewServer([]Export{{Name: "disk", Backend: newMemBackend(1 << 20)}}, Options{})
	rc := transmitting(t, srv, "disk", false)
	req := encodeRequest(0, cmdWrite, 9, 0, 4)
	rc.write(req[:10]) // net.Pipe: returns once the server has read it
	srv.mu.Lock()
	for c := range srv.conns {
		c.beginShutdown()
	}
	srv.mu.Unlock()
	rc.write(append(req[10:], "abcd"...))
	errno, cookie := rc.readSimpleReply()
	assert.Equal(t, errShutdown, errno)
	assert.Equal(t, uint64(9), cookie)
	rc.requireClosed()
	require.NoError(t, srv.Shutdown(context.Background()))
}

func TestShutdownDeadlineCancelsRequests(t *testing.T) {
	backend := newGatedBackend(1<<20, 0)
	srv := NewServer([]Export{{Name: "disk", Backend: backend}}, Options{})
	rc := transmitting(t, srv, "disk", false)
	rc.sendRequest(0, cmdRead, 1, 0, 512, nil)
	<-backend.entered
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, srv.Shutdown(ctx), context.DeadlineExceeded)
	<-rc.served
	backend.mu.Lock()
	defer backend.mu.Unlock()
	assert.Equal(t, 1, backend.cancelledReads)
}

func TestServeStopsOnContext(t *testing.T) {
	srv := NewServer([]Export{{Name: "disk", Backend: newMemBackend(1 << 20)}}, Options{})
	l, err := netListen(t)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, l) }()
	cancel()
	assert.ErrorIs(t, <-served, context.Canceled)
}
