package nbd

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"

	"github.com/stretchr/testify/require"
)

// rawClient speaks the protocol byte by byte, to send what real clients
// will not and to see exactly what the server answers.
type rawClient struct {
	t    testing.TB
	conn net.Conn
	// served is closed when the server's ServeConn returns.
	served chan struct{}
}

// dialRaw connects a rawClient to srv over net.Pipe and reads the greeting.
func dialRaw(t testing.TB, srv *Server) *rawClient {
	t.Helper()
	client, server := net.Pipe()
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
	require.Equal(t, optionMagic, binary.BigEndian.Uint64(greeting[8:]))
	require.Equal(t, flagFixedNewstyle|flagNoZeroes, binary.BigEndian.Uint16(greeting[16:]))
	return rc
}

func (rc *rawClient) read(p []byte) {
	rc.t.Helper()
	_, err := io.ReadFull(rc.conn, p)
	require.NoError(rc.t, err)
}

func (rc *rawClient) write(p []byte) {
	rc.t.Helper()
	_, err := rc.conn.Write(p)
	require.NoError(rc.t, err)
}

// requireClosed checks that the server closed the connection.
func (rc *rawClient) requireClosed() {
	rc.t.Helper()
	var b [1]byte
	_, err := rc.conn.Read(b[:])
	require.ErrorIs(rc.t, err, io.EOF)
	<-rc.served
}

func (rc *rawClient) sendFlags(flags uint32) {
	rc.t.Helper()
	rc.write(binary.BigEndian.AppendUint32(nil, flags))
}

func (rc *rawClient) sendOption(opt uint32, data []byte) {
	rc.t.Helper()
	msg := binary.BigEndian.AppendUint64(nil, optionMagic)
	msg = binary.BigEndian.AppendUint32(msg, opt)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	rc.write(append(msg, data...))
}

// readOptionReply returns the type and payload of the next option reply,
// checking that it answers opt.
func (rc *rawClient) readOptionReply(opt uint32) (uint32, []byte) {
	rc.t.Helper()
	var hdr [20]byte
	rc.read(hdr[:])
	require.Equal(rc.t, optionReplyMagic, binary.BigEndian.Uint64(hdr[0:]))
	require.Equal(rc.t, opt, binary.BigEndian.Uint32(hdr[8:]))
	data := make([]byte, binary.BigEndian.Uint32(hdr[16:]))
	rc.read(data)
	return binary.BigEndian.Uint32(hdr[12:]), data
}

// infoRequest encodes the payload of INFO/GO.
func infoRequest(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// metaRequest encodes the payload of LIST/SET_META_CONTEXT.
func metaRequest(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// goExport sends GO for name and reads the replies up to the ACK, returning
// the size and transmission flags.
func (rc *rawClient) goExport(name string) (size uint64, flags uint16) {
	rc.t.Helper()
	rc.sendOption(optGo, infoRequest(name))
	for {
		typ, data := rc.readOptionReply(optGo)
		switch typ {
		case repAck:
			return size, flags
		case repInfo:
			if binary.BigEndian.Uint16(data) == infoExport {
				size = binary.BigEndian.Uint64(data[2:])
				flags = binary.BigEndian.Uint16(data[10:])
			}
		default:
			rc.t.Fatalf("GO %q: reply type %#x", name, typ)
		}
	}
}

// encodeRequest encodes a transmission request.
func encodeRequest(flags, typ uint16, cookie, off uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, requestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

func (rc *rawClient) sendRequest(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) {
	rc.t.Helper()
	rc.write(append(encodeRequest(flags, typ, cookie, off, length), payload...))
}

// readSimpleReply reads a simple reply header, returning errno and cookie.
func (rc *rawClient) readSimpleReply() (errno uint32, cookie uint64) {
	rc.t.Helper()
	var hdr [16]byte
	rc.read(hdr[:])
	require.Equal(rc.t, simpleReplyMagic, binary.BigEndian.Uint32(hdr[0:]))
	return binary.BigEndian.Uint32(hdr[4:]), binary.BigEndian.Uint64(hdr[8:])
}

// chunk is one structured reply chunk.
type chunk struct {
	flags, typ uint16
	cookie     uint64
	payload    []byte
}

func (rc *rawClient) readChunk() chunk {
	rc.t.Helper()
	var hdr [20]byte
	rc.read(hdr[:])
	require.Equal(rc.t, structuredReplyMagic, binary.BigEndian.Uint32(hdr[0:]))
	c := chunk{
		flags:   binary.BigEndian.Uint16(hdr[4:]),
		typ:     binary.BigEndian.Uint16(hdr[6:]),
		cookie:  binary.BigEndian.Uint64(hdr[8:]),
		payload: make([]byte, binary.BigEndian.Uint32(hdr[16:])),
	}
	rc.read(c.payload)
	return c
}

// netPipe returns both ends of an in-memory connection, closed at test end
// by their users.
func netPipe() (net.Conn, net.Conn) { return net.Pipe() }

// netListen listens on a loopback TCP port.
func netListen(t testing.TB) (net.Listener, error) {
	t.Helper()
	return net.Listen("tcp", "127.0.0.1:0")
}
