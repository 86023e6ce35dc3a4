package persistent

import (
	"context"

	"github.com/clustersnap/clustersnap/exstore"
)

// PrepareMerge implements exstore.Store as the kernel's prepare_merge: the
// last record, and how many records before it in the same area continue it
// backwards in both old and new chunk.
func (s *Store) PrepareMerge(ctx context.Context) (exstore.Exception, int, error) {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	if err := s.Err(); err != nil {
		return exstore.Exception{}, 0, err
	}
	s.allocMu.Lock()
	busy := len(s.queue) > 0
	area, committed := s.currentArea, s.committed
	s.allocMu.Unlock()
	if busy {
		return exstore.Exception{}, 0, s.errf("%w: exceptions are being committed", exstore.ErrMerge)
	}
	s.merge.n = 0
	if committed == 0 {
		if area == 0 {
			return exstore.Exception{}, 0, nil
		}
		area, committed = area-1, s.geo.PerArea
		s.allocMu.Lock()
		s.currentArea, s.committed = area, committed
		s.allocMu.Unlock()
		if err := s.loadTailAt(); err != nil {
			return exstore.Exception{}, 0, err
		}
	}
	const window = 4096
	var last exstore.Exception
	n := 0
	for hi := committed; hi > 0; {
		if err := ctx.Err(); err != nil {
			return exstore.Exception{}, 0, err
		}
		lo := hi - min(hi, window)
		recs, err := s.readSlots(area, lo, hi)
		if err != nil {
			return exstore.Exception{}, 0, err
		}
		for i := len(recs) - 1; i >= 0; i-- {
			r := recs[i]
			if n == 0 {
				last, n = r, 1
				continue
			}
			if r.Old+exstore.Chunk(n) != last.Old || r.New+exstore.Chunk(n) != last.New {
				s.merge.last, s.merge.n = last, n
				return last, n, nil
			}
			n++
		}
		hi = lo
	}
	s.merge.last, s.merge.n = last, n
	return last, n, nil
}

// loadTailAt reloads the tail block after the area position moved back.
func (s *Store) loadTailAt() error {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	if s.committed == s.geo.PerArea {
		// A full area stepped back into for merging: the tail is empty
		// until CommitMerge clears records.
		clear(s.tail)
		return nil
	}
	return s.loadTail()
}

// CommitMerge implements exstore.Store as the kernel's commit_merge: the last
// n records are zeroed and the area written with flush and FUA; next_free
// becomes the in-order value after the remaining records.
func (s *Store) CommitMerge(ctx context.Context, n int) error {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	if err := s.Err(); err != nil {
		return err
	}
	if n <= 0 || n > s.merge.n {
		return s.errf("%w: commit of %d merged exceptions, but the last prepare returned %d", exstore.ErrMerge, n, s.merge.n)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	s.allocMu.Lock()
	area, committed := s.currentArea, s.committed
	s.allocMu.Unlock()
	from := committed - uint64(n)
	// The origin writes of the merged data must be durable before the
	// records go; the caller flushed the origin, this flushes the COW.
	if err := s.dev.Sync(); err != nil {
		return s.errf("flush before merge commit: %w", err)
	}
	a := uint64(s.align)
	start := from * RecordSize / a * a
	end := min((committed*RecordSize+a-1)/a*a, uint64(s.geo.ChunkBytes))
	head, err := s.readAt(s.areaOffset(area)+int64(start), int(end-start))
	if err != nil {
		return s.errf("read metadata area %d: %w", area, err)
	}
	clear(head[from*RecordSize-start:])
	if _, err := s.dev.WriteAtSync(head, s.areaOffset(area)+int64(start)); err != nil {
		return s.errf("write metadata area %d: %w", area, err)
	}
	last := s.merge.last
	s.mu.Lock()
	s.table.Load().Remove(last.Old-exstore.Chunk(n-1), uint64(n))
	s.mu.Unlock()
	s.merge.n -= n
	s.merge.last = exstore.Exception{Old: last.Old - exstore.Chunk(n), New: last.New - exstore.Chunk(n)}

	s.allocMu.Lock()
	s.committed = from
	s.nextFree = s.geo.skipMetadata(uint64(s.geo.AreaLocation(area)) + from + 1)
	s.allocMu.Unlock()
	s.hasLastRec = false
	prev, ok, err := s.recordBefore(area, from)
	if err != nil {
		return err
	}
	s.lastRec, s.hasLastRec = prev, ok
	return s.loadTailAt()
}
