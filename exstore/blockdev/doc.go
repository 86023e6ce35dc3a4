// Package blockdev is the device layer under the exception stores and the COW
// engine: a Device is a regular file or a block device (or, in tests, the
// fault-injecting memory device of package faultdev) with a size,
// positioned I/O, durable writes and, as the optional Discarder capability,
// discards.
//
// The Device contract:
//   - ReadAt and WriteAt follow io.ReaderAt and io.WriterAt and may be called
//     concurrently. ReadAt returns io.EOF when the device ends before the
//     buffer is full; a write or discard past the end fails with
//     ErrOutOfRange (a device never grows).
//   - A completed WriteAt may sit in a volatile cache: only Sync (a cache
//     flush of every completed write) or WriteAtSync makes it durable.
//   - WriteAtSync has FUA semantics: that one write is durable when it
//     returns. It may or may not make other writes durable, and callers must
//     not rely on either.
//   - When Alignment is larger than 1 (O_DIRECT), offsets, lengths and buffer
//     addresses must be multiples of it; AlignedBuffer allocates such
//     buffers. A misaligned request fails with an error wrapping EINVAL
//     before it reaches the kernel.
//   - A Discarder's discarded range reads back as zeroes.
//
// File, the implementation over a regular file or a block device, is
// Linux-only: it uses pread/pwrite, pwritev2(RWF_DSYNC) for WriteAtSync
// (pwrite plus fdatasync where the kernel or filesystem refuses the flag),
// fdatasync for Sync, hole punching or BLKZEROOUT for Discard, and statx or
// BLKSSZGET for the O_DIRECT alignment. Options.Exclusive takes a
// non-blocking exclusive flock for as long as the device is open, so a
// second process opening it with Exclusive fails with ErrInUse. File's
// methods are safe for concurrent use, and Close waits for operations in
// flight on the descriptor.
package blockdev
