package cow

import (
	"errors"
	"fmt"
	"io"
	"unsafe"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// alignUp rounds n up to a multiple of align (a power of two, or 1).
func alignUp(n, align int64) int64 {
	if align <= 1 {
		return n
	}
	return (n + align - 1) &^ (align - 1)
}

// memAligned reports whether p starts at a multiple of align in memory.
func memAligned(p []byte, align int) bool {
	return len(p) == 0 || uintptr(unsafe.Pointer(unsafe.SliceData(p)))%uintptr(align) == 0
}

// ioAligned reports whether p at off can go to dev as it is.
func ioAligned(dev blockdev.Device, p []byte, off int64) bool {
	a := dev.Alignment()
	return a <= 1 || (off%int64(a) == 0 && len(p)%a == 0 && memAligned(p, a))
}

// readDev fills p from dev at off. For a device that needs aligned I/O it
// reads the enclosing aligned range into a bounce buffer (the last block of
// a device whose size is not a multiple of the alignment may come back
// short; only the bytes p needs must be there).
func readDev(dev blockdev.Device, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if ioAligned(dev, p, off) {
		n, err := dev.ReadAt(p, off)
		return shortRead(n, len(p), err)
	}
	a := int64(dev.Alignment())
	start := off &^ (a - 1)
	end := alignUp(off+int64(len(p)), a)
	buf := blockdev.AlignedBuffer(int(end-start), int(a))
	n, err := dev.ReadAt(buf, start)
	need := int(off - start + int64(len(p)))
	if err := shortRead(n, need, err); err != nil {
		return err
	}
	copy(p, buf[off-start:])
	return nil
}

// shortRead turns a read of n bytes out of the need asked for into an error
// unless all of them arrived (io.ReaderAt may report io.EOF with them).
func shortRead(n, need int, err error) error {
	if n >= need {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("read %d of %d bytes: %w", n, need, err)
}

// ErrUnaligned is wrapped by writes that are not aligned to the I/O alignment
// a device needs (O_DIRECT devices).
var ErrUnaligned = errors.New("write is not aligned to the device's I/O alignment")

// checkWriteAlignment refuses a write of n bytes at off that dev could not
// take as it is, before any copy-on-write work is done for it.
func checkWriteAlignment(dev blockdev.Device, off, n int64) error {
	if a := int64(dev.Alignment()); a > 1 && (off%a != 0 || n%a != 0) {
		return fmt.Errorf("%d bytes at %d (alignment %d of %s): %w", n, off, a, dev.Name(), ErrUnaligned)
	}
	return nil
}

// writeDev writes p to dev at off, durably before it returns with fua. An
// unaligned range on a device that needs alignment is refused rather than
// read-modify-written, which could lose a concurrent write to the rest of
// the block; an unaligned buffer goes through a bounce buffer.
func writeDev(dev blockdev.Device, p []byte, off int64, fua bool) error {
	if len(p) == 0 {
		if fua {
			return dev.Sync()
		}
		return nil
	}
	if !ioAligned(dev, p, off) {
		if err := checkWriteAlignment(dev, off, int64(len(p))); err != nil {
			return err
		}
		buf := blockdev.AlignedBuffer(len(p), dev.Alignment())
		copy(buf, p)
		p = buf
	}
	var err error
	if fua {
		_, err = dev.WriteAtSync(p, off)
	} else {
		_, err = dev.WriteAt(p, off)
	}
	return err
}
