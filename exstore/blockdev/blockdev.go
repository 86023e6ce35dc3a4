package blockdev

import "io"

// Device is storage addressed by byte offset.
//
// ReadAt and WriteAt follow io.ReaderAt and io.WriterAt; a completed WriteAt
// may still sit in a volatile cache until Sync. Offsets, lengths and buffers
// must be multiples of Alignment (and buffers aligned in memory to it; see
// AlignedBuffer) when it is larger than 1.
type Device interface {
	io.ReaderAt
	io.WriterAt

	// Name identifies the device in errors and logs (usually its path).
	Name() string

	// Size is the device size in bytes.
	Size() int64

	// Alignment is the offset, length and memory alignment I/O needs: 1 for
	// buffered files, the logical block size with O_DIRECT.
	Alignment() int

	// Sync makes every completed write durable (a cache flush).
	Sync() error

	// WriteAtSync writes p at off and makes that write durable before it
	// returns (FUA). It need not make other writes durable (a real file's
	// RWF_DSYNC or fdatasync may); callers must not rely on either.
	WriteAtSync(p []byte, off int64) (int, error)

	// Close releases the device.
	Close() error
}

// Discarder is a Device that can drop the content of a range, reading back as
// zeroes afterwards (hole punching on files, BLKZEROOUT-backed discards on
// block devices).
type Discarder interface {
	Discard(off, length int64) error
}
