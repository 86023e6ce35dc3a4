package cow

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync/atomic"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// ErrMerged is wrapped by the errors of a snapshot that was merged into its
// origin: its data is the origin's now, and its store has no exceptions.
var ErrMerged = errors.New("snapshot was merged into its origin")

// ErrMerging is wrapped by the errors of a snapshot that is merging into
// its origin: its view is the origin's now, served through the origin, and
// it cannot be used on its own, as the kernel's snapshot target fails I/O
// once snapshot-merge took its exceptions over.
var ErrMerging = errors.New("snapshot is merging into its origin")

// ErrMergeInProgress is returned by Merge and StartMerge while the origin
// merges another snapshot (or another Merge runs), and by AddSnapshot and
// RemoveSnapshot while the origin is in merge mode.
var ErrMergeInProgress = errors.New("a merge of the origin is in progress")

// maxMergeIO bounds the bytes one merge run moves: a run of exceptions can
// be a whole metadata area (16 GiB with 512 KiB chunks), and origin writes
// to the run's chunks wait for it. A run up to this size is copied as one
// read of the COW and one write of the origin, as the kernel's kcopyd
// does; a longer one is merged in runs of this size from its end.
const maxMergeIO = 8 << 20

// MergeProgress reports merge progress: exceptions merged so far and the
// total when the origin entered merge mode (what was left, when it
// resumes an interrupted merge after a reopen).
type MergeProgress struct{ Done, Total uint64 }

// MergeMarker records durably, where a reopen finds it, that a snapshot's
// COW merges into its origin (exstore.Merging), was merged into it
// (exstore.Merged), or is an ordinary snapshot again (exstore.NotMerging,
// only when merge mode could not begin after the mark). LabelMarker
// records it in the COW's label.
type MergeMarker func(ctx context.Context, state exstore.MergeState) error

// LabelMarker is the MergeMarker that writes the state into the label of
// the COW whose store (or, for a clustered store, its core) is lb, naming
// origin as the origin it merges into unless the label names one already
// (the caller checked that it is this one). A COW without a label gets
// one, with a new UUID. The caller excludes other writers of the label.
func LabelMarker(lb exstore.Labeler, origin exstore.OriginIdentity) MergeMarker {
	return func(ctx context.Context, state exstore.MergeState) error {
		l, _, err := lb.Label(ctx)
		if err != nil {
			return err
		}
		if l.UUID.IsZero() {
			if l.UUID, err = exstore.NewUUID(); err != nil {
				return err
			}
		}
		if l.Origin.IsZero() {
			l.Origin = origin
		}
		l.Merge = state
		if err := lb.SetLabel(ctx, l); err != nil {
			return fmt.Errorf("label the COW %v: %w", state, err)
		}
		return nil
	}
}

// SetMergeMarker makes a merge of s record itself with mark (nil: nowhere;
// the merge then does not survive a reopen as one, see StartMerge). Set it
// before the merge starts: a merge uses the marker it finds when it
// records.
func (s *Snapshot) SetMergeMarker(mark MergeMarker) { s.marker.Store(&mark) }

// mark records state with s's marker, if it has one.
func (s *Snapshot) mark(ctx context.Context, state exstore.MergeState) error {
	if p := s.marker.Load(); p != nil && *p != nil {
		return (*p)(ctx, state)
	}
	return nil
}

// liveMerge is an origin's merge mode, from StartMerge until the merge
// completes.
type liveMerge struct {
	snap *Snapshot
	// done and total are the progress (MergeProgress).
	done, total atomic.Uint64
	// broken, once set, is a run whose records may differ on disk and in
	// the store's table (its CommitMerge failed after it may have written
	// them): writes to its chunks and further merging fail until the
	// store is reopened, which reads what the disk holds. The origin and
	// the COW hold the same data for those chunks, so reads stay right.
	broken atomic.Pointer[brokenRun]
}

// brokenRun is a merge run whose records are in doubt, chunks [first, end).
type brokenRun struct {
	first, end exstore.Chunk
	err        error
}

func (m *liveMerge) progress() MergeProgress {
	return MergeProgress{Done: m.done.Load(), Total: m.total.Load()}
}

// brokenAt is the failure of the run that covers chunk c of the merging
// snapshot, nil if none does.
func (m *liveMerge) brokenAt(c exstore.Chunk) error {
	if b := m.broken.Load(); b != nil && c >= b.first && c < b.end {
		return fmt.Errorf("chunk %d: its merge run failed, reopen the origin and the COW: %w", c, b.err)
	}
	return nil
}

