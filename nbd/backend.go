package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"syscall"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Backend is the storage behind an export: the COW engine, or a plain device
// through DeviceBackend. Its methods are called concurrently, from several
// requests of one connection and from several connections.
type Backend interface {
	// Size is the export size in bytes; it does not change while served.
	Size() int64

	// ReadAt fills p from off. The server has checked that the range lies
	// inside the export.
	ReadAt(ctx context.Context, p []byte, off int64) error

	// WriteAt writes p at off. With fua the write must be durable before
	// WriteAt returns; without it, only after a later Flush.
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error

	// Flush makes every write that has returned durable.
	Flush(ctx context.Context) error
}

// Trimmer is a Backend that can drop the content of a range (NBD_CMD_TRIM).
// Trim is a hint: afterwards the range may read as zeroes or as its old
// content. With fua the result must be durable before Trim returns.
type Trimmer interface {
	Trim(ctx context.Context, off, length int64, fua bool) error
}

// ZeroOptions qualify a WriteZeroes call.
type ZeroOptions struct {
	// NoHole asks that the range stay allocated (written zeroes, not a hole).
	NoHole bool
	// Fast asks the backend to fail with ErrZeroNotFast, without changing
	// anything, unless zeroing is cheaper than writing zeroes.
	Fast bool
	// FUA asks that the zeroes be durable before WriteZeroes returns.
	FUA bool
}

// ErrZeroNotFast is returned by Zeroer.WriteZeroes with ZeroOptions.Fast when
// the backend can only zero by writing; the client then gets ENOTSUP and
// falls back to its own writes.
var ErrZeroNotFast = errors.New("zeroing is not faster than writing zeroes")

// Zeroer is a Backend that can zero a range more cheaply than by writing
// zero-filled buffers (NBD_CMD_WRITE_ZEROES). Backends that are not Zeroers
// get zeroes written through WriteAt.
type Zeroer interface {
	WriteZeroes(ctx context.Context, off, length int64, opts ZeroOptions) error
}

// Extent is a run of bytes with the same allocation state, as reported for
// the base:allocation metadata context.
type Extent struct {
	// Length is the extent length in bytes, more than zero.
	Length int64
	// Hole reports that the run is not allocated.
	Hole bool
	// Zero reports that the run reads as zeroes.
	Zero bool
}

// Extenter is a Backend that knows which parts of it are allocated
// (NBD_CMD_BLOCK_STATUS). Backends that are not Extenters report every range
// as allocated data, which is always a correct answer.
type Extenter interface {
	// Extents describes [off, off+length) from off onwards, in order. It may
	// stop short of off+length but must describe at least one byte, and
	// extents past off+length are clipped by the server.
	Extents(ctx context.Context, off, length int64) ([]Extent, error)
}

// MetaContextExceptions is the metadata context of clustersnap's changed-block
// map: for a snapshot, which parts of it have an exception in its COW store
// (their data lives there, not on the origin). Block status flag bit 0
// (COWExtentInCOW) is set on those. Offered for exports whose backend is a
// COWMapper.
const MetaContextExceptions = "clustersnap:exceptions"

// COWExtentInCOW is the MetaContextExceptions block status flag of an extent
// whose data is in the COW store.
const COWExtentInCOW uint32 = 1 << 0

// COWExtent is a run of bytes that is either all in the COW store or all
// not, as reported for MetaContextExceptions.
type COWExtent struct {
	// Length is the extent length in bytes, more than zero.
	Length int64
	// InCOW reports that the run has exceptions in the COW store.
	InCOW bool
}

// COWMapper is a Backend that knows which of its ranges have exceptions in a
// COW store; such exports offer the MetaContextExceptions metadata context.
type COWMapper interface {
	// COWExtents describes [off, off+length) from off onwards, in order,
	// with the same contract as Extenter.Extents: at least one byte,
	// clipped by the server.
	COWExtents(ctx context.Context, off, length int64) ([]COWExtent, error)
}

