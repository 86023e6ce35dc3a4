package nbd

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"

	"github.com/stretchr/testify/require"
)

// benchClient is a minimal allocation-free client for benchmarks.
type benchClient struct {
	conn net.Conn
	r    *bufio.Reader
	hdr  [16]byte
}

// dialBench connects to ts and enters transmission on export "bench",
// upgrading to TLS first when tlsConfig is not nil.
func dialBench(b *testing.B, ts *testServer, tlsConfig *tls.Config) *benchClient {
	b.Helper()
	network, addr := "unix", ts.socket
	if addr == "" {
		network, addr = "tcp", ts.addr
	}
	conn, err := net.Dial(network, addr)
	require.NoError(b, err)
	b.Cleanup(func() { conn.Close() })
	bc := &benchClient{conn: conn, r: bufio.NewReaderSize(conn, 1<<20)}
	var greeting [18]byte
	_, err = io.ReadFull(bc.r, greeting[:])
	require.NoError(b, err)
	msg := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	if tlsConfig != nil {
		msg = binary.BigEndian.AppendUint64(msg, optionMagic)
		msg = binary.BigEndian.AppendUint32(msg, optStartTLS)
		msg = binary.BigEndian.AppendUint32(msg, 0)
		_, err = conn.Write(msg)
		require.NoError(b, err)
		var hdr [20]byte
		_, err = io.ReadFull(bc.r, hdr[:])
		require.NoError(b, err)
		require.Equal(b, repAck, binary.BigEndian.Uint32(hdr[12:]))
		tc := tls.Client(conn, tlsConfig)
		require.NoError(b, tc.Handshake())
		bc.conn, bc.r = tc, bufio.NewReaderSize(tc, 1<<20)
		msg = nil
	}
	msg = binary.BigEndian.AppendUint64(msg, optionMagic)
	msg = binary.BigEndian.AppendUint32(msg, optGo)
	req := infoRequest("bench")
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(req)))
	_, err = bc.conn.Write(append(msg, req...))
	require.NoError(b, err)
	for {
		var hdr [20]byte
		_, err = io.ReadFull(bc.r, hdr[:])
		require.NoError(b, err)
		_, err = bc.r.Discard(int(binary.BigEndian.Uint32(hdr[16:])))
		require.NoError(b, err)
		if binary.BigEndian.Uint32(hdr[12:]) == repAck {
			return bc
		}
		require.Equal(b, repInfo, binary.BigEndian.Uint32(hdr[12:]))
	}
}

// readReply reads one simple reply and its data (for reads).
func (bc *benchClient) readReply(b *testing.B, data []byte) {
	if _, err := io.ReadFull(bc.r, bc.hdr[:]); err != nil {
		b.Fatal(err)
	}
	if errno := binary.BigEndian.Uint32(bc.hdr[4:]); errno != 0 {
		b.Fatalf("errno %d", errno)
	}
	if _, err := io.ReadFull(bc.r, data); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkRoundTrip measures READ and WRITE over a unix socket against an
// in-memory export, one request at a time (qd1) and 32 in flight (qd32).
// Allocations per operation include the client's.
func BenchmarkRoundTrip(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10, 1 << 20} {
		for _, write := range []bool{false, true} {
			for _, depth := range []int{1, 32} {
				op := "read"
				if write {
					op = "write"
				}
				b.Run(fmt.Sprintf("%s/%dKiB/qd%d", op, size>>10, depth), func(b *testing.B) {
					benchRoundTrip(b, size, write, depth, nil)
				})
			}
		}
	}
}

// BenchmarkRoundTripTCP is BenchmarkRoundTrip's qd32 cases over loopback
// TCP, where replies too large to gather take writeLarge's MSG_MORE path and
// large payloads tcpSocket.readPayload's low-water mark.
func BenchmarkRoundTripTCP(b *testing.B) {
	benchQD32(b, func(b *testing.B, size int, write bool) {
		benchRoundTripOver(b, size, write, 32, nil, false)
	})
}

// BenchmarkRoundTripTLS is BenchmarkRoundTrip's qd32 cases after STARTTLS.
func BenchmarkRoundTripTLS(b *testing.B) {
	pki := newTestPKI(b)
	benchQD32(b, func(b *testing.B, size int, write bool) {
		benchRoundTrip(b, size, write, 32, pki)
	})
}

// benchQD32 runs bench as sub-benchmarks named like BenchmarkRoundTrip's
// qd32 cases, for each size and direction.
func benchQD32(b *testing.B, bench func(b *testing.B, size int, write bool)) {
	for _, size := range []int{4 << 10, 64 << 10, 1 << 20} {
		for _, write := range []bool{false, true} {
			op := "read"
			if write {
				op = "write"
			}
			b.Run(fmt.Sprintf("%s/%dKiB/qd32", op, size>>10), func(b *testing.B) {
				bench(b, size, write)
			})
		}
	}
}

// benchRoundTrip runs size-byte requests depth at a time over a unix socket,
// with TLS when pki is not nil.
func benchRoundTrip(b *testing.B, size int, write bool, depth int, pki *testPKI) {
	benchRoundTripOver(b, size, write, depth, pki, true)
}

// benchRoundTripOver is benchRoundTrip over a unix socket or, unless unix,
// loopback TCP.
func benchRoundTripOver(b *testing.B, size int, write bool, depth int, pki *testPKI, unix bool) {
	const exportSize = 64 << 20
	opts := Options{}
	var clientTLS *tls.Config
	if pki != nil {
		opts.TLSMode, opts.TLS, clientTLS = TLSRequire, pki.server, pki.client
	}
	ts := startServer(b, []Export{{Name: "bench", Backend: newMemBackend(exportSize)}}, opts, unix)
	bc := dialBench(b, ts, clientTLS)
	typ := cmdRead
	if write {
		typ = cmdWrite
	}
	slots := exportSize / size
	msgs := make([][]byte, slots)
	for i := range msgs {
		msgs[i] = encodeRequest(0, typ, uint64(i), uint64(i*size), uint32(size))
		if write {
			msgs[i] = append(msgs[i], make([]byte, size)...)
		}
	}
	var data []byte
	if !write {
		data = make([]byte, size)
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()

	sent := make(chan struct{}, depth)
	sendErr := make(chan error, 1)
	go func() {
		for i := range b.N {
			sent <- struct{}{}
			if _, err := bc.conn.Write(msgs[i%slots]); err != nil {
				sendErr <- err
				return
			}
		}
		sendErr <- nil
	}()
	for range b.N {
		bc.readReply(b, data)
		<-sent
	}
	b.StopTimer()
	require.NoError(b, <-sendErr)
}
