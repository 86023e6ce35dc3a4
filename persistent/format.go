package persistent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"

	"github.com/clustersnap/clustersnap/exstore"
)

// On-disk constants of the kernel's persistent exception store
// (drivers/md/dm-snap-persistent.c).
const (
	// Magic is the header magic; on disk its little-endian bytes read "SnAp".
	Magic uint32 = 0x70416E53
	// Version is the only metadata version the kernel (and we) accept.
	Version uint32 = 1
	// DefaultChunkSectors is the kernel's chunk size for a new store opened
	// with chunk size 0: 16 KiB. (lvcreate -s defaults to 4 KiB instead.)
	DefaultChunkSectors uint32 = 32
	// MaxChunkSectors is the largest chunk size the kernel accepts: 1 GiB.
	MaxChunkSectors uint32 = 1 << 21
	// RecordSize is the size of one on-disk exception record.
	RecordSize = 16
	// HeaderSize is the meaningful part of chunk 0; the rest is zero.
	HeaderSize = 16
)

// ErrCorrupt is wrapped by every error about metadata that cannot be trusted.
var ErrCorrupt = errors.New("corrupt snapshot metadata")

// Header is the content of chunk 0.
type Header struct {
	Magic        uint32
	Valid        uint32 // 0: invalidated; anything else is valid
	Version      uint32
	ChunkSectors uint32
}

// DecodeHeader reads the first HeaderSize bytes of b.
func DecodeHeader(b []byte) Header {
	return Header{
		Magic:        binary.LittleEndian.Uint32(b[0:]),
		Valid:        binary.LittleEndian.Uint32(b[4:]),
		Version:      binary.LittleEndian.Uint32(b[8:]),
		ChunkSectors: binary.LittleEndian.Uint32(b[12:]),
	}
}

// Encode writes h into the first HeaderSize bytes of b.
func (h Header) Encode(b []byte) {
	binary.LittleEndian.PutUint32(b[0:], h.Magic)
	binary.LittleEndian.PutUint32(b[4:], h.Valid)
	binary.LittleEndian.PutUint32(b[8:], h.Version)
	binary.LittleEndian.PutUint32(b[12:], h.ChunkSectors)
}

// Check refuses a header the kernel would refuse, and chunk sizes that crashed
// old kernels, with the bytes found. A zero magic (a new store) is not an
// error of Check; callers decide whether to format.
func (h Header) Check() error {
	if h.Magic != Magic {
		var raw [4]byte
		binary.LittleEndian.PutUint32(raw[:], h.Magic)
		return fmt.Errorf("%w: bad magic % x (want 53 6e 41 70, \"SnAp\"): not a dm-snapshot persistent COW", ErrCorrupt, raw)
	}
	if h.Version != Version {
		return fmt.Errorf("%w: metadata version %d is not supported (only %d)", ErrCorrupt, h.Version, Version)
	}
	if err := CheckChunkSectors(h.ChunkSectors); err != nil {
		return fmt.Errorf("%w: header: %w", ErrCorrupt, err)
	}
	return nil
}

// CheckChunkSectors applies the kernel's chunk-size rules: a power of two, at
// least one sector, at most MaxChunkSectors.
func CheckChunkSectors(c uint32) error {
	switch {
	case c == 0:
		return fmt.Errorf("chunk size 0")
	case bits.OnesCount32(c) != 1:
		return fmt.Errorf("chunk size %d sectors is not a power of two", c)
	case c > MaxChunkSectors:
		return fmt.Errorf("chunk size %d sectors is larger than the maximum %d (1 GiB)", c, MaxChunkSectors)
	}
	return nil
}

// Geometry is the layout of a COW device for one chunk size.
type Geometry struct {
	ChunkSectors uint32
	ChunkBytes   int64
	PerArea      uint64 // E: exception records per metadata area
	Chunks       uint64 // N: whole chunks on the device
}

// NewGeometry computes the layout of a device of size bytes.
func NewGeometry(chunkSectors uint32, size int64) Geometry {
	cb := int64(chunkSectors) * exstore.SectorSize
	return Geometry{
		ChunkSectors: chunkSectors,
		ChunkBytes:   cb,
		PerArea:      uint64(cb) / RecordSize,
		Chunks:       uint64(size / cb),
	}
}

// AreaLocation is the chunk holding metadata area i: 1 + (E+1)·i.
func (g Geometry) AreaLocation(i uint64) exstore.Chunk {
	return exstore.Chunk(1 + (g.PerArea+1)*i)
}

// IsMetadata reports whether chunk c is the header or a metadata area.
func (g Geometry) IsMetadata(c exstore.Chunk) bool {
	return c == 0 || uint64(c)%(g.PerArea+1) == 1
}

// Capacity is how many exceptions fit: every data chunk, except that the last
// area may not fill when no next area fits after it (a loader would find no
// terminator).
func (g Geometry) Capacity() uint64 {
	if g.Chunks < 2 {
		return 0
	}
	n := g.Chunks - 2 - (g.Chunks-2)/(g.PerArea+1)
	if g.Chunks%(g.PerArea+1) == 1 && n > 0 {
		n--
	}
	return n
}

// skipMetadata returns c, or c+1 when c is an area location: the kernel's
// rule for next_free.
func (g Geometry) skipMetadata(c uint64) uint64 {
	if c%(g.PerArea+1) == 1 {
		c++
	}
	return c
}

// DecodeRecord reads record slot i of an area image b.
func DecodeRecord(b []byte, i int) exstore.Exception {
	o := i * RecordSize
	return exstore.Exception{
		Old: exstore.Chunk(binary.LittleEndian.Uint64(b[o:])),
		New: exstore.Chunk(binary.LittleEndian.Uint64(b[o+8:])),
	}
}

// EncodeRecord writes e into record slot i of b.
func EncodeRecord(b []byte, i int, e exstore.Exception) {
	o := i * RecordSize
	binary.LittleEndian.PutUint64(b[o:], uint64(e.Old))
	binary.LittleEndian.PutUint64(b[o+8:], uint64(e.New))
}
