package cow

import (
	"context"
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
)

// ReadAt fills p from off of the snapshot.
func (s *Snapshot) ReadAt(ctx context.Context, p []byte, off int64) error {
	if s.readInChunk(ctx, p, off) {
		return nil
	}
	if err := checkRange(s.size, off, int64(len(p))); err != nil {
		return fmt.Errorf("snapshot %s: read: %w", s.name, err)
	}
	err := ctx.Err()
	if err == nil {
		err = s.readRange(ctx, p, off)
	}
	if err != nil {
		return fmt.Errorf("snapshot %s: read %d bytes at %d: %w", s.name, len(p), off, err)
	}
	return nil
}

// maxReadRunChunks bounds the chunks a read looks up and holds at once
// (a window), and so the chunks one read I/O covers.
const maxReadRunChunks = 64

// optimisticReadAttempts is how many times a read of a window tries
// without holding its chunks before it holds them (see chunkLocks).
const optimisticReadAttempts = 3

// readInChunk is the common read, of part of one chunk of a valid
// snapshot, in as few calls as can be: it reports whether it read p at
// off, and does nothing else when it did not. It is the first attempt of
// readWindow's, with the same checks; any other outcome (another request
// shape, a range past the end, a canceled context, an error, an invalid
// snapshot, an announcement during the read) leaves the request to the
// general path, which reads again, with its retries and its errors.
// Reading twice changes nothing, and on a cached 4 KiB read the general
// path's extra calls cost a measurable share.
func (s *Snapshot) readInChunk(ctx context.Context, p []byte, off int64) bool {
	if !s.inOneChunk(p, off) {
		return false
	}
	if ctx.Err() != nil {
		return false
	}
	c := exstore.Chunk(off / s.chunkBytes)
	announced := &s.locks.overwrites[uint64(c)%chunkLockStripes]
	before := announced.Load()
	var (
		new     exstore.Chunk
		found   bool
		release exstore.Release
		token   uint64
		err     error
	)
	if s.optimistic != nil {
		var ok bool
		if new, found, token, ok = s.optimistic.LookupOptimistic(c); !ok {
			return false
		}
		release = exstore.NoRelease
	} else {
		new, found, release, err = s.store.Lookup(ctx, c)
	}
	if err == nil {
		dev, at := s.origin.dev, off
		if found {
			dev, at = s.cow, s.cowOffset(c, new, off)
		}
		var m int
		m, err = dev.ReadAt(p, at)
		if m == len(p) {
			err = nil
		}
	}
	release()
	return err == nil && announced.Load() == before && (s.optimistic == nil || s.optimistic.Unchanged(token)) &&
		!s.failed.Load() && s.store.Err() == nil
}

// readRange reads p at off (readView) and then fails if the snapshot is
// invalid. The check comes after the I/O, where it is needed anyway,
// rather than before too: a read of an invalid snapshot costs I/O that is
// thrown away, every other read one check less.
func (s *Snapshot) readRange(ctx context.Context, p []byte, off int64) error {
	if err := s.readView(ctx, p, off); err != nil {
		return s.readFailure(err)
	}
	// Origin writes skip an invalid snapshot: if it became invalid before
	// or during the read, the data may be the origin's new content.
	// Invalidity is permanent, so one check after every window covers them
	// all.
	return s.failure()
}

// readView reads p at off of the snapshot's view, window by window of up
// to maxReadRunChunks chunks, whether or not the snapshot is valid: the
// caller judges that (readRange), or knows (the origin of a merge reads
// its snapshot's view).
func (s *Snapshot) readView(ctx context.Context, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	end := off + int64(len(p))
	last := exstore.Chunk((end - 1) / s.chunkBytes)
	for first := exstore.Chunk(off / s.chunkBytes); first <= last; first += maxReadRunChunks {
		windowEnd := min(last+1, first+maxReadRunChunks)
		from := max(off, int64(first)*s.chunkBytes)
		to := min(end, int64(windowEnd)*s.chunkBytes)
		if err := s.readWindow(ctx, first, windowEnd, from, p[from-off:to-off]); err != nil {
			return err
		}
	}
	return nil
}

// readFailure is what a read that failed with err reports: the reason the
// snapshot is invalid, if it is (the validity check comes after the I/O,
// which may fail because of what made the snapshot invalid), else err.
func (s *Snapshot) readFailure(err error) error {
	if failure := s.failure(); failure != nil {
		return failure
	}
	return err
}

// readWindow reads p at at, which lies in chunks [first, end), at most
// maxReadRunChunks of them, again while an origin overwrite of its chunks
// was announced during the attempt (see chunkLocks), or the store could
// not vouch for the answers of its lookups done without holding them (see
// exstore.OptimisticLookuper), holding the chunks and the answers after
// optimisticReadAttempts.
func (s *Snapshot) readWindow(ctx context.Context, first, end exstore.Chunk, at int64, p []byte) error {
	for range optimisticReadAttempts {
		before := s.locks.announcements(first, end)
		valid, err := s.readWindowOnce(ctx, first, end, at, p, true)
		if err != nil || valid && s.locks.announcements(first, end) == before {
			return err
		}
	}
	// Holding the chunks, no exception for them can appear, so no origin
	// write can land on one this read found without: announcements during
	// this attempt do not matter.
	s.locks.lockRange(first, end)
	defer s.locks.unlockRange(first, end)
	_, err := s.readWindowOnce(ctx, first, end, at, p, false)
	return err
}

