package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// scriptedConn is a net.Conn that plays a fixed client byte stream and
// throws the server's output away.
type scriptedConn struct {
	r *bytes.Reader
}

func (s *scriptedConn) Read(p []byte) (int, error)       { return s.r.Read(p) }
func (s *scriptedConn) Write(p []byte) (int, error)      { return len(p), nil }
func (s *scriptedConn) Close() error                     { return nil }
func (s *scriptedConn) LocalAddr() net.Addr              { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (s *scriptedConn) RemoteAddr() net.Addr             { return &net.UnixAddr{Name: "fuzz", Net: "unix"} }
func (s *scriptedConn) SetDeadline(time.Time) error      { return nil }
func (s *scriptedConn) SetReadDeadline(time.Time) error  { return nil }
func (s *scriptedConn) SetWriteDeadline(time.Time) error { return nil }

// fuzzSeeds are client streams (after the greeting) that reach every part of
// the option and request parsers.
func fuzzSeeds() [][]byte {
	option := func(opt uint32, data []byte) []byte {
		b := binary.BigEndian.AppendUint64(nil, optionMagic)
		b = binary.BigEndian.AppendUint32(b, opt)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	flags := binary.BigEndian.AppendUint32(nil, clientFlagFixedNewstyle|clientFlagNoZeroes)
	var full []byte
	full = append(full, flags...)
	full = append(full, option(optList, nil)...)
	full = append(full, option(optStructuredReply, nil)...)
	full = append(full, option(optSetMetaContext, metaRequest("disk", metaContextBaseAllocation))...)
	full = append(full, option(optInfo, infoRequest("disk", infoName, infoDescription))...)
	full = append(full, option(99, []byte("x"))...)
	full = append(full, option(optGo, infoRequest("disk"))...)
	full = append(full, encodeRequest(cmdFlagFUA, cmdWrite, 1, 0, 4)...)
	full = append(full, "abcd"...)
	full = append(full, encodeRequest(cmdFlagDF, cmdRead, 2, 0, 4)...)
	full = append(full, encodeRequest(cmdFlagNoHole, cmdWriteZeroes, 3, 8192, 8192)...)
	full = append(full, encodeRequest(0, cmdTrim, 4, 16384, 4096)...)
	full = append(full, encodeRequest(cmdFlagReqOne, cmdBlockStatus, 5, 0, 65536)...)
	full = append(full, encodeRequest(0, cmdFlush, 6, 0, 0)...)
	full = append(full, encodeRequest(0, cmdCache, 7, 0, 512)...)
	full = append(full, encodeRequest(0, 77, 8, 0, 512)...)
	full = append(full, encodeRequest(0, cmdDisc, 9, 0, 0)...)

	var bitmaps []byte
	bitmaps = append(bitmaps, flags...)
	bitmaps = append(bitmaps, option(optStructuredReply, nil)...)
	bitmaps = append(bitmaps, option(optListMetaContext, metaRequest("bitmaps", "qemu:"))...)
	bitmaps = append(bitmaps, option(optSetMetaContext, metaRequest("bitmaps", DirtyBitmapNamespace+"s1", DirtyBitmapNamespace+"gone", metaContextBaseAllocation))...)
	bitmaps = append(bitmaps, option(optGo, infoRequest("bitmaps"))...)
	bitmaps = append(bitmaps, encodeRequest(0, cmdBlockStatus, 1, 0, 65536)...)
	bitmaps = append(bitmaps, encodeRequest(cmdFlagReqOne, cmdBlockStatus, 2, 4096, 8192)...)
	bitmaps = append(bitmaps, encodeRequest(0, cmdDisc, 3, 0, 0)...)

	exportName := append(bytes.Clone(flags), option(optExportName, []byte("disk"))...)
	exportName = append(exportName, encodeRequest(0, cmdRead, 1, 1<<20-4, 8)...)
	return [][]byte{
		full,
		bitmaps,
		exportName,
		append(bytes.Clone(flags), option(optAbort, nil)...),
		append(bytes.Clone(flags), option(optListMetaContext, metaRequest("disk"))...),
		{0, 0, 0, 1, 0, 0},
	}
}

// FuzzServer feeds arbitrary client streams to a connection: whatever the
// bytes, the server must neither panic nor hang.
func FuzzServer(f *testing.F) {
	for _, seed := range fuzzSeeds() {
		f.Add(seed)
	}
	srv := NewServer([]Export{
		{Name: "disk", Backend: newMemBackend(1 << 20)},
		{Name: "ro", Backend: newMemBackend(1 << 20), ReadOnly: true},
		{Name: "bitmaps", Backend: fuzzBitmaps()},
	}, Options{MaxPayload: 1 << 16, MaxInFlight: 4})
	f.Fuzz(func(t *testing.T, stream []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.ServeConn(ctx, &scriptedConn{r: bytes.NewReader(stream)})
		require.NoError(t, ctx.Err(), "the connection did not end with its input")
	})
}

// fuzzBitmaps is a backend with a dirty bitmap "s1" whose second page is
// dirty, and one "broken" whose every answer is an error.
func fuzzBitmaps() *bitmapBackend {
	b := newBitmapBackend(1<<20, "s1", "broken")
	b.markDirty("s1", 4096, 4096)
	b.breakBitmap("broken", errors.New("invalid snapshot"))
	return b
}

// TestFuzzSeedsReachTransmission checks that the seeds are meaningful: the
// full seed's requests all get replies.
func TestFuzzSeedsReachTransmission(t *testing.T) {
	mem := newMemBackend(1 << 20)
	srv := NewServer([]Export{{Name: "disk", Backend: mem}}, Options{})
	client, server := net.Pipe()
	go func() {
		client.Write(fuzzSeeds()[0])
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeConn(context.Background(), server)
	}()
	out, err := io.ReadAll(client)
	<-done
	require.NoError(t, err)
	// Eight requests before DISC: count the reply magics.
	simple := bytes.Count(out, binary.BigEndian.AppendUint32(nil, simpleReplyMagic))
	structured := bytes.Count(out, binary.BigEndian.AppendUint32(nil, structuredReplyMagic))
	assert.Equal(t, 8, simple+structured, "replies")
	assert.Equal(t, "abcd", string(mem.data[:4]), "the write landed")
}

// TestFuzzBitmapSeedGetsBlockStatus checks that the dirty-bitmap seed
// reaches its block status requests: both are answered with the bitmap's
// extents (the one it names that does not exist is not selected).
func TestFuzzBitmapSeedGetsBlockStatus(t *testing.T) {
	srv := NewServer([]Export{{Name: "bitmaps", Backend: fuzzBitmaps()}}, Options{})
	client, server := net.Pipe()
	go func() {
		client.Write(fuzzSeeds()[1])
	}()
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeConn(context.Background(), server)
	}()
	out, err := io.ReadAll(client)
	<-done
	require.NoError(t, err)
	blockStatus := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint32(nil, structuredReplyMagic), 0)
	blockStatus = binary.BigEndian.AppendUint16(blockStatus, replyTypeBlockStatus)
	done1 := binary.BigEndian.AppendUint16(binary.BigEndian.AppendUint32(nil, structuredReplyMagic), replyFlagDone)
	done1 = binary.BigEndian.AppendUint16(done1, replyTypeBlockStatus)
	assert.Equal(t, 2, bytes.Count(out, blockStatus), "a first chunk per request")
	assert.Equal(t, 2, bytes.Count(out, done1), "a last chunk per request")
	// s1's answer to the second request: one dirty page (REQ_ONE).
	assert.Contains(t, string(out), string(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 4096), DirtyExtentDirty)))
}
