package clusterload

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// BlockSize is the unit every workload write and check uses.
const BlockSize = 4096

// Target is a device the workload writes: the origin or the snapshot.
type Target uint8

const (
	ToOrigin Target = iota + 1
	ToSnapshot
)

func (t Target) String() string {
	if t == ToOrigin {
		return "origin"
	}
	return "snapshot"
}

// Value names what a block holds: the original content (Kind 0), or one
// write: which device it went to, which node sent it, and that node's
// sequence number (unique per node and run).
type Value struct {
	Kind Target // 0: the original content
	Node uint8
	Seq  uint32
}

// Pristine is what every block holds before the workload.
var Pristine = Value{}

func (v Value) String() string {
	if v == Pristine {
		return "the original content"
	}
	return fmt.Sprintf("%v write %d of node %d", v.Kind, v.Seq, v.Node)
}

// blockMagic starts every sector of a block the test wrote.
var blockMagic = [8]byte{'c', 's', 'n', 'a', 'p', 'b', 'l', 'k'}

// EncodeBlock is the content of block (its index on its device) holding
// v: every 512-byte sector names the value, the block and itself, and the
// rest of it is a pseudo-random fill derived from those, so that a block
// holding a value written to another block, a mix of two writes or any
// other bytes decodes as nobody's.
func EncodeBlock(v Value, block int64) []byte {
	b := make([]byte, BlockSize)
	for s := range BlockSize / 512 {
		sec := b[s*512 : (s+1)*512]
		copy(sec, blockMagic[:])
		sec[8], sec[9], sec[10] = byte(v.Kind), v.Node, byte(s)
		binary.BigEndian.PutUint32(sec[12:], v.Seq)
		binary.BigEndian.PutUint64(sec[16:], uint64(block))
		x := uint64(block)<<20 ^ uint64(v.Seq)<<8 ^ uint64(v.Node)<<4 ^ uint64(v.Kind) ^ uint64(s)<<60 | 1
		for k := 24; k < 512; k += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			binary.LittleEndian.PutUint64(sec[k:], x)
		}
	}
	return b
}

// DecodeBlock returns the value block holds, or false if it holds
// anything nobody wrote there.
func DecodeBlock(data []byte, block int64) (Value, bool) {
	if len(data) != BlockSize || !bytes.Equal(data[:8], blockMagic[:]) {
		return Value{}, false
	}
	v := Value{Kind: Target(data[8]), Node: data[9], Seq: binary.BigEndian.Uint32(data[12:])}
	return v, bytes.Equal(data, EncodeBlock(v, block))
}

// PristineImage is an origin image of blocks blocks, each holding
// Pristine.
func PristineImage(blocks int64) []byte {
	img := make([]byte, blocks*BlockSize)
	for b := range blocks {
		copy(img[b*BlockSize:], EncodeBlock(Pristine, b))
	}
	return img
}
