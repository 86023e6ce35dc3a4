package persistent_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

// These tests are the spec's §10 test vectors (shared/specs/dm-snapshot-format.md),
// computed from the kernel's rules.

const mib = 1 << 20

func quietLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }

func open(t *testing.T, dev *faultdev.Device, chunkSectors uint32) *persistent.Store {
	t.Helper()
	s, err := persistent.Open(context.Background(), dev, persistent.Options{ChunkSectors: chunkSectors, Logger: quietLogger()})
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s
}

// take prepares and commits an exception for old, writing fill bytes as its data.
func take(t *testing.T, s *persistent.Store, dev *faultdev.Device, old exstore.Chunk, fill byte) exstore.Exception {
	t.Helper()
	e := prepareWritten(t, s, dev, old, fill)
	require.NoError(t, s.Commit(context.Background(), e))
	return e
}

// prepareWritten prepares an exception for old and writes fill bytes as its
// data, for the caller to commit.
func prepareWritten(t *testing.T, s *persistent.Store, dev *faultdev.Device, old exstore.Chunk, fill byte) exstore.Exception {
	t.Helper()
	e, err := s.Prepare(context.Background(), old)
	require.NoError(t, err)
	cb := int64(s.ChunkSectors()) * 512
	_, err = dev.WriteAt(bytes.Repeat([]byte{fill}, int(cb)), int64(e.New)*cb)
	require.NoError(t, err)
	return e
}

func hexBytes(s string) []byte {
	var b []byte
	for i := 0; i < len(s); i += 3 {
		var v byte
		fmt.Sscanf(s[i:i+2], "%02x", &v)
		b = append(b, v)
	}
	return b
}

func TestVector1NewStore(t *testing.T) {
	dev := faultdev.New("cow", 16*mib)
	s := open(t, dev, 8)
	img := dev.DurableBytes() // formatting must be durable, not only written
	assert.Equal(t, hexBytes("53 6e 41 70 01 00 00 00 01 00 00 00 08 00 00 00"), img[:16])
	assert.Equal(t, make([]byte, 8192-16), img[16:8192], "rest of the header and area 0 are zero")
	T := uint64(16 * mib / 512)
	assert.Equal(t, fmt.Sprintf("16/%d 16", T), s.Usage().String())
}

func TestVector2InvalidatedHeader(t *testing.T) {
	dev := faultdev.New("cow", 16*mib)
	s := open(t, dev, 8)
	require.NoError(t, s.Invalidate(context.Background(), fmt.Errorf("test")))
	assert.Equal(t, hexBytes("53 6e 41 70 00 00 00 00 01 00 00 00 08 00 00 00"), dev.DurableBytes()[:16], "invalidation is durable")
	assert.ErrorIs(t, s.Err(), exstore.ErrInvalid)
	_, err := s.Prepare(context.Background(), 1)
	assert.ErrorIs(t, err, exstore.ErrInvalid)

	s2 := open(t, faultdev.FromBytes("cow", dev.DurableBytes()), 0)
	assert.ErrorIs(t, s2.Err(), exstore.ErrInvalid, "an invalid header opens as an invalid store")
}

func TestVector3HeaderChunkSizes(t *testing.T) {
	for _, tc := range []struct {
		c    uint32
		last string
	}{{1, "01 00 00 00"}, {16, "10 00 00 00"}, {32, "20 00 00 00"}} {
		dev := faultdev.New("cow", 4*mib)
		open(t, dev, tc.c)
		assert.Equal(t, hexBytes("53 6e 41 70 01 00 00 00 01 00 00 00 "+tc.last), dev.Bytes()[:16], "C=%d", tc.c)
	}
}

func TestVector4And5Geometry(t *testing.T) {
	for c, e := range map[uint32]uint64{1: 32, 8: 256, 16: 512, 32: 1024, 1024: 32768} {
		assert.Equal(t, e, persistent.NewGeometry(c, 1<<30).PerArea, "E for C=%d", c)
	}
	for _, tc := range []struct {
		c        uint32
		area     uint64
		chunk    exstore.Chunk
		byteOffs int64
	}{
		{8, 0, 1, 4096}, {8, 1, 258, 1056768}, {8, 2, 515, 2109440},
		{1, 1, 34, 17408}, {1, 2, 67, 34304},
		{16, 1, 514, 4210688}, {16, 2, 1027, 8413184},
		{32, 1, 1026, 16809984}, {32, 2, 2051, 33603584},
	} {
		g := persistent.NewGeometry(tc.c, 1<<30)
		loc := g.AreaLocation(tc.area)
		assert.Equal(t, tc.chunk, loc, "C=%d area %d", tc.c, tc.area)
		assert.Equal(t, tc.byteOffs, int64(loc)*g.ChunkBytes, "C=%d area %d byte offset", tc.c, tc.area)
	}
}

