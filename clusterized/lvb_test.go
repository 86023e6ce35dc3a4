package clusterized_test

import (
	"encoding/binary"
	"hash/crc32"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/lockc"
)

func TestLVBRoundTrip(t *testing.T) {
	for _, c := range []clusterized.Counter{
		{Value: 1, Epoch: 1},
		{Value: 42, Epoch: 0xdeadbeefcafef00d, Flags: clusterized.LVBDirty},
		{Value: 1<<64 - 1, Epoch: 1<<64 - 1, Flags: clusterized.LVBDirty | clusterized.LVBRemoved},
	} {
		b := clusterized.EncodeLVB(c)
		got, ok := clusterized.DecodeLVB(b)
		require.True(t, ok, "decode of %+v", c)
		assert.Equal(t, c, got)
	}
}

// The layout of specs/locks.md §5, checked field by field.
func TestLVBLayout(t *testing.T) {
	b := clusterized.EncodeLVB(clusterized.Counter{Value: 0x0102030405060708, Epoch: 0x1112131415161718, Flags: 3})
	assert.Equal(t, clusterized.LVBMagic, binary.LittleEndian.Uint32(b[0:]))
	assert.Equal(t, uint16(1), binary.LittleEndian.Uint16(b[4:])>>8, "major version in the high byte")
	assert.Equal(t, uint16(3), binary.LittleEndian.Uint16(b[6:]))
	assert.Equal(t, uint64(0x0102030405060708), binary.LittleEndian.Uint64(b[8:]))
	assert.Equal(t, uint64(0x1112131415161718), binary.LittleEndian.Uint64(b[16:]))
	assert.Equal(t, crc32.Checksum(b[:24], crc32.MakeTable(crc32.Castagnoli)), binary.LittleEndian.Uint32(b[24:]))
	assert.Equal(t, []byte{0, 0, 0, 0}, b[28:])
}

// reCRC fixes the checksum after a test changed a field, so that only the
// field's own check can reject the block.
func reCRC(b lockc.LVB) lockc.LVB {
	binary.LittleEndian.PutUint32(b[24:], crc32.Checksum(b[:24], crc32.MakeTable(crc32.Castagnoli)))
	return b
}

func TestLVBRejects(t *testing.T) {
	good := clusterized.EncodeLVB(clusterized.Counter{Value: 7, Epoch: 9})

	var zero lockc.LVB
	_, ok := clusterized.DecodeLVB(zero)
	assert.False(t, ok, "zero LVB (fresh resource)")

	badMagic := good
	badMagic[0] ^= 0xff
	_, ok = clusterized.DecodeLVB(reCRC(badMagic))
	assert.False(t, ok, "bad magic")

	for i := range 24 {
		flipped := good
		flipped[i] ^= 0x10
		_, ok = clusterized.DecodeLVB(flipped)
		assert.False(t, ok, "flipped bit in byte %d caught by the CRC", i)
	}
	badCRC := good
	badCRC[26] ^= 1
	_, ok = clusterized.DecodeLVB(badCRC)
	assert.False(t, ok, "bad CRC")

	newerMajor := good
	binary.LittleEndian.PutUint16(newerMajor[4:], 0x0200)
	_, ok = clusterized.DecodeLVB(reCRC(newerMajor))
	assert.False(t, ok, "newer major layout is unknown")

	newerMinor := good
	binary.LittleEndian.PutUint16(newerMinor[4:], 0x0107)
	c, ok := clusterized.DecodeLVB(reCRC(newerMinor))
	assert.True(t, ok, "newer minor of the same major is read")
	assert.Equal(t, uint64(7), c.Value)

	zeroCounter := clusterized.EncodeLVB(clusterized.Counter{Value: 0, Epoch: 9})
	_, ok = clusterized.DecodeLVB(zeroCounter)
	assert.False(t, ok, "counters start at 1")
}
