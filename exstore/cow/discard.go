package cow

import (
	"context"
	"fmt"
	"sync"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// zeroBufferBytes bounds the zero-filled buffer an origin or a snapshot
// writes zeroes from: a request for more is written in pieces of it.
const zeroBufferBytes = 1 << 20

// discardSector is the smallest unit a discard is done in: block devices
// zero whole 512-byte sectors (BLKZEROOUT), so ranges are rounded inwards
// to it (or to a larger I/O alignment).
const discardSector = 512

// zeroBuffer returns a function that allocates a zero-filled buffer of n
// bytes aligned to align on its first call and returns that same buffer
// from then on. The buffer is only ever read.
func zeroBuffer(n int64, align int) func() []byte {
	return sync.OnceValue(func() []byte {
		return blockdev.AlignedBuffer(int(n), max(align, 1))
	})
}

// discardBounds rounds [off, off+length) inwards to whole discard units of
// dev; start >= end when no whole unit lies inside.
func discardBounds(dev blockdev.Device, off, length int64) (start, end int64) {
	unit := max(int64(dev.Alignment()), discardSector)
	return alignUp(off, unit), (off + length) &^ (unit - 1)
}

// writeZeroesDev writes n zeroes to dev at off from zeroes, in pieces of
// at most len(zeroes), durably before it returns with fua.
func writeZeroesDev(dev blockdev.Device, zeroes []byte, off, n int64, fua bool) error {
	if n <= int64(len(zeroes)) {
		return writeDev(dev, zeroes[:n], off, fua)
	}
	for done := int64(0); done < n; {
		k := min(int64(len(zeroes)), n-done)
		if err := writeDev(dev, zeroes[:k], off+done, false); err != nil {
			return err
		}
		done += k
	}
	if fua {
		return dev.Sync()
	}
	return nil
}

// zeroDev makes [off, off+n) of dev read as zeroes. With mayDiscard and a
// dev that is a blockdev.Discarder (whose discards read back as zeroes) the
// whole discard units are discarded and only the ragged edges written;
// otherwise, or if the discard fails, zeroes are written.
func zeroDev(dev blockdev.Device, zeroes []byte, off, n int64, mayDiscard bool) error {
	d, ok := dev.(blockdev.Discarder)
	if !ok || !mayDiscard {
		return writeZeroesDev(dev, zeroes, off, n, false)
	}
	start, end := discardBounds(dev, off, n)
	if start >= end {
		return writeZeroesDev(dev, zeroes, off, n, false)
	}
	if err := writeZeroesDev(dev, zeroes, off, start-off, false); err != nil {
		return err
	}
	if err := d.Discard(start, end-start); err != nil {
		// A device that refuses the discard can still be written.
		if err := writeZeroesDev(dev, zeroes, start, end-start, false); err != nil {
			return err
		}
	}
	return writeZeroesDev(dev, zeroes, end, off+n-end, false)
}

// Trim discards [off, off+length) of the origin (NBD_CMD_TRIM). A trim is
// a hint, so it only does anything on a device that is a
// blockdev.Discarder: there, every valid snapshot first gets its copy of
// the chunks the discarded range overlaps, exactly as for a write, and
// then the whole discard units (512 bytes, or the device's I/O alignment
// if larger) inside the range are discarded; they read back as zeroes, the
// ragged edges keep their data. On any other device Trim changes nothing
// and so copies nothing. With fua the origin is synced afterwards. In
// merge mode the chunks the merging snapshot still holds are skipped.
func (o *Origin) Trim(ctx context.Context, off, length int64, fua bool) error {
	if err := checkRange(o.size, off, length); err != nil {
		return fmt.Errorf("origin %s: trim: %w", o.dev.Name(), err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	d, ok := o.dev.(blockdev.Discarder)
	if !ok {
		return nil
	}
	start, end := discardBounds(o.dev, off, length)
	if start >= end {
		return nil
	}
	leave, err := o.enter(ctx)
	if err != nil {
		return fmt.Errorf("origin %s: trim %d bytes at %d: %w", o.dev.Name(), length, off, err)
	}
	defer leave()
	o.snapMu.RLock()
	defer o.snapMu.RUnlock()
	discard := func(at, n int64) error {
		if err := d.Discard(at, n); err != nil {
			return err
		}
		o.syncs.wrote()
		return nil
	}
	if m := o.merge.Load(); m != nil {
		// The chunks the merging snapshot holds are skipped: their data
		// is in its COW, and a hint need not reach it.
		err = o.changeMerging(ctx, m, start, end-start, mergeChange{trim: true, origin: discard})
	} else if err = o.copyBeforeOverwrite(ctx, start, end-start, nil); err == nil {
		o.announceOverwrite(start, end-start)
		err = discard(start, end-start)
	}
	if err != nil {
		return fmt.Errorf("origin %s: trim %d bytes at %d: %w", o.dev.Name(), length, off, err)
	}
	if fua {
		if err := o.dev.Sync(); err != nil {
			return fmt.Errorf("origin %s: trim %d bytes at %d: sync: %w", o.dev.Name(), length, off, err)
		}
	}
	return nil
}

// WriteZeroes makes [off, off+length) of the origin read as zeroes
// (NBD_CMD_WRITE_ZEROES). Every valid snapshot first gets its copy of the
// chunks the range overlaps, as for a write. Then, unless noHole is set,
// a device that is a blockdev.Discarder discards the whole discard units
// of the range (its discards read back as zeroes) and the edges are
// written; otherwise zeroes are written. With fua the zeroes are durable
// when it returns. The range must be aligned as a write's. In merge mode
// the chunks the merging snapshot still holds are zeroed in its COW.
//
// It always zeroes; an NBD adapter for a client's "fast zero" request
// should refuse it (the copies cost what writes cost) or pass it on only
// when !noHole and the device is a Discarder.
func (o *Origin) WriteZeroes(ctx context.Context, off, length int64, noHole, fua bool) error {
	if err := checkRange(o.size, off, length); err != nil {
		return fmt.Errorf("origin %s: write zeroes: %w", o.dev.Name(), err)
	}
	if err := checkWriteAlignment(o.dev, off, length); err != nil {
		return fmt.Errorf("origin %s: write zeroes: %w", o.dev.Name(), err)
	}
	if err := ctx.Err(); err != nil || length == 0 {
		return err
	}
	leave, err := o.enter(ctx)
	if err != nil {
		return fmt.Errorf("origin %s: write %d zeroes at %d: %w", o.dev.Name(), length, off, err)
	}
	defer leave()
	o.snapMu.RLock()
	defer o.snapMu.RUnlock()
	zero := func(at, n int64) error {
		if err := zeroDev(o.dev, o.zeroes(), at, n, !noHole); err != nil {
			return err
		}
		o.syncs.wrote()
		return nil
	}
	if m := o.merge.Load(); m != nil {
		err = o.changeMerging(ctx, m, off, length, mergeChange{fua: fua, origin: zero})
	} else if err = o.copyBeforeOverwrite(ctx, off, length, nil); err == nil {
		o.announceOverwrite(off, length)
		err = zero(off, length)
	}
	if err != nil {
		return fmt.Errorf("origin %s: write %d zeroes at %d: %w", o.dev.Name(), length, off, err)
	}
	if fua {
		if err := o.dev.Sync(); err != nil {
			return fmt.Errorf("origin %s: write %d zeroes at %d: sync: %w", o.dev.Name(), length, off, err)
		}
	}
	return nil
}

// Trim checks a trim of [off, off+length) of the snapshot as a write and
// then does nothing: it is a hint, and a snapshot cannot honour it
// usefully. Its chunks that have an exception keep it (the "P" format
// cannot drop one outside a merge, so no COW space is freed), and zeroing
// them would cost a chunk write for nothing the NBD protocol asks for; its
// chunks without one must not allocate, and must never touch the origin.
// The kernel's snapshot target likewise takes no discards unless asked to
// (discard_zeroes_cow). It fails as a write would: ErrReadOnly on a
// read-only snapshot, exstore.ErrInvalid on an invalid one, ErrOverflow
// on an overflowed one.
func (s *Snapshot) Trim(ctx context.Context, off, length int64, fua bool) error {
	if err := checkRange(s.size, off, length); err != nil {
		return fmt.Errorf("snapshot %s: trim: %w", s.name, err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.writable(); err != nil {
		return fmt.Errorf("snapshot %s: trim %d bytes at %d: %w", s.name, length, off, err)
	}
	return nil
}

// WriteZeroes writes zeroes over [off, off+length) of the snapshot
// (NBD_CMD_WRITE_ZEROES), exactly as WriteAt of a zero-filled buffer would
// (allocating exceptions as needed; the origin is only read), but from one
// reused zero buffer of at most a chunk. noHole changes nothing: the
// zeroes are always written, which is also never cheaper than a write for
// a client's "fast zero" request.
func (s *Snapshot) WriteZeroes(ctx context.Context, off, length int64, noHole, fua bool) error {
	if err := s.writeRange(ctx, off, length, nil, fua); err != nil {
		return fmt.Errorf("snapshot %s: write %d zeroes at %d: %w", s.name, length, off, err)
	}
	return nil
}