// DirtyBitmapNamespace is the prefix of the changed-block tracking metadata
// contexts, named as qemu names its dirty bitmaps so that backup tools built
// on qemu and libnbd read them: the context DirtyBitmapNamespace+NAME is the
// bitmap NAME. Block status flag bit 0 (DirtyExtentDirty, qemu's
// NBD_STATE_DIRTY) is set on the ranges that may have changed since the
// point in time the bitmap tracks from; a clear bit promises the range did
// not. Offered for exports whose backend is a DirtyBitmapper.
const DirtyBitmapNamespace = "qemu:dirty-bitmap:"

// DirtyExtentDirty is the dirty-bitmap block status flag of an extent that
// may have changed.
const DirtyExtentDirty uint32 = 1 << 0

// DirtyExtent is a run of bytes that is all dirty or all clean in a dirty
// bitmap.
type DirtyExtent struct {
	// Length is the extent length in bytes, more than zero.
	Length int64
	// Dirty reports that the run may have changed.
	Dirty bool
}

// ErrNoSuchBitmap is wrapped by DirtyBitmapper.DirtyExtents for a bitmap the
// backend does not have (any more): a client that selected it gets an error
// for its block status requests.
var ErrNoSuchBitmap = errors.New("no such dirty bitmap")

// DirtyBitmapper is a Backend that tracks changed blocks in named bitmaps;
// such exports offer one DirtyBitmapNamespace metadata context per bitmap.
// The set of bitmaps may change while the export is served: the server asks
// DirtyBitmaps whenever a client lists or selects contexts.
type DirtyBitmapper interface {
	// DirtyBitmaps returns the names of the bitmaps there are now.
	DirtyBitmaps() []string
	// DirtyExtents describes [off, off+length) of bitmap from off onwards,
	// in order, with the same contract as Extenter.Extents. A bitmap that
	// cannot be trusted (its snapshot is invalid) gives an error, never a
	// map; one that is gone gives an error wrapping ErrNoSuchBitmap.
	DirtyExtents(ctx context.Context, bitmap string, off, length int64) ([]DirtyExtent, error)
}

// BlockSizer is a Backend that needs requests aligned to a minimum block size
// (an O_DIRECT device). The server advertises it through NBD_INFO_BLOCK_SIZE
// and refuses misaligned requests with EINVAL.
type BlockSizer interface {
	MinBlockSize() int
}

// DeviceBackend serves a blockdev.Device as an export: ReadAt and WriteAt
// (WriteAtSync for FUA), Sync for flushes and, when the device is a
// blockdev.Discarder, Discard for trims and fast zeroing.
type DeviceBackend struct {
	dev       blockdev.Device
	discarder blockdev.Discarder
	// discardUnit is the granularity discards are done in: the device's
	// alignment, but at least the 512-byte sectors block devices zero in.
	discardUnit int64
}

// deviceDiscardSector is the unit BLKZEROOUT needs on block devices; discards
// are rounded inwards to it and the ragged edges are written as zeroes.
const deviceDiscardSector = 512

// zeroWriteChunk bounds the buffer used when zeroes have to be written.
const zeroWriteChunk = 1 << 20

// NewDeviceBackend returns a Backend serving dev. The backend does not own
// dev: closing it is the caller's job once the server is done.
func NewDeviceBackend(dev blockdev.Device) *DeviceBackend {
	b := &DeviceBackend{dev: dev, discardUnit: max(int64(dev.Alignment()), deviceDiscardSector)}
	if d, ok := dev.(blockdev.Discarder); ok {
		b.discarder = d
	}
	return b
}

// Size returns the device size.
func (b *DeviceBackend) Size() int64 { return b.dev.Size() }

// MinBlockSize returns the device's I/O alignment.
func (b *DeviceBackend) MinBlockSize() int { return b.dev.Alignment() }