func TestVector6And7FirstExceptions(t *testing.T) {
	dev := faultdev.New("cow", 16*mib)
	s := open(t, dev, 8)
	e := take(t, s, dev, 5, 0xA5)
	assert.Equal(t, exstore.Exception{Old: 5, New: 2}, e)
	img := dev.DurableBytes()
	assert.Equal(t, hexBytes("05 00 00 00 00 00 00 00 02 00 00 00 00 00 00 00"), img[4096:4112])
	assert.Equal(t, make([]byte, 8192-4112), img[4112:8192])
	assert.Equal(t, bytes.Repeat([]byte{0xA5}, 4096), img[8192:12288], "data durable at chunk 2")
	T := uint64(16 * mib / 512)
	assert.Equal(t, fmt.Sprintf("24/%d 16", T), s.Usage().String())

	e = take(t, s, dev, 9, 0x5A)
	assert.Equal(t, exstore.Chunk(3), e.New)
	img = dev.DurableBytes()
	assert.Equal(t, hexBytes("09 00 00 00 00 00 00 00 03 00 00 00 00 00 00 00"), img[4112:4128])
	assert.Equal(t, bytes.Repeat([]byte{0x5A}, 4096), img[12288:16384])
}

func TestVector8And9AllocationOrder(t *testing.T) {
	dev := faultdev.New("cow", 16*mib)
	s := open(t, dev, 8)
	T := uint64(16 * mib / 512)
	var news []exstore.Chunk
	for g := 0; g < 257; g++ {
		e := take(t, s, dev, exstore.Chunk(1000+g), byte(g))
		news = append(news, e.New)
		// Vector 9: record g points at 2+g+floor(g/E).
		assert.Equal(t, exstore.Chunk(2+g+g/256), e.New, "record %d", g)
		if g == 255 {
			img := dev.DurableBytes()
			assert.Equal(t, make([]byte, 4096), img[1056768:1056768+4096], "area 1 zero after 256 exceptions")
			assert.Equal(t, fmt.Sprintf("2072/%d 24", T), s.Usage().String())
		}
	}
	assert.Equal(t, exstore.Chunk(2), news[0])
	assert.Equal(t, exstore.Chunk(257), news[255])
	assert.Equal(t, exstore.Chunk(259), news[256], "258 is area 1")
	img := dev.DurableBytes()
	assert.Equal(t, uint64(1256), binary.LittleEndian.Uint64(img[1056768:]), "record 257 is the first of area 1")
	assert.Equal(t, uint64(259), binary.LittleEndian.Uint64(img[1056768+8:]))
	assert.Equal(t, fmt.Sprintf("2080/%d 24", T), s.Usage().String())
}

// image builds a COW image with C=8: header, then records placed in areas.
func image(size int64, areas map[uint64][][2]uint64) []byte {
	b := make([]byte, size)
	persistent.Header{Magic: persistent.Magic, Valid: 1, Version: 1, ChunkSectors: 8}.Encode(b)
	g := persistent.NewGeometry(8, size)
	for a, recs := range areas {
		off := int64(g.AreaLocation(a)) * g.ChunkBytes
		for i, r := range recs {
			persistent.EncodeRecord(b[off:], i, exstore.Exception{Old: exstore.Chunk(r[0]), New: exstore.Chunk(r[1])})
		}
	}
	return b
}

func walk(s exstore.Store) map[exstore.Chunk]exstore.Chunk {
	m := map[exstore.Chunk]exstore.Chunk{}
	s.Walk(func(e exstore.Exception) bool { m[e.Old] = e.New; return true })
	return m
}