// readWindowOnce is one attempt of readWindow. The chunks are looked up
// together (one call for a store that is an exstore.RangeLookuper) and
// held by the store until the I/O is done, for stores shared with other
// nodes; or, with optimistic and a store that is an
// exstore.OptimisticLookuper, looked up without holding, and then valid
// reports whether the store vouches for the answers after the I/O. Runs
// of chunks whose data is contiguous are read with one I/O each: chunks
// without an exception from the origin, chunks whose exceptions are
// consecutive COW chunks from the COW device.
func (s *Snapshot) readWindowOnce(ctx context.Context, first, end exstore.Chunk, at int64, p []byte, optimistic bool) (valid bool, err error) {
	optimistic = optimistic && s.optimistic != nil
	if end-first == 1 {
		return s.readChunkOnce(ctx, first, at, p, optimistic)
	}
	if s.absence != nil && s.absence.NoExceptions(first, uint64(end-first)) {
		// Answers that need no holding, all misses: one origin read, with
		// no per-chunk answers to fetch and walk.
		if err := readDev(s.origin.dev, p, at); err != nil {
			return false, fmt.Errorf("chunks %d to %d: origin %s: %w", first, end-1, s.origin.dev.Name(), err)
		}
		return true, nil
	}
	// The answers come from a pool: a buffer passed to a store's method
	// escapes, and a window's is too big to allocate per read.
	statesp := s.lookups.Get().(*[maxReadRunChunks]exstore.LookupResult)
	defer s.lookups.Put(statesp)
	states := statesp[:end-first]
	release := exstore.NoRelease
	var token uint64
	if optimistic {
		token, optimistic = s.optimistic.LookupRangeOptimistic(first, states)
	}
	if !optimistic {
		release, err = s.lookupRange(ctx, first, states)
		defer release()
		if err != nil {
			return false, err
		}
	}
	for c := first; c < end; {
		st := states[c-first]
		runEnd := c + 1
		for runEnd < end {
			next := states[runEnd-first]
			if next.Found != st.Found || (st.Found && next.New != st.New+(runEnd-c)) {
				break
			}
			runEnd++
		}
		from := max(at, int64(c)*s.chunkBytes)
		to := min(at+int64(len(p)), int64(runEnd)*s.chunkBytes)
		q := p[from-at : to-at]
		if st.Found {
			if err := s.readCOW(c, st.New, from, q); err != nil {
				return false, err
			}
		} else {
			if err := readDev(s.origin.dev, q, from); err != nil {
				return false, fmt.Errorf("chunks %d to %d: origin %s: %w", c, runEnd-1, s.origin.dev.Name(), err)
			}
		}
		c = runEnd
	}
	return !optimistic || s.optimistic.Unchanged(token), nil
}

// readChunkOnce is readWindowOnce for a window of one chunk, c.
func (s *Snapshot) readChunkOnce(ctx context.Context, c exstore.Chunk, at int64, p []byte, optimistic bool) (valid bool, err error) {
	var (
		new     exstore.Chunk
		found   bool
		release = exstore.NoRelease
		token   uint64
	)
	if optimistic {
		new, found, token, optimistic = s.optimistic.LookupOptimistic(c)
	}
	if !optimistic {
		new, found, release, err = s.store.Lookup(ctx, c)
		defer release()
		if err != nil {
			return false, fmt.Errorf("chunk %d: lookup: %w", c, err)
		}
	}
	if found {
		err = s.readCOW(c, new, at, p)
	} else if err = readDev(s.origin.dev, p, at); err != nil {
		err = fmt.Errorf("chunk %d: origin %s: %w", c, s.origin.dev.Name(), err)
	}
	return err == nil && (!optimistic || s.optimistic.Unchanged(token)), err
}

// lookupRange looks up chunks first.. into into, with one call if the
// store is an exstore.RangeLookuper, and returns the release of them all.
func (s *Snapshot) lookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	if rl, ok := s.store.(exstore.RangeLookuper); ok {
		release, err := rl.LookupRange(ctx, first, into)
		if err != nil {
			return release, fmt.Errorf("chunks %d to %d: lookup: %w", first, first+exstore.Chunk(len(into))-1, err)
		}
		return release, nil
	}
	releases := make([]exstore.Release, 0, len(into))
	releaseAll := func() {
		for _, release := range releases {
			release()
		}
	}
	for i := range into {
		c := first + exstore.Chunk(i)
		new, found, release, err := s.store.Lookup(ctx, c)
		releases = append(releases, release)
		if err != nil {
			return releaseAll, fmt.Errorf("chunk %d: lookup: %w", c, err)
		}
		into[i] = exstore.LookupResult{New: new, Found: found}
	}
	return releaseAll, nil
}

// readCOW reads p at at of chunk old from its COW chunk new.
func (s *Snapshot) readCOW(old, new exstore.Chunk, at int64, p []byte) error {
	if err := readDev(s.cow, p, s.cowOffset(old, new, at)); err != nil {
		return fmt.Errorf("chunk %d: COW chunk %d: %w", old, new, err)
	}
	return nil
}
