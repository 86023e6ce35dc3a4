package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// dialTest connects to ts and closes the connection when the test ends.
func dialTest(t *testing.T, ts *testServer) net.Conn {
	t.Helper()
	network, addr := "tcp", ts.addr
	if ts.socket != "" {
		network, addr = "unix", ts.socket
	}
	conn, err := net.DialTimeout(network, addr, 10*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { conn.Close() })
	return conn
}

// negotiateCtx bounds a test's handshake, so that a client that hangs fails
// the test instead.
func negotiateCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestNegotiateWithOurServer(t *testing.T) {
	mem := newMemBackend(1 << 20)
	ts := startServer(t, []Export{
		{Name: "disk", Backend: mem, MultiConn: true},
		{Name: "snap", Backend: mem, ReadOnly: true},
	}, Options{}, true)

	conn := dialTest(t, ts)
	info, err := Negotiate(negotiateCtx(t), conn, "disk")
	require.NoError(t, err)
	assert.Equal(t, uint64(1<<20), info.Size)
	assert.False(t, info.ReadOnly())
	assert.NotZero(t, info.Flags&tflagSendFlush, "flags as the server sent them")
	assert.NotZero(t, info.Flags&tflagCanMultiConn)
	assert.NotZero(t, info.MaxBlockSize, "the block size constraints asked for")
	assert.NoError(t, info.CheckBlockSize(4096))

	// Transmission starts right after: a read of the first sector works.
	require.NoError(t, mem.WriteAt(context.Background(), []byte("hello"), 0, false))
	_, err = conn.Write(encodeRequest(0, cmdRead, 7, 0, 512))
	require.NoError(t, err)
	reply := make([]byte, simpleReplyHeaderSize+512)
	_, err = readFull(conn, reply)
	require.NoError(t, err)
	assert.Equal(t, simpleReplyMagic, binary.BigEndian.Uint32(reply))
	assert.Equal(t, uint32(0), binary.BigEndian.Uint32(reply[4:]), "errno")
	assert.Equal(t, []byte("hello"), reply[simpleReplyHeaderSize:simpleReplyHeaderSize+5])

	info, err = Negotiate(negotiateCtx(t), dialTest(t, ts), "snap")
	require.NoError(t, err)
	assert.True(t, info.ReadOnly())

	_, err = Negotiate(negotiateCtx(t), dialTest(t, ts), "nosuch")
	var oe *OptionError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, repErrUnknown, oe.Reply)
	assert.Contains(t, err.Error(), "no such export")
}

func TestNegotiateRefusedWithoutTLS(t *testing.T) {
	pki := newTestPKI(t)
	ts := startServer(t, []Export{{Name: "disk", Backend: newMemBackend(1 << 20)}}, Options{TLSMode: TLSRequire, TLS: pki.server}, false)
	_, err := Negotiate(negotiateCtx(t), dialTest(t, ts), "disk")
	var oe *OptionError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, repErrTLSReqd, oe.Reply)
	assert.Contains(t, err.Error(), "the server requires TLS")
}

func TestExportInfoCheckBlockSize(t *testing.T) {
	info := ExportInfo{Size: 1 << 20, MinBlockSize: 1024, MaxBlockSize: 2048}
	assert.NoError(t, info.CheckBlockSize(1024))
	assert.NoError(t, info.CheckBlockSize(2048))
	assert.ErrorContains(t, info.CheckBlockSize(512), "at least 1024")
	assert.ErrorContains(t, info.CheckBlockSize(4096), "at most 2048")
	assert.ErrorContains(t, info.CheckBlockSize(3000), "want 512")
	assert.ErrorContains(t, ExportInfo{Size: 1536}.CheckBlockSize(1024), "not a multiple")
}

// fakeServer runs script as the server side of a pipe and returns the
// client side.
func fakeServer(t *testing.T, script func(c net.Conn)) net.Conn {
	t.Helper()
	client, server := net.Pipe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer server.Close()
		script(server)
	}()
	t.Cleanup(func() {
		client.Close()
		<-done
	})
	return client
}

