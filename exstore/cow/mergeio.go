package cow

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
)

// mergeBreaks, set only by tests that prove their checkers catch a broken
// merge, turns parts of merge mode off. The zero value breaks nothing.
type mergeBreaks struct {
	// runUnlocked: merge runs do not hold their chunks, so an origin
	// write can land in the COW after its run read it.
	runUnlocked bool
	// noRedirect: origin writes to chunks the merging snapshot holds go
	// to the origin, where the merge overwrites them.
	noRedirect bool
	// plainReads: origin reads ignore merge mode.
	plainReads bool
	// noCOWFlush: Flush does not sync the merging snapshot's COW.
	noCOWFlush bool
	// noRunFlush: a merge run clears its records without flushing the
	// origin first.
	noRunFlush bool
}

// readMerging is ReadAt in merge mode: the merging snapshot's view, which
// is the origin's now (see StartMerge). It holds the snapshot list shared,
// so that the end of merge mode waits for it, and the caller may close the
// merged snapshot's store once Merge returned and the reads it served
// completed.
func (o *Origin) readMerging(ctx context.Context, p []byte, off int64) error {
	o.snapMu.RLock()
	defer o.snapMu.RUnlock()
	m := o.merge.Load()
	if m == nil || o.breaks.plainReads {
		return readDev(o.dev, p, off)
	}
	// A chunk the snapshot has no exception for never gets one in merge
	// mode, so what the view reads of it from the origin is the origin's;
	// one it has an exception for reads from the COW, which holds the
	// same data as the origin once its run is merged.
	return m.snap.readView(ctx, p, off)
}

// mergeChange is an origin change in merge mode (changeMerging).
type mergeChange struct {
	// data is a write's data; nil for zeroes or a trim.
	data []byte
	// trim: the change is a hint, and skips the chunks the merging
	// snapshot holds.
	trim bool
	// fua makes what is written to the merging snapshot's COW durable
	// before the change returns.
	fua bool
	// origin makes the change to [off, off+n) of the origin, a range no
	// chunk the merging snapshot holds overlaps, after the other
	// snapshots' copies.
	origin func(off, n int64) error
}

// changeMerging makes an origin change of [off, off+n) in merge mode m:
// each chunk the merging snapshot still has an exception for takes it in
// its COW chunk (under the chunk's lock, so that no merge run is between
// the lookup and the write: the run either copies the new data or cleared
// the exception first), and the rest goes to the origin as any origin
// change, in runs, after the other valid snapshots' copies. The caller is
// inside the gate and holds o.snapMu shared.
func (o *Origin) changeMerging(ctx context.Context, m *liveMerge, off, n int64, ch mergeChange) error {
	s := m.snap
	if !ch.trim {
		if err := checkWriteAlignment(s.cow, off, n); err != nil {
			return err
		}
	}
	runStart, runEnd := off, off
	flushRun := func() error {
		if runEnd == runStart {
			return nil
		}
		from, k := runStart, runEnd-runStart
		runStart = runEnd
		if err := o.copyBeforeOverwrite(ctx, from, k, nil); err != nil {
			return err
		}
		o.announceOverwrite(from, k)
		return ch.origin(from, k)
	}
	first, last := off/s.chunkBytes, (off+n-1)/s.chunkBytes
	if s.absence != nil && s.absence.NoExceptions(exstore.Chunk(first), uint64(last-first+1)) {
		// The snapshot holds none of them: all of it is the origin's.
		runEnd = off + n
		return flushRun()
	}
	err := s.eachChunk(off, n, func(c exstore.Chunk, at int64, lo, hi int64) error {
		var part []byte
		if ch.data != nil {
			part = ch.data[lo:hi]
		}
		held, err := o.changeInSnapshot(ctx, m, c, at, hi-lo, part, ch)
		if err != nil {
			return err
		}
		if !held {
			runEnd = at + hi - lo
			return nil
		}
		if err := flushRun(); err != nil {
			return err
		}
		runStart, runEnd = at+hi-lo, at+hi-lo
		return nil
	})
	if err != nil {
		return err
	}
	return flushRun()
}

// changeInSnapshot makes the part of a merge-mode change that falls in
// chunk c (n bytes at at; part is the data, nil for zeroes or a trim) in
// the merging snapshot's COW if the snapshot holds c: held says it did.
// A chunk it does not hold never gets an exception again, so the caller
// may change it on the origin after the lock is released.
func (o *Origin) changeInSnapshot(ctx context.Context, m *liveMerge, c exstore.Chunk, at, n int64, part []byte, ch mergeChange) (held bool, err error) {
	s := m.snap
	s.locks.lock(c)
	defer s.locks.unlock(c)
	new, found, err := s.lookup(ctx, c)
	if err != nil {
		return false, fmt.Errorf("merging snapshot %s: %w", s.name, err)
	}
	if !found || o.breaks.noRedirect {
		return false, nil
	}
	if err := m.brokenAt(c); err != nil {
		return true, err
	}
	if ch.trim {
		return true, nil
	}
	cowOff := s.cowOffset(c, new, at)
	if part != nil {
		err = writeDev(s.cow, part, cowOff, ch.fua)
	} else {
		err = writeZeroesDev(s.cow, s.zeroes(), cowOff, n, ch.fua)
	}
	if err != nil {
		return true, fmt.Errorf("chunk %d: COW %s of merging snapshot %s, chunk %d: %w", c, s.cow.Name(), s.name, new, err)
	}
	if !ch.fua {
		s.syncs.wrote()
	}
	return true, nil
}

// writeMerging is WriteAt in merge mode m.
func (o *Origin) writeMerging(ctx context.Context, m *liveMerge, p []byte, off int64, fua bool) error {
	return o.changeMerging(ctx, m, off, int64(len(p)), mergeChange{data: p, fua: fua, origin: func(at, n int64) error {
		if err := writeDev(o.dev, p[at-off:at-off+n], at, fua); err != nil {
			return err
		}
		if !fua {
			o.syncs.wrote()
		}
		return nil
	}})
}

// flushMerging syncs the COW of the snapshot the origin merges, if any,
// unless no origin write reached it since its last sync: Flush's part of
// merge mode.
func (o *Origin) flushMerging() error {
	m := o.merge.Load()
	if m == nil || o.breaks.noCOWFlush {
		return nil
	}
	if err := m.snap.syncs.sync(m.snap.cow); err != nil {
		return fmt.Errorf("flush of COW %s of merging snapshot %s: %w", m.snap.cow.Name(), m.snap.name, err)
	}
	return nil
}