func TestVector10Load(t *testing.T) {
	s := open(t, faultdev.FromBytes("cow", image(16*mib, map[uint64][][2]uint64{0: {{7, 4}, {3, 2}, {9, 3}}})), 0)
	assert.Equal(t, map[exstore.Chunk]exstore.Chunk{7: 4, 3: 2, 9: 3}, walk(s))
	u := s.Usage()
	assert.Equal(t, uint64(5*8), u.AllocatedSectors, "next_free = 5")
	assert.Equal(t, uint64(3), u.Exceptions)
	// current_committed = 3: the next record goes to slot 3.
	dev := faultdev.FromBytes("cow", image(16*mib, map[uint64][][2]uint64{0: {{7, 4}, {3, 2}, {9, 3}}}))
	s = open(t, dev, 0)
	e := take(t, s, dev, 11, 1)
	assert.Equal(t, exstore.Chunk(5), e.New)
	assert.Equal(t, uint64(11), binary.LittleEndian.Uint64(dev.Bytes()[4096+3*16:]))

	s = open(t, faultdev.FromBytes("cow", image(16*mib, map[uint64][][2]uint64{0: {{9, 257}}})), 0)
	assert.Equal(t, uint64(259*8), s.Usage().AllocatedSectors, "258 is an area: next_free skips to 259")
}

func TestVector11Terminator(t *testing.T) {
	dev := faultdev.FromBytes("cow", image(16*mib, map[uint64][][2]uint64{0: {{0, 2}, {8, 0}, {5, 6}}}))
	s := open(t, dev, 0)
	assert.Equal(t, map[exstore.Chunk]exstore.Chunk{0: 2}, walk(s), "old 0 is a real record; (5,6) after the terminator is ignored")
	// The stale record after the terminator is cleared by the next write so
	// that no loader (ours or the kernel's) can revive it.
	take(t, s, dev, 1, 1)
	img := dev.DurableBytes()
	assert.Equal(t, uint64(1), binary.LittleEndian.Uint64(img[4096+16:]))
	assert.Equal(t, make([]byte, 16), img[4096+32:4096+48], "garbage after the terminator is gone")
}

func TestVector12FullAreaLoad(t *testing.T) {
	var full [][2]uint64
	for i := uint64(0); i < 256; i++ {
		full = append(full, [2]uint64{100 + i, 2 + i})
	}
	s := open(t, faultdev.FromBytes("cow", image(16*mib, map[uint64][][2]uint64{0: full})), 0)
	u := s.Usage()
	assert.Equal(t, uint64(259*8), u.AllocatedSectors)
	assert.Equal(t, uint64(24), u.MetadataSectors, "current_area = 1")
	assert.Equal(t, uint64(256), u.Exceptions)

	// Area 1 (chunk 258) beyond the end: 258 chunks of 4 KiB.
	_, err := persistent.Open(context.Background(), faultdev.FromBytes("cow", image(258*4096, map[uint64][][2]uint64{0: full})),
		persistent.Options{Logger: quietLogger()})
	require.Error(t, err)
	assert.ErrorIs(t, err, persistent.ErrCorrupt)
	assert.Contains(t, err.Error(), "past the end")
}

func TestVector13Capacity(t *testing.T) {
	dev := faultdev.New("cow", 32768*512)
	s := open(t, dev, 8)
	assert.Equal(t, uint64(4079), s.Geometry().Capacity())
	var last exstore.Exception
	for i := 0; i < 4079; i++ {
		e, err := s.Prepare(context.Background(), exstore.Chunk(i))
		require.NoError(t, err, "exception %d", i)
		require.NoError(t, s.Commit(context.Background(), e))
		last = e
	}
	assert.Equal(t, exstore.Chunk(4095), last.New)
	assert.Equal(t, "32768/32768 136", s.Usage().String())
	_, err := s.Prepare(context.Background(), 5000)
	assert.ErrorIs(t, err, exstore.ErrNoSpace)
}

func TestVector14LastAreaMayNotFill(t *testing.T) {
	// C=8 with N=65536 chunks is the spec's example; C=1 with N=34 is the
	// same case (N ≡ 1 mod E+1) at a size a test can fill quickly.
	assert.Equal(t, uint64(65279), persistent.NewGeometry(8, 256*mib).Capacity())
	dev := faultdev.New("cow", 34*512)
	s := open(t, dev, 1)
	require.Equal(t, uint64(31), s.Geometry().Capacity())
	for i := 0; i < 31; i++ {
		take(t, s, dev, exstore.Chunk(i), byte(i))
	}
	_, err := s.Prepare(context.Background(), 99)
	require.ErrorIs(t, err, exstore.ErrNoSpace, "the 32nd record would fill area 0, whose successor does not fit")
	s2 := open(t, faultdev.FromBytes("cow", dev.DurableBytes()), 0)
	assert.Len(t, walk(s2), 31, "the full store loads again")
}

