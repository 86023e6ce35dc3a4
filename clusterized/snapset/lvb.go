package snapset

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/clustersnap/clustersnap/lockc"
)

// The snapshot-set LVB layout, little-endian in the 32-byte lock value
// block:
//
//	0–3    magic (LVBMagic)
//	4      layout version (LVBVersion)
//	5      reserved, zero
//	6–7    count: how many snapshots the set holds
//	8–15   generation: 1 for the first set published on the resource,
//	       one more for every set published after it
//	16–31  digest: SHA-256 of the COW identities, truncated (Set.Digest)
//
// An all-zero block is no value (a fresh resource, or one every node
// forgot). A block with another magic or version is someone else's, or a
// newer clustersnap's: it is refused, never overwritten.
const (
	// LVBMagic identifies a snapshot-set LVB ("CSSS" as bytes).
	LVBMagic uint32 = 0x53535343
	// LVBVersion is the layout this package reads and writes.
	LVBVersion uint8 = 1
)

// ErrForeignValue is wrapped by the error for an LVB this package does not
// understand: another magic or layout version.
var ErrForeignValue = errors.New("the origin lock's value block is not a snapshot set this version understands")

// Value is what the origin lock's LVB publishes: the cluster's snapshot set
// by its size and digest, and the generation that numbers the sets
// published on the resource.
type Value struct {
	Count      uint16
	Generation uint64
	Digest     Digest
}

// String describes v for messages.
func (v Value) String() string {
	return fmt.Sprintf("%d snapshots, generation %d, digest %s", v.Count, v.Generation, v.Digest)
}

// EncodeLVB lays v out as a snapshot-set LVB.
func EncodeLVB(v Value) lockc.LVB {
	var b lockc.LVB
	binary.LittleEndian.PutUint32(b[0:], LVBMagic)
	b[4] = LVBVersion
	binary.LittleEndian.PutUint16(b[6:], v.Count)
	binary.LittleEndian.PutUint64(b[8:], v.Generation)
	copy(b[16:], v.Digest[:])
	return b
}

// DecodeLVB reads a snapshot-set LVB. ok is false, with a nil error, for
// no value: an all-zero block. A block of another magic or version, or
// with generation 0, fails with an error wrapping ErrForeignValue.
func DecodeLVB(b lockc.LVB) (v Value, ok bool, err error) {
	if b == (lockc.LVB{}) {
		return Value{}, false, nil
	}
	if m := binary.LittleEndian.Uint32(b[0:]); m != LVBMagic {
		return Value{}, false, fmt.Errorf("magic %#08x: %w", m, ErrForeignValue)
	}
	if b[4] != LVBVersion || b[5] != 0 {
		return Value{}, false, fmt.Errorf("layout version %d.%d (this one reads %d.0): %w", b[4], b[5], LVBVersion, ErrForeignValue)
	}
	v = Value{
		Count:      binary.LittleEndian.Uint16(b[6:]),
		Generation: binary.LittleEndian.Uint64(b[8:]),
	}
	copy(v.Digest[:], b[16:])
	if v.Generation == 0 {
		return Value{}, false, fmt.Errorf("generation 0: %w", ErrForeignValue)
	}
	return v, true, nil
}
