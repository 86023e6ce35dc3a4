//go:build linux

package blockdev

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// defaultDirectAlignment is the O_DIRECT alignment assumed for a regular file
// when the kernel does not report one (statx STATX_DIOALIGN, Linux 6.1+): the
// page size, which every filesystem that supports O_DIRECT accepts.
const defaultDirectAlignment = 4096

// zeroOutGranularity is the unit BLKZEROOUT works in: the kernel rejects
// ranges that are not whole 512-byte sectors.
const zeroOutGranularity = 512

// zeroWriteChunk bounds the buffer used when a discard falls back to writing
// zeroes.
const zeroWriteChunk = 1 << 20

// Options control how Open opens a device.
type Options struct {
	// ReadOnly opens the device for reading only; writes and discards fail
	// with ErrReadOnly.
	ReadOnly bool

	// Direct bypasses the page cache (O_DIRECT). Offsets, lengths and buffer
	// addresses must then be multiples of Alignment.
	Direct bool

	// Exclusive takes a non-blocking exclusive flock on the device for as
	// long as it is open, so that two processes cannot serve the same device;
	// Open fails with ErrInUse if another open holds it.
	Exclusive bool
}

// File is a Device backed by a regular file or a block device. Its methods
// are safe for concurrent use.
type File struct {
	name     string
	file     *os.File
	fd       int // file's descriptor, valid while closed is false
	size     int64
	align    int
	blockDev bool
	readOnly bool

	// dsyncUnsupported remembers that this file's kernel or filesystem
	// rejected pwritev2(RWF_DSYNC), so WriteAtSync goes straight to
	// pwrite+fdatasync.
	dsyncUnsupported atomic.Bool

	// closeMu is held shared by every operation on fd and exclusively by
	// Close, so that Close cannot close the descriptor (and the kernel
	// reuse its number) under an operation. Our own lock rather than the
	// os.File's (SyscallConn().Control) because Control takes its function
	// through an interface, which costs every I/O an allocation.
	closeMu sync.RWMutex
	closed  bool
}

var (
	_ Device    = (*File)(nil)
	_ Discarder = (*File)(nil)
)

// Open opens the regular file or block device at path.
func Open(path string, opts Options) (*File, error) {
	flags := os.O_RDWR
	if opts.ReadOnly {
		flags = os.O_RDONLY
	}
	if opts.Direct {
		flags |= unix.O_DIRECT
	}
	osFile, err := os.OpenFile(path, flags, 0)
	if err != nil {
		if opts.Direct && errors.Is(err, syscall.EINVAL) {
			return nil, fmt.Errorf("blockdev: %w (the filesystem may not support O_DIRECT)", err)
		}
		return nil, fmt.Errorf("blockdev: %w", err)
	}
	f := &File{name: path, file: osFile, readOnly: opts.ReadOnly}
	if err := f.setUp(opts); err != nil {
		osFile.Close()
		return nil, err
	}
	return f, nil
}

// setUp finds the kind, size and alignment of a freshly opened device and
// takes the exclusive lock if asked to.
func (f *File) setUp(opts Options) error {
	conn, err := f.file.SyscallConn()
	if err != nil {
		return fmt.Errorf("blockdev %s: %w", f.name, err)
	}
	if err := conn.Control(func(fd uintptr) { f.fd = int(fd) }); err != nil {
		return fmt.Errorf("blockdev %s: %w", f.name, err)
	}
	return f.withFD(func(fd int) error {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return fmt.Errorf("blockdev %s: fstat: %w", f.name, err)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			f.size = st.Size
		case unix.S_IFBLK:
			f.blockDev = true
			size, err := blockDeviceSize(fd)
			if err != nil {
				return fmt.Errorf("blockdev %s: ioctl BLKGETSIZE64: %w", f.name, err)
			}
			f.size = size
		default:
			return fmt.Errorf("blockdev %s: not a regular file or block device (mode %#o)", f.name, st.Mode)
		}

		f.align = 1
		if opts.Direct {
			if f.blockDev {
				sectorSize, err := unix.IoctlGetUint32(fd, unix.BLKSSZGET)
				if err != nil {
					return fmt.Errorf("blockdev %s: ioctl BLKSSZGET: %w", f.name, err)
				}
				f.align = int(sectorSize)
			} else {
				f.align = fileDirectAlignment(fd)
			}
		}

		if opts.Exclusive {
			err := retryEINTR(func() error { return unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) })
			if errors.Is(err, unix.EWOULDBLOCK) {
				return fmt.Errorf("blockdev %s: %w", f.name, ErrInUse)
			}
			if err != nil {
				return fmt.Errorf("blockdev %s: flock: %w", f.name, err)
			}
		}
		return nil
	})
}