func TestVector15Merge(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.FromBytes("cow", image(16*mib, map[uint64][][2]uint64{0: {{10, 2}, {11, 3}, {12, 4}, {20, 5}}}))
	s := open(t, dev, 0)
	T := uint64(16 * mib / 512)

	last, n, err := s.PrepareMerge(ctx)
	require.NoError(t, err)
	assert.Equal(t, exstore.Exception{Old: 20, New: 5}, last)
	assert.Equal(t, 1, n)
	require.NoError(t, s.CommitMerge(ctx, 1))
	assert.Equal(t, make([]byte, 16), dev.DurableBytes()[4144:4160])
	assert.Equal(t, fmt.Sprintf("40/%d 16", T), s.Usage().String())

	last, n, err = s.PrepareMerge(ctx)
	require.NoError(t, err)
	assert.Equal(t, exstore.Exception{Old: 12, New: 4}, last)
	assert.Equal(t, 3, n)
	require.NoError(t, s.CommitMerge(ctx, 3))
	assert.Equal(t, make([]byte, 4096), dev.DurableBytes()[4096:8192], "area 0 all zero")
	assert.Equal(t, fmt.Sprintf("16/%d 16", T), s.Usage().String())
	_, ok, release, err := s.Lookup(ctx, 11)
	require.NoError(t, err)
	release()
	assert.False(t, ok)

	_, n, err = s.PrepareMerge(ctx)
	require.NoError(t, err)
	assert.Equal(t, 0, n, "done")
}

func TestVector18HeaderRules(t *testing.T) {
	ctx := context.Background()
	// The header's chunk size wins over a requested one.
	dev := faultdev.New("cow", 16*mib)
	open(t, dev, 16)
	s := open(t, faultdev.FromBytes("cow", dev.Bytes()), 8)
	assert.Equal(t, uint32(16), s.ChunkSectors())

	b := dev.Bytes()
	binary.LittleEndian.PutUint32(b[8:], 2)
	_, err := persistent.Open(ctx, faultdev.FromBytes("cow", b), persistent.Options{Logger: quietLogger()})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "version 2")
	assert.Contains(t, err.Error(), "cow cow:", "the error names the device")

	b = dev.Bytes()
	copy(b, "XXXX")
	_, err = persistent.Open(ctx, faultdev.FromBytes("cow", b), persistent.Options{Logger: quietLogger()})
	require.Error(t, err)
	assert.ErrorIs(t, err, persistent.ErrCorrupt)
	assert.Contains(t, err.Error(), "58 58 58 58", "the error shows the bytes found")

	for _, bad := range []uint32{0, 3, 1 << 22} {
		b = dev.Bytes()
		binary.LittleEndian.PutUint32(b[12:], bad)
		_, err = persistent.Open(ctx, faultdev.FromBytes("cow", b), persistent.Options{Logger: quietLogger()})
		assert.ErrorIs(t, err, persistent.ErrCorrupt, "chunk size %d", bad)
	}

	// Magic 0: treated as new and overwritten.
	b = dev.Bytes()
	copy(b, []byte{0, 0, 0, 0})
	s = open(t, faultdev.FromBytes("cow", b), 8)
	assert.Equal(t, uint32(8), s.ChunkSectors())
	assert.Equal(t, uint64(0), s.Usage().Exceptions)
}

func TestAbortedChunkCanBePreparedAgain(t *testing.T) {
	ctx := context.Background()
	dev := faultdev.New("cow", 4*mib)
	s := open(t, dev, 8)
	a, err := s.Prepare(ctx, 5)
	require.NoError(t, err)
	s.Abort(a)
	// The abort is processed by the committer; a later commit proves it is done.
	take(t, s, dev, 6, 1)
	b, err := s.Prepare(ctx, 5)
	require.NoError(t, err, "an aborted exception's origin chunk can be prepared again")
	assert.Greater(t, b.New, a.New, "the aborted chunk is not reused before a reload")
	require.NoError(t, s.Commit(ctx, b))
	assert.Equal(t, map[exstore.Chunk]exstore.Chunk{5: b.New, 6: a.New + 1}, walk(s))
}