// Merging returns the snapshot the origin is merging and the merge's
// progress, while the origin is in merge mode: from StartMerge (or the
// start of Merge) until the merge completes, also while no Merge runs.
func (o *Origin) Merging() (*Snapshot, MergeProgress, bool) {
	m := o.merge.Load()
	if m == nil {
		return nil, MergeProgress{}, false
	}
	return m.snap, m.progress(), true
}

// StartMerge puts the origin in merge mode with snapshot s, as loading the
// kernel's snapshot-merge target does, and merges nothing yet (Merge
// does). First it makes s's exceptions durable, passes the origin's gate
// and records the merge with s's marker (SetMergeMarker), so that a reopen
// finds it and resumes merge mode; then, once the origin changes in flight
// completed, the origin reads as s did:
//   - a read of a chunk s still has an exception for comes from s's COW,
//     other chunks from the origin;
//   - a write (or zeroing) of a chunk s still has an exception for goes to
//     s's COW, so that the merge carries it to the origin, waiting while
//     the chunk's merge run is under way; one of another chunk goes to the
//     origin as usual, the other valid snapshots copying first. s never
//     gets a new exception;
//   - a trim skips the chunks s still holds (it is a hint);
//   - Flush syncs s's COW as well, and a write with FUA to s's COW is
//     durable when it returns.
//
// s itself fails every use from then on (ErrMerging): the caller stops
// serving it first, and its own writes in flight must be drained. Merge
// mode lasts until the merge completes: an interrupted merge leaves the
// origin in it, right, until Merge resumes. Meanwhile no snapshot is added
// or removed (ErrMergeInProgress). StartMerge of the snapshot the origin
// already merges does nothing; of another it fails with
// ErrMergeInProgress. An invalid snapshot cannot merge (the error wraps
// exstore.ErrInvalid).
func (o *Origin) StartMerge(ctx context.Context, s *Snapshot) error {
	if err := o.checkMergeOf(s); err != nil {
		return err
	}
	if !o.merging.TryLock() {
		if m := o.merge.Load(); m != nil && m.snap == s {
			return nil
		}
		return fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, ErrMergeInProgress)
	}
	defer o.merging.Unlock()
	if _, err := o.startMerge(ctx, s); err != nil {
		return fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, err)
	}
	return nil
}

// checkMergeOf fails unless s is a snapshot of o.
func (o *Origin) checkMergeOf(s *Snapshot) error {
	if s == nil || s.origin != o {
		return fmt.Errorf("origin %s: merge: the snapshot is not a snapshot of this origin", o.dev.Name())
	}
	return nil
}

// startMerge enters merge mode with s, or returns the merge mode the origin
// is in with s already. The caller holds o.merging.
func (o *Origin) startMerge(ctx context.Context, s *Snapshot) (*liveMerge, error) {
	if m := o.merge.Load(); m != nil {
		if m.snap != s {
			return nil, fmt.Errorf("snapshot %s merges: %w", m.snap.name, ErrMergeInProgress)
		}
		return m, nil
	}
	if err := s.failure(); err != nil {
		return nil, err
	}
	// The merge works from the records on disk: lazily committed
	// exceptions are written first.
	if s.lazy != nil {
		if err := s.lazy.Sync(ctx); err != nil {
			return nil, err
		}
	}
	// The switch changes what the origin reads: it passes the gate, as
	// an origin change does, before anything is recorded.
	leave, err := o.enter(ctx)
	if err != nil {
		return nil, err
	}
	defer leave()
	if err := s.mark(ctx, exstore.Merging); err != nil {
		return nil, fmt.Errorf("record the merge: %w", err)
	}
	m := &liveMerge{snap: s}
	o.snapMu.Lock()
	err = o.enterMergeMode(m)
	o.snapMu.Unlock()
	if err != nil {
		if uerr := s.mark(context.WithoutCancel(ctx), exstore.NotMerging); uerr != nil {
			err = fmt.Errorf("%w (and the COW stays marked merging: %w)", err, uerr)
		}
		return nil, err
	}
	return m, nil
}