// blockDeviceSize returns the size in bytes of the block device open on fd.
func blockDeviceSize(fd int) (int64, error) {
	var size uint64
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&size)))
	if errno != 0 {
		return 0, errno
	}
	return int64(size), nil
}

// fileDirectAlignment returns the O_DIRECT alignment of the regular file open
// on fd: the larger of the offset and memory alignments the kernel reports, or
// defaultDirectAlignment when it reports none.
func fileDirectAlignment(fd int) int {
	var stx unix.Statx_t
	err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
	if err != nil || stx.Mask&unix.STATX_DIOALIGN == 0 || stx.Dio_offset_align == 0 {
		return defaultDirectAlignment
	}
	return int(max(stx.Dio_offset_align, stx.Dio_mem_align))
}

// Name returns the path the device was opened with.
func (f *File) Name() string { return f.name }

// Size returns the device size in bytes, as found at Open.
func (f *File) Size() int64 { return f.size }

// Alignment returns 1 for buffered I/O and the logical block size with Direct.
func (f *File) Alignment() int { return f.align }

// ReadAt reads len(p) bytes at off. Like io.ReaderAt it returns io.EOF when
// the device ends before p is full.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("blockdev %s: read at offset %d: negative offset: %w", f.name, off, syscall.EINVAL)
	}
	if err := f.checkAligned("read", p, off); err != nil {
		return 0, err
	}
	n := 0
	err := f.withFD(func(fd int) error {
		for n < len(p) {
			m, err := unix.Pread(fd, p[n:], off+int64(n))
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if m == 0 {
				return io.EOF
			}
			n += m
			// A short read that reaches the end is the end: asking again
			// would cost a syscall, and an O_DIRECT retry at the now
			// misaligned offset could be refused.
			if n < len(p) && off+int64(n) >= f.size {
				return io.EOF
			}
		}
		return nil
	})
	if err == io.EOF {
		return n, io.EOF
	}
	if err != nil {
		return n, fmt.Errorf("blockdev %s: read at offset %d length %d: %w", f.name, off, len(p), err)
	}
	return n, nil
}

// WriteAt writes p at off. The write may sit in a volatile cache until Sync.
func (f *File) WriteAt(p []byte, off int64) (int, error) {
	if err := f.checkWritable("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := f.checkAligned("write", p, off); err != nil {
		return 0, err
	}
	n, err := f.pwrite(p, off, 0)
	if err != nil {
		return n, fmt.Errorf("blockdev %s: write at offset %d length %d: %w", f.name, off, len(p), err)
	}
	return n, nil
}

// Sync makes every completed write durable (fdatasync).
func (f *File) Sync() error {
	err := f.withFD(func(fd int) error {
		return retryEINTR(func() error { return unix.Fdatasync(fd) })
	})
	if err != nil {
		return fmt.Errorf("blockdev %s: fdatasync: %w", f.name, err)
	}
	return nil
}

// WriteAtSync writes p at off and makes it durable before returning, with
// pwritev2(RWF_DSYNC) where the kernel supports it and pwrite+fdatasync
// otherwise (the fallback also makes other completed writes durable, which
// is allowed).
func (f *File) WriteAtSync(p []byte, off int64) (int, error) {
	if err := f.checkWritable("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := f.checkAligned("write", p, off); err != nil {
		return 0, err
	}
	triedDsync := false
	if !f.dsyncUnsupported.Load() {
		n, err := f.pwrite(p, off, unix.RWF_DSYNC)
		if err == nil {
			return n, nil
		}
		if n > 0 || !dsyncUnsupported(err) {
			return n, fmt.Errorf("blockdev %s: write (RWF_DSYNC) at offset %d length %d: %w", f.name, off, len(p), err)
		}
		triedDsync = true
	}
	n, err := f.pwrite(p, off, 0)
	if err != nil {
		return n, fmt.Errorf("blockdev %s: write at offset %d length %d: %w", f.name, off, len(p), err)
	}
	if err := f.Sync(); err != nil {
		return n, err
	}
	if triedDsync {
		// Remembered only once the plain write has worked: that shows
		// the refusal concerned the flag, not this request.
		f.dsyncUnsupported.Store(true)
	}
	return n, nil
}

// dsyncUnsupported reports whether err from pwritev2(RWF_DSYNC) means the
// syscall or the flag is not supported.
func dsyncUnsupported(err error) bool {
	return errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)
}

