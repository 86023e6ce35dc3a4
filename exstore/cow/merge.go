package cow

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// ErrMerged is wrapped by the errors of a snapshot that was merged into its
// origin: its data is the origin's now, and its store has no exceptions.
var ErrMerged = errors.New("snapshot was merged into its origin")

// ErrMergeInProgress is returned by Merge while another merge of the same
// origin runs.
var ErrMergeInProgress = errors.New("another merge of the origin is in progress")

// maxMergeIO bounds the bytes one merge copy moves (a run of exceptions can
// be a whole metadata area: 16 GiB with 512 KiB chunks). Runs up to this size
// are copied as one read of the COW and one write of the origin, as the
// kernel's kcopyd does.
const maxMergeIO = 8 << 20

// MergeProgress reports merge progress: exceptions merged so far and the
// total when the merge started (what was left, when it resumes an
// interrupted merge).
type MergeProgress struct{ Done, Total uint64 }

// Merge rolls the origin back to snapshot s, as the kernel's snapshot-merge
// target does, offline: the caller serves neither the origin nor s
// meanwhile. Other snapshots of the origin stay valid and may keep being
// served: before a run of chunks is overwritten, every other valid snapshot
// copies them as an origin write would make it.
//
// Each round takes the last run of n consecutive exceptions from the store
// (PrepareMerge), makes the other snapshots copy those origin chunks,
// copies the run's COW data to the origin (clipped at the origin's end; as
// one I/O up to maxMergeIO), flushes the origin, clears the records
// (CommitMerge, which flushes the COW first) and reports progress, until
// the store has no exceptions left.
//
// Merge is safe to interrupt (ctx) and resume at any point, also after a
// crash once the store is reopened: records are cleared only after the
// origin flush, so an interrupted round leaves its records in place, and
// copying the run again gives the same result because nothing changes the
// COW data of s meanwhile. An interrupted merge leaves s reading as before
// (merged chunks now come from the origin, which holds the same data) and
// still a snapshot of the origin, so the origin may even be served before
// the merge resumes. An error stops the merge without invalidating s;
// after an I/O error reopen the store before resuming, as a failed metadata
// write may have cleared part of a run's records on disk.
//
// An invalid snapshot cannot merge (the error wraps exstore.ErrInvalid),
// and an origin merges one snapshot at a time (ErrMergeInProgress).
// After a complete merge s is removed from the origin and every later use
// of s fails with an error wrapping ErrMerged; its store, which has no
// exceptions left, is the caller's to close.
func (o *Origin) Merge(ctx context.Context, s *Snapshot, progress func(MergeProgress)) error {
	if s == nil || s.origin != o {
		return fmt.Errorf("origin %s: merge: the snapshot is not a snapshot of this origin", o.dev.Name())
	}
	if !o.merging.TryLock() {
		return fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, ErrMergeInProgress)
	}
	defer o.merging.Unlock()
	if err := s.failure(); err != nil {
		return fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, err)
	}
	// Merge works from the records on disk: lazily committed exceptions
	// are written first.
	if s.lazy != nil {
		if err := s.lazy.Sync(ctx); err != nil {
			return fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, err)
		}
	}
	p := MergeProgress{Total: s.store.Usage().Exceptions}
	var buf []byte
	for {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, err)
		}
		last, n, err := s.store.PrepareMerge(ctx)
		if err != nil {
			return fmt.Errorf("origin %s: merge of snapshot %s: prepare: %w", o.dev.Name(), s.name, err)
		}
		if n == 0 {
			break
		}
		if buf, err = o.mergeRun(ctx, s, last, n, buf); err != nil {
			return fmt.Errorf("origin %s: merge of snapshot %s: run of %d ending at %v: %w", o.dev.Name(), s.name, n, last, err)
		}
		if err := s.store.CommitMerge(ctx, n); err != nil {
			return fmt.Errorf("origin %s: merge of snapshot %s: commit of run of %d ending at %v: %w", o.dev.Name(), s.name, n, last, err)
		}
		p.Done += uint64(n)
		if progress != nil {
			progress(p)
		}
	}
	o.snapMu.Lock()
	o.snaps = slices.DeleteFunc(slices.Clone(o.snaps), func(x *Snapshot) bool { return x == s })
	o.snapMu.Unlock()
	s.markFailed(ErrMerged)
	return nil
}

// mergeRun writes the COW data of the n exceptions ending at last to the
// origin, after the other snapshots copied what it overwrites, and flushes
// the origin. buf is a reusable copy buffer; the one to reuse is returned.
func (o *Origin) mergeRun(ctx context.Context, s *Snapshot, last exstore.Exception, n int, buf []byte) ([]byte, error) {
	firstOld := last.Old - exstore.Chunk(n-1)
	firstNew := last.New - exstore.Chunk(n-1)
	if o.size == 0 || uint64(firstOld) > uint64((o.size-1)/s.chunkBytes) {
		// The run lies beyond the origin's end (the origin shrank): there
		// is nothing to write, only records to clear.
		return buf, nil
	}
	start := int64(firstOld) * s.chunkBytes
	length := o.size - start
	if uint64(n) <= uint64(length/s.chunkBytes) {
		length = int64(n) * s.chunkBytes
	}

	// As for an origin write: the run passes the gate, the other
	// snapshots' copies are committed before the origin is overwritten,
	// and no snapshot is added between.
	leave, err := o.enter(ctx)
	if err != nil {
		return buf, err
	}
	defer leave()
	o.snapMu.RLock()
	defer o.snapMu.RUnlock()
	if err := o.copyBeforeOverwrite(ctx, start, length, s); err != nil {
		return buf, err
	}
	o.announceOverwrite(start, length)

	piece := max(maxMergeIO/s.chunkBytes, 1) * s.chunkBytes
	for done := int64(0); done < length; {
		if err := ctx.Err(); err != nil {
			return buf, err
		}
		k := min(length-done, piece)
		if int64(len(buf)) < k {
			buf = blockdev.AlignedBuffer(int(min(length, piece)), max(o.dev.Alignment(), s.cow.Alignment(), 1))
		}
		cowAt := int64(firstNew)*s.chunkBytes + done
		if err := readDev(s.cow, buf[:k], cowAt); err != nil {
			return buf, fmt.Errorf("read %d bytes of COW %s at %d: %w", k, s.cow.Name(), cowAt, err)
		}
		if err := writeDev(o.dev, buf[:k], start+done, false); err != nil {
			return buf, fmt.Errorf("write %d bytes at %d: %w", k, start+done, err)
		}
		done += k
	}
	if err := o.dev.Sync(); err != nil {
		return buf, fmt.Errorf("flush: %w", err)
	}
	return buf, nil
}