// enterMergeMode switches the origin to merge mode m; the caller holds
// o.snapMu exclusively, so no origin change is in flight.
func (o *Origin) enterMergeMode(m *liveMerge) error {
	s := m.snap
	if !slices.Contains(o.snaps, s) {
		return fmt.Errorf("snapshot %s is no longer a snapshot of origin %s", s.name, o.dev.Name())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.invalid != nil {
		return s.invalid
	}
	s.invalid = ErrMerging
	s.failed.Store(true)
	// Counted with no origin change in flight: the copies of the last
	// ones are in.
	m.total.Store(s.store.Usage().Exceptions)
	o.merge.Store(m)
	return nil
}

// Merge rolls the origin back to snapshot s, as the kernel's
// snapshot-merge target does, while the origin may be served: it enters
// merge mode with s (StartMerge) unless the origin is in it already, and
// merges s's exceptions into the origin until none is left. Other
// snapshots of the origin stay valid and may keep being served: before a
// run of chunks is overwritten, every other valid snapshot copies them as
// an origin write would make it.
//
// Each round takes the last run of n consecutive exceptions from the store
// (PrepareMerge), at most maxMergeIO of it from its end, and holds those
// chunks of s (chunkLocks) while it makes the other snapshots copy those
// origin chunks, copies the COW data to the origin (clipped at the
// origin's end), flushes the origin and clears the records (CommitMerge,
// which flushes the COW first); origin writes to the chunks wait
// meanwhile. Then it reports progress.
//
// Merge is safe to interrupt (ctx) and resume at any point, also after a
// crash once the store is reopened (with the origin in merge mode again:
// see StartMerge): records are cleared only after the origin flush, so an
// interrupted round leaves its records in place, and copying the run again
// gives the same result because only origin writes change the COW data of
// s meanwhile, and those are merged with it. An interrupted merge leaves
// the origin in merge mode. An error stops the merge without invalidating
// s; after a failed clear of records, Merge and the writes to that run's
// chunks fail until the origin and the store are reopened, as a failed
// metadata write may have cleared part of the records on disk.
//
// The origin merges one snapshot at a time and one Merge runs at a time
// (ErrMergeInProgress). After a complete merge, s's marker records it
// (exstore.Merged), s is removed from the origin and every later use of s
// fails with an error wrapping ErrMerged; its store, which has no
// exceptions left, is the caller's to close once the origin I/O that began
// before Merge returned is done.
func (o *Origin) Merge(ctx context.Context, s *Snapshot, progress func(MergeProgress)) error {
	if err := o.checkMergeOf(s); err != nil {
		return err
	}
	if !o.merging.TryLock() {
		return fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, ErrMergeInProgress)
	}
	defer o.merging.Unlock()
	if err := o.merge1(ctx, s, progress); err != nil {
		return fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, err)
	}
	return nil
}

// merge1 is Merge with o.merging held.
func (o *Origin) merge1(ctx context.Context, s *Snapshot, progress func(MergeProgress)) error {
	_, err := o.mergeSteps(ctx, s, math.MaxInt64, progress)
	return err
}

// MergeStep is Merge in steps: it merges runs of s's exceptions (entering
// merge mode with s first, unless the origin is in it) until they add up
// to budget bytes or more, or none is left; then it ends the merge as
// Merge does and reports more false. A cluster merges so, one step at a
// time while no other node changes the origin.
func (o *Origin) MergeStep(ctx context.Context, s *Snapshot, budget int64, progress func(MergeProgress)) (more bool, err error) {
	if err := o.checkMergeOf(s); err != nil {
		return false, err
	}
	if !o.merging.TryLock() {
		return false, fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, ErrMergeInProgress)
	}
	defer o.merging.Unlock()
	more, err = o.mergeSteps(ctx, s, budget, progress)
	if err != nil {
		return more, fmt.Errorf("origin %s: merge of snapshot %s: %w", o.dev.Name(), s.name, err)
	}
	return more, nil
}

// mergeSteps merges runs of s until budget bytes are merged or none is
// left, then ends the merge; o.merging is held.
func (o *Origin) mergeSteps(ctx context.Context, s *Snapshot, budget int64, progress func(MergeProgress)) (more bool, err error) {
	m, err := o.startMerge(ctx, s)
	if err != nil {
		return true, err
	}
	if b := m.broken.Load(); b != nil {
		return true, fmt.Errorf("a run's records are in doubt; reopen the origin and the COW to resume: %w", b.err)
	}
	piece := exstore.Chunk(min(chunkLockStripes, max(maxMergeIO/s.chunkBytes, 1)))
	var buf []byte
	for spent := int64(0); spent < budget; {
		if err := ctx.Err(); err != nil {
			return true, err
		}
		last, n, err := s.store.PrepareMerge(ctx)
		if err != nil {
			return true, fmt.Errorf("prepare: %w", err)
		}
		if n == 0 {
			return false, o.endMerge(ctx, m)
		}
		k := min(exstore.Chunk(n), piece)
		if buf, err = o.mergeRun(ctx, m, last, k, buf); err != nil {
			return true, fmt.Errorf("run of %d ending at %v: %w", k, last, err)
		}
		m.done.Add(uint64(k))
		spent += int64(k) * s.chunkBytes
		if progress != nil {
			progress(m.progress())
		}
	}
	return true, nil
}