// greeting is a fixed newstyle server greeting with flags.
func greeting(flags uint16) []byte {
	b := binary.BigEndian.AppendUint64(nil, nbdMagic)
	b = binary.BigEndian.AppendUint64(b, optionMagic)
	return binary.BigEndian.AppendUint16(b, flags)
}

// optionReply encodes an option reply to NBD_OPT_GO.
func optionReply(typ uint32, payload []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, optionReplyMagic)
	b = binary.BigEndian.AppendUint32(b, optGo)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

// readGo reads the client flags and its NBD_OPT_GO, returning the flags
// and the option's data.
func readGo(c net.Conn) (flags, data []byte) {
	hdr := make([]byte, 4+optionHeaderSize)
	if _, err := readFull(c, hdr); err != nil {
		return nil, nil
	}
	data = make([]byte, binary.BigEndian.Uint32(hdr[4+12:]))
	readFull(c, data)
	return hdr[:4], data
}

func readFull(c net.Conn, p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m, err := c.Read(p[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func exportInfoPayload(size uint64, flags uint16) []byte {
	b := binary.BigEndian.AppendUint16(nil, infoExport)
	b = binary.BigEndian.AppendUint64(b, size)
	return binary.BigEndian.AppendUint16(b, flags)
}

func TestNegotiateSendsWhatTheKernelClientNeeds(t *testing.T) {
	got := make(chan []byte, 2)
	conn := fakeServer(t, func(c net.Conn) {
		c.Write(greeting(flagFixedNewstyle | flagNoZeroes))
		flags, data := readGo(c)
		got <- flags
		got <- data
		c.Write(optionReply(repInfo, exportInfoPayload(8192, tflagHasFlags|tflagReadOnly)))
		bs := binary.BigEndian.AppendUint16(nil, infoBlockSize)
		bs = binary.BigEndian.AppendUint32(bs, 512)
		bs = binary.BigEndian.AppendUint32(bs, 4096)
		bs = binary.BigEndian.AppendUint32(bs, 1<<20)
		c.Write(optionReply(repInfo, bs))
		c.Write(optionReply(repInfo, binary.BigEndian.AppendUint16([]byte(nil), infoName))) // not asked for: ignored
		c.Write(optionReply(repAck, nil))
	})
	info, err := Negotiate(negotiateCtx(t), conn, "vol")
	require.NoError(t, err)
	assert.Equal(t, ExportInfo{Size: 8192, Flags: tflagHasFlags | tflagReadOnly, MinBlockSize: 512, MaxBlockSize: 1 << 20}, info)
	assert.Equal(t, binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes), <-got)
	want := binary.BigEndian.AppendUint32(nil, 3)
	want = append(want, "vol"...)
	want = binary.BigEndian.AppendUint16(want, 1)
	want = binary.BigEndian.AppendUint16(want, infoBlockSize)
	assert.Equal(t, want, <-got, "NBD_OPT_GO: the name and one request, for the block size")
}

func TestNegotiateRefusesBadServers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		script func(c net.Conn)
		want   string
	}{
		{"silent close", func(c net.Conn) {}, "read greeting"},
		{"truncated greeting", func(c net.Conn) { c.Write(greeting(flagFixedNewstyle)[:10]) }, "read greeting"},
		{"garbage", func(c net.Conn) { c.Write(bytes.Repeat([]byte("x"), 18)) }, "not an NBD server"},
		{"oldstyle", func(c net.Conn) {
			b := binary.BigEndian.AppendUint64(nil, nbdMagic)
			b = binary.BigEndian.AppendUint64(b, oldstyleMagic)
			c.Write(append(b, 0, 0))
		}, "oldstyle"},
		{"not fixed newstyle", func(c net.Conn) { c.Write(greeting(0)) }, "fixed newstyle"},
		{"no reply", func(c net.Conn) {
			c.Write(greeting(flagFixedNewstyle))
			readGo(c)
		}, "read the reply to NBD_OPT_GO"},
		{"bad reply magic", func(c net.Conn) {
			c.Write(greeting(flagFixedNewstyle))
			readGo(c)
			r := optionReply(repAck, nil)
			r[0] ^= 0xff
			c.Write(r)
		}, "malformed reply"},
		{"huge reply", func(c net.Conn) {
			c.Write(greeting(flagFixedNewstyle))
			readGo(c)
			r := optionReply(repInfo, nil)
			binary.BigEndian.PutUint32(r[16:], 1<<30)
			c.Write(r)
		}, "reply to NBD_OPT_GO of 1073741824 bytes"},
		{"truncated reply payload", func(c net.Conn) {
			c.Write(greeting(flagFixedNewstyle))
			readGo(c)
			c.Write(optionReply(repInfo, exportInfoPayload(4096, 0))[:25])
		}, "read the reply to NBD_OPT_GO"},
		{"ack without size", func(c net.Conn) {
			c.Write(greeting(flagFixedNewstyle))
			readGo(c)
			c.Write(optionReply(repAck, nil))
		}, "no size"},
		{"unknown reply type", func(c net.Conn) {
			c.Write(greeting(flagFixedNewstyle))
			readGo(c)
			c.Write(optionReply(99, nil))
		}, "unexpected reply 99"},
		{"error with message", func(c net.Conn) {
			c.Write(greeting(flagFixedNewstyle))
			readGo(c)
			c.Write(optionReply(repErrPolicy, []byte("go away\n")))
			readFull(c, make([]byte, optionHeaderSize)) // the client's NBD_OPT_ABORT
		}, `refused by the server's policy (server: "go away")`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			_, err := Negotiate(negotiateCtx(t), fakeServer(t, tc.script), "vol")
			assert.ErrorContains(t, err, tc.want)
			assert.Less(t, time.Since(start), 5*time.Second)
		})
	}
}

