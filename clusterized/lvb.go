package clusterized

import (
	"crypto/rand"
	"encoding/binary"
	"hash/crc32"

	"github.com/clustersnap/clustersnap/lockc"
)

// The counter LVB layout (specs/locks.md §5), little-endian in the 32-byte
// lock value block:
//
//	0–3    magic (LVBMagic)
//	4–5    layout version, major in the high byte (LVBVersion)
//	6–7    flags (LVBDirty, LVBRemoved)
//	8–15   counter: bumped by every EX holder when it gives EX up
//	16–23  epoch: random, new on every re-seed and after a merge
//	24–27  CRC32C (Castagnoli) of bytes 0–23
//	28–31  reserved, zero
const (
	// LVBMagic identifies a clusterized counter LVB ("CSLV" as bytes).
	LVBMagic uint32 = 0x564c5343
	// LVBVersion is the layout this package writes: major 1, minor 0. A
	// block with a newer major is not understood and counts as unknown; a
	// newer minor of the same major is read.
	LVBVersion uint16 = 0x0100
)

// LVB flags.
const (
	// LVBDirty marks a value published before the metadata it announces is
	// durable (reserved: this package publishes only clean values).
	LVBDirty uint16 = 1 << 0
	// LVBRemoved marks a store whose cluster resource is being retired
	// (reserved).
	LVBRemoved uint16 = 1 << 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Counter is the value a clusterized LVB carries: it identifies one state of
// the shared metadata. Two equal Counters (same counter, same epoch) mean
// the metadata did not change in between; the counter is never reused and
// never goes backwards within an epoch, and every re-seed picks a fresh
// random epoch, so a value is never published twice for different states.
type Counter struct {
	Value uint64 // the counter; 0 is never published (counters start at 1)
	Epoch uint64 // random per re-seed and per merge
	Flags uint16 // LVBDirty, LVBRemoved
}

// EncodeLVB lays c out as a counter LVB.
func EncodeLVB(c Counter) lockc.LVB {
	var b lockc.LVB
	binary.LittleEndian.PutUint32(b[0:], LVBMagic)
	binary.LittleEndian.PutUint16(b[4:], LVBVersion)
	binary.LittleEndian.PutUint16(b[6:], c.Flags)
	binary.LittleEndian.PutUint64(b[8:], c.Value)
	binary.LittleEndian.PutUint64(b[16:], c.Epoch)
	binary.LittleEndian.PutUint32(b[24:], crc32.Checksum(b[:24], castagnoli))
	return b
}

// DecodeLVB reads a counter LVB. ok is false for a block that must be
// treated as unknown: all zeros (a fresh or forgotten resource), a wrong
// magic or CRC, a newer major layout version, or a zero counter.
func DecodeLVB(b lockc.LVB) (c Counter, ok bool) {
	if binary.LittleEndian.Uint32(b[0:]) != LVBMagic {
		return Counter{}, false
	}
	if binary.LittleEndian.Uint32(b[24:]) != crc32.Checksum(b[:24], castagnoli) {
		return Counter{}, false
	}
	if binary.LittleEndian.Uint16(b[4:])>>8 > LVBVersion>>8 {
		return Counter{}, false
	}
	c = Counter{
		Flags: binary.LittleEndian.Uint16(b[6:]),
		Value: binary.LittleEndian.Uint64(b[8:]),
		Epoch: binary.LittleEndian.Uint64(b[16:]),
	}
	if c.Value == 0 {
		return Counter{}, false
	}
	return c, true
}

// newEpoch returns a random, non-zero epoch.
func newEpoch() uint64 {
	var b [8]byte
	for {
		_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24+)
		if e := binary.LittleEndian.Uint64(b[:]); e != 0 {
			return e
		}
	}
}