// endMerge leaves merge mode m, whose snapshot has no exceptions left:
// the merge is recorded as done, and the snapshot removed once the origin
// changes in flight completed.
func (o *Origin) endMerge(ctx context.Context, m *liveMerge) error {
	s := m.snap
	if err := s.mark(ctx, exstore.Merged); err != nil {
		return fmt.Errorf("record the end of the merge: %w", err)
	}
	o.snapMu.Lock()
	defer o.snapMu.Unlock()
	o.snaps = slices.DeleteFunc(slices.Clone(o.snaps), func(x *Snapshot) bool { return x == s })
	o.merge.Store(nil)
	s.mu.Lock()
	s.invalid = ErrMerged
	s.mu.Unlock()
	return nil
}

// mergeRun writes the COW data of the k exceptions ending at last to the
// origin, after the other snapshots copied what it overwrites, flushes the
// origin and clears the records, holding the chunks from before the COW
// read until the records are cleared. buf is a reusable copy buffer; the
// one to reuse is returned.
func (o *Origin) mergeRun(ctx context.Context, m *liveMerge, last exstore.Exception, k exstore.Chunk, buf []byte) ([]byte, error) {
	s := m.snap
	firstOld := last.Old - (k - 1)
	firstNew := last.New - (k - 1)

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
	if !o.breaks.runUnlocked {
		s.locks.lockRange(firstOld, last.Old+1)
		defer s.locks.unlockRange(firstOld, last.Old+1)
	}
	if o.size > 0 && uint64(firstOld) <= uint64((o.size-1)/s.chunkBytes) {
		// Else the run lies beyond the origin's end (the origin shrank):
		// there is nothing to write, only records to clear.
		if buf, err = o.copyRun(ctx, s, firstOld, firstNew, k, buf); err != nil {
			return buf, err
		}
	}
	if err := s.store.CommitMerge(ctx, int(k)); err != nil {
		if !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			m.broken.Store(&brokenRun{first: firstOld, end: last.Old + 1, err: err})
		}
		return buf, fmt.Errorf("commit: %w", err)
	}
	return buf, nil
}

// copyRun copies the k COW chunks from firstNew on to the origin chunks
// from firstOld on (clipped at the origin's end), after the other
// snapshots' copies, and flushes the origin. The caller holds o.snapMu
// shared and the run's chunks of s.
func (o *Origin) copyRun(ctx context.Context, s *Snapshot, firstOld, firstNew, k exstore.Chunk, buf []byte) ([]byte, error) {
	start := int64(firstOld) * s.chunkBytes
	length := o.size - start
	if uint64(k) <= uint64(length/s.chunkBytes) {
		length = int64(k) * s.chunkBytes
	}
	if err := o.copyBeforeOverwrite(ctx, start, length, s); err != nil {
		return buf, err
	}
	o.announceOverwrite(start, length)
	if int64(len(buf)) < length {
		buf = blockdev.AlignedBuffer(int(length), max(o.dev.Alignment(), s.cow.Alignment(), 1))
	}
	if err := ctx.Err(); err != nil {
		return buf, err
	}
	cowAt := int64(firstNew) * s.chunkBytes
	if err := readDev(s.cow, buf[:length], cowAt); err != nil {
		return buf, fmt.Errorf("read %d bytes of COW %s at %d: %w", length, s.cow.Name(), cowAt, err)
	}
	if err := writeDev(o.dev, buf[:length], start, false); err != nil {
		return buf, fmt.Errorf("write %d bytes at %d: %w", length, start, err)
	}
	if o.breaks.noRunFlush {
		return buf, nil
	}
	if err := o.dev.Sync(); err != nil {
		return buf, fmt.Errorf("flush: %w", err)
	}
	return buf, nil
}