// ReadAt reads all of p at off.
func (b *DeviceBackend) ReadAt(_ context.Context, p []byte, off int64) error {
	n, err := b.dev.ReadAt(p, off)
	if err == io.EOF && n == len(p) {
		return nil
	}
	if err == io.EOF {
		return fmt.Errorf("device %s: read at offset %d: short read of %d of %d bytes: %w", b.dev.Name(), off, n, len(p), io.ErrUnexpectedEOF)
	}
	return err
}

// WriteAt writes p at off, with WriteAtSync when fua is set.
func (b *DeviceBackend) WriteAt(_ context.Context, p []byte, off int64, fua bool) error {
	var err error
	if fua {
		_, err = b.dev.WriteAtSync(p, off)
	} else {
		_, err = b.dev.WriteAt(p, off)
	}
	return err
}

// Flush syncs the device.
func (b *DeviceBackend) Flush(context.Context) error { return b.dev.Sync() }

// Trim discards the whole discard units inside the range; the edges are left
// alone since a trim is only a hint.
func (b *DeviceBackend) Trim(ctx context.Context, off, length int64, fua bool) error {
	if b.discarder == nil {
		return nil
	}
	start, end := b.innerUnits(off, length)
	if start < end {
		if err := b.discarder.Discard(start, end-start); err != nil {
			return err
		}
	}
	if fua {
		return b.dev.Sync()
	}
	return nil
}

// WriteZeroes zeroes the range: by discarding its whole discard units (a
// punched hole reads as zeroes) and writing zeroes around them, or by writing
// zeroes throughout when a hole is not wanted or the device cannot discard.
func (b *DeviceBackend) WriteZeroes(ctx context.Context, off, length int64, opts ZeroOptions) error {
	if opts.NoHole || b.discarder == nil {
		if opts.Fast {
			return ErrZeroNotFast
		}
		if err := b.writeZeroes(ctx, off, length); err != nil {
			return err
		}
	} else {
		start, end := b.innerUnits(off, length)
		if start >= end {
			start, end = off, off
		}
		if err := b.writeZeroes(ctx, off, start-off); err != nil {
			return err
		}
		if start < end {
			if err := b.discarder.Discard(start, end-start); err != nil {
				return err
			}
		}
		if err := b.writeZeroes(ctx, end, off+length-end); err != nil {
			return err
		}
	}
	if opts.FUA {
		return b.dev.Sync()
	}
	return nil
}

// innerUnits returns the largest range of whole discard units inside
// [off, off+length); start >= end when there is none.
func (b *DeviceBackend) innerUnits(off, length int64) (start, end int64) {
	u := b.discardUnit
	start = (off + u - 1) / u * u
	end = (off + length) / u * u
	return start, end
}

// writeZeroes writes zero-filled buffers over [off, off+length).
func (b *DeviceBackend) writeZeroes(ctx context.Context, off, length int64) error {
	if length <= 0 {
		return nil
	}
	zeroes := blockdev.AlignedBuffer(int(min(length, zeroWriteChunk)), max(b.dev.Alignment(), 1))
	for done := int64(0); done < length; {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("device %s: write zeroes at offset %d: %w", b.dev.Name(), off+done, err)
		}
		chunk := zeroes[:min(int64(len(zeroes)), length-done)]
		if _, err := b.dev.WriteAt(chunk, off+done); err != nil {
			return err
		}
		done += int64(len(chunk))
	}
	return nil
}

// replyErrno maps a backend error to the errno sent to the client.
func replyErrno(err error, write bool) uint32 {
	var errno syscall.Errno
	switch {
	case errors.Is(err, ErrZeroNotFast):
		return errNotSup
	case errors.Is(err, blockdev.ErrReadOnly):
		return errPerm
	case errors.Is(err, blockdev.ErrOutOfRange):
		if write {
			return errNoSpc
		}
		return errInval
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return errShutdown
	case errors.As(err, &errno):
		switch errno {
		case syscall.EPERM, syscall.EROFS, syscall.EACCES:
			return errPerm
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return errNoSpc
		case syscall.ENOMEM:
			return errNoMem
		case syscall.EINVAL:
			return errInval
		}
	}
	return errIO
}