// Discard makes [off, off+length) read back as zeroes: a punched hole in a
// regular file (or written zeroes where the filesystem cannot punch), a
// BLKZEROOUT on a block device, which needs whole 512-byte sectors.
func (f *File) Discard(off, length int64) error {
	if err := f.checkWritable("discard", off, length); err != nil {
		return err
	}
	if f.align > 1 && (off%int64(f.align) != 0 || length%int64(f.align) != 0) {
		return fmt.Errorf("blockdev %s: discard at offset %d length %d: offset and length must be multiples of %d: %w",
			f.name, off, length, f.align, syscall.EINVAL)
	}
	if length == 0 {
		return nil
	}
	if f.blockDev {
		return f.zeroOutBlocks(off, length)
	}
	err := f.withFD(func(fd int) error {
		return retryEINTR(func() error {
			return unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		})
	})
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return f.writeZeroes(off, length)
	}
	if err != nil {
		return fmt.Errorf("blockdev %s: punch hole at offset %d length %d: %w", f.name, off, length, err)
	}
	return nil
}

// zeroOutBlocks zeroes a range of a block device with BLKZEROOUT, which also
// drops the range from the page cache.
func (f *File) zeroOutBlocks(off, length int64) error {
	if off%zeroOutGranularity != 0 || length%zeroOutGranularity != 0 {
		return fmt.Errorf("blockdev %s: discard at offset %d length %d: block devices zero whole %d-byte sectors: %w",
			f.name, off, length, zeroOutGranularity, syscall.EINVAL)
	}
	zeroRange := [2]uint64{uint64(off), uint64(length)}
	err := f.withFD(func(fd int) error {
		return retryEINTR(func() error {
			_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKZEROOUT, uintptr(unsafe.Pointer(&zeroRange)))
			if errno != 0 {
				return errno
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("blockdev %s: ioctl BLKZEROOUT at offset %d length %d: %w", f.name, off, length, err)
	}
	return nil
}

// writeZeroes writes zeroes over [off, off+length), the discard of last resort
// for filesystems that cannot punch holes. The range is already checked.
func (f *File) writeZeroes(off, length int64) error {
	zeroes := AlignedBuffer(int(min(length, zeroWriteChunk)), f.align)
	for done := int64(0); done < length; {
		chunk := zeroes[:min(int64(len(zeroes)), length-done)]
		if _, err := f.pwrite(chunk, off+done, 0); err != nil {
			return fmt.Errorf("blockdev %s: discard by writing zeroes at offset %d: %w", f.name, off+done, err)
		}
		done += int64(len(chunk))
	}
	return nil
}

// Close closes the device, releasing its exclusive lock if it holds one.
func (f *File) Close() error {
	f.closeMu.Lock()
	f.closed = true
	f.closeMu.Unlock()
	if err := f.file.Close(); err != nil {
		return fmt.Errorf("blockdev %s: close: %w", f.name, err)
	}
	return nil
}

// pwrite writes all of p at off with pwritev2 flags (plain pwrite for 0),
// continuing after short writes and EINTR.
func (f *File) pwrite(p []byte, off int64, flags int) (int, error) {
	n := 0
	err := f.withFD(func(fd int) error {
		for n < len(p) {
			var m int
			var err error
			if flags == 0 {
				m, err = unix.Pwrite(fd, p[n:], off+int64(n))
			} else {
				m, err = unix.Pwritev2(fd, [][]byte{p[n:]}, off+int64(n), flags)
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if m == 0 {
				return io.ErrShortWrite
			}
			n += m
		}
		return nil
	})
	return n, err
}

// withFD runs op on the descriptor while holding a reference to it, so a
// concurrent Close cannot close it (and the kernel reuse its number) under op.
func (f *File) withFD(op func(fd int) error) error {
	f.closeMu.RLock()
	defer f.closeMu.RUnlock()
	if f.closed {
		return fmt.Errorf("blockdev %s: %w", f.name, fs.ErrClosed)
	}
	return op(f.fd)
}

// checkWritable checks that a write or discard of [off, off+length) is allowed
// and fits inside the device.
func (f *File) checkWritable(op string, off, length int64) error {
	if f.readOnly {
		return fmt.Errorf("blockdev %s: %s at offset %d: %w", f.name, op, off, ErrReadOnly)
	}
	if off < 0 || length < 0 || off > f.size-length {
		return fmt.Errorf("blockdev %s: %s at offset %d length %d (device size %d): %w", f.name, op, off, length, f.size, ErrOutOfRange)
	}
	return nil
}

// checkAligned rejects, on a Direct device, a request the kernel would refuse
// with a bare EINVAL.
func (f *File) checkAligned(op string, p []byte, off int64) error {
	if f.align == 1 {
		return nil
	}
	a := int64(f.align)
	if off%a == 0 && int64(len(p))%a == 0 && isAligned(p, f.align) {
		return nil
	}
	return fmt.Errorf("blockdev %s: %s at offset %d length %d: O_DIRECT needs offset, length and buffer address to be multiples of %d: %w",
		f.name, op, off, len(p), f.align, syscall.EINVAL)
}

// retryEINTR runs call until it fails with something other than EINTR.
func retryEINTR(call func() error) error {
	for {
		if err := call(); err != unix.EINTR {
			return err
		}
	}
}