func TestNegotiateEndsWithItsContext(t *testing.T) {
	stall := func(c net.Conn) {
		c.Write(greeting(flagFixedNewstyle))
		readGo(c)
		c.Read(make([]byte, 1)) // until the client closes
	}
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err := Negotiate(ctx, fakeServer(t, stall), "vol")
	assert.ErrorIs(t, err, context.DeadlineExceeded)

	ctx, cancel = context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err = Negotiate(ctx, fakeServer(t, stall), "vol")
	assert.ErrorIs(t, err, context.Canceled)

	_, err = Negotiate(ctx, fakeServer(t, stall), "vol")
	assert.ErrorIs(t, err, context.Canceled, "an ended context sends nothing")
}

// startNbdkit runs nbdkit's memory plugin (1 MiB) on a unix socket until
// the test ends, with extra options before the plugin and parameters after.
func startNbdkit(t *testing.T, options []string, params ...string) string {
	t.Helper()
	nbdkit := requireTool(t, "nbdkit", "nbdkit")
	dir, err := os.MkdirTemp("", "nbdkit")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "nbd.sock")
	cmd := exec.Command(nbdkit, slices.Concat([]string{"-f", "--exit-with-parent", "-U", sock}, options, []string{"memory", "1M"}, params)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if conn, err := net.Dial("unix", sock); err == nil {
			conn.Close()
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdkit did not create %s: %s", sock, stderr.String())
		}
	}
}

func TestNegotiateWithNbdkit(t *testing.T) {
	dial := func(sock string) net.Conn {
		conn, err := net.DialTimeout("unix", sock, 10*time.Second)
		require.NoError(t, err)
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	sock := startNbdkit(t, []string{"--filter=exportname"}, "exportname=vol", "exportname-strict=true")
	info, err := Negotiate(negotiateCtx(t), dial(sock), "vol")
	require.NoError(t, err)
	assert.Equal(t, uint64(1<<20), info.Size)
	assert.False(t, info.ReadOnly())
	assert.NotZero(t, info.Flags&tflagHasFlags)
	assert.NoError(t, info.CheckBlockSize(4096))

	_, err = Negotiate(negotiateCtx(t), dial(sock), "nosuch")
	var oe *OptionError
	require.ErrorAs(t, err, &oe, "nbdkit's exportname filter refuses unknown names")
	assert.Equal(t, repErrUnknown, oe.Reply, "%v", err)

	ro := startNbdkit(t, []string{"-r"})
	info, err = Negotiate(negotiateCtx(t), dial(ro), "")
	require.NoError(t, err)
	assert.True(t, info.ReadOnly())
}
