package persistent

import (
	"context"

	"github.com/clustersnap/clustersnap/exstore"
)

// scan reads metadata from (area, slot) onwards until the terminator. An
// incremental scan (Refresh after growth) adds the records to the live
// table; a full scan (load, reload) builds a new table and publishes it with
// the new area position and next_free at once, so concurrent lookups never
// see a half-loaded table and Prepare never allocates from a reset next_free.
// The caller holds metaMu, or is Open.
func (s *Store) scan(ctx context.Context, area, slot uint64, full bool) error {
	g := s.geo
	maxNew := uint64(0)
	var recs []exstore.Exception
	table := s.table.Load()
	if full {
		table = exstore.NewTable()
	}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		loc := g.AreaLocation(area)
		if uint64(loc) >= g.Chunks {
			// Only reached after a full area: the kernel fails such a load.
			return s.errf("%w: metadata area %d is full but its successor (chunk %d) lies past the end of the device (%d chunks)",
				ErrCorrupt, area-1, loc, g.Chunks)
		}
		found, end, err := s.scanArea(area, slot, &recs, &maxNew)
		if err != nil {
			return err
		}
		if err := s.insert(table, recs, !full); err != nil {
			return err
		}
		recs = recs[:0]
		if !found {
			area, slot = area+1, 0
			continue
		}
		next := g.skipMetadata(max(2, maxNew+1))
		if full {
			s.mu.Lock()
			s.table.Store(table)
			s.mu.Unlock()
		}
		s.allocMu.Lock()
		s.currentArea, s.committed = area, end
		if full || next > s.nextFree {
			s.nextFree = next
		}
		s.allocMu.Unlock()
		return nil
	}
}

// scanArea reads records of one area from slot on. found says whether a
// terminator was met (at slot end); records before it are appended to recs.
// Non-zero records after the terminator are logged and remembered in dirtyTo
// so that the next write of this area clears them.
func (s *Store) scanArea(area, slot uint64, recs *[]exstore.Exception, maxNew *uint64) (found bool, end uint64, err error) {
	g := s.geo
	base := s.areaOffset(area)
	blk := uint64(s.align / RecordSize)
	perRead := uint64(min(g.ChunkBytes, readChunk) / RecordSize)
	first := slot - slot%blk
	term := uint64(0)
	for from := first; from < g.PerArea; from += perRead {
		n := min(perRead, g.PerArea-from)
		b, err := s.readAt(base+int64(from*RecordSize), int(n*RecordSize))
		if err != nil {
			return false, 0, s.errf("read metadata area %d (chunk %d): %w", area, g.AreaLocation(area), err)
		}
		start := uint64(0)
		if from < slot {
			start = slot - from
		}
		for i := start; i < n; i++ {
			r := DecodeRecord(b, int(i))
			if !found {
				if r.New == 0 {
					found, term = true, from+i
					// The block holding the terminator is the tail the
					// next commit continues.
					bs := (i - i%blk) * RecordSize
					copy(s.tail, b[bs:bs+uint64(s.align)])
					clear(s.tail[(i%blk)*RecordSize:])
					continue
				}
				if err := s.checkRecord(area, from+i, r); err != nil {
					return false, 0, err
				}
				*recs = append(*recs, r)
				*maxNew = max(*maxNew, uint64(r.New))
				s.lastRec, s.hasLastRec = r, true
				continue
			}
			if r.Old != 0 || r.New != 0 {
				s.log.Warn("non-zero record after the terminator; it will be cleared by the next metadata write",
					"cow", s.name, "area", area, "slot", from+i, "terminator_slot", term, "record", r.String())
				s.dirtyTo = max(s.dirtyTo, int64(from+i+1)*RecordSize)
			}
		}
	}
	if found {
		return true, term, nil
	}
	return false, g.PerArea, nil
}

// checkRecord refuses records that point outside the device or at metadata:
// the kernel would follow them and read or overwrite the wrong chunk.
func (s *Store) checkRecord(area, slot uint64, r exstore.Exception) error {
	g := s.geo
	switch {
	case uint64(r.New) >= g.Chunks:
		return s.errf("%w: area %d slot %d: exception %v points past the end of the device (%d chunks)", ErrCorrupt, area, slot, r, g.Chunks)
	case g.IsMetadata(r.New):
		return s.errf("%w: area %d slot %d: exception %v points at a metadata chunk", ErrCorrupt, area, slot, r)
	case r.Old > exstore.MaxChunk:
		return s.errf("%w: area %d slot %d: origin chunk of exception %v is beyond the 2^56 limit", ErrCorrupt, area, slot, r)
	}
	return nil
}

func (s *Store) insert(table *exstore.Table, recs []exstore.Exception, live bool) error {
	if len(recs) == 0 {
		return nil
	}
	if live {
		s.mu.Lock()
		defer s.mu.Unlock()
	}
	for _, r := range recs {
		if err := table.Insert(r); err != nil {
			return s.errf("%w: exception %v: %w", ErrCorrupt, r, err)
		}
	}
	return nil
}

// loadTail reads the aligned block of the current area that holds slot
// committed and clears everything from that slot on in memory.
func (s *Store) loadTail() error {
	blkSlots := uint64(s.align / RecordSize)
	first := s.committed - s.committed%blkSlots
	if s.committed == s.geo.PerArea { // a full area is never current
		return s.errf("internal: current area %d is full", s.currentArea)
	}
	b, err := s.readAt(s.areaOffset(s.currentArea)+int64(first*RecordSize), s.align)
	if err != nil {
		return s.errf("read metadata area %d: %w", s.currentArea, err)
	}
	clear(b[(s.committed-first)*RecordSize:])
	copy(s.tail, b)
	return nil
}

// readSlots reads records [lo, hi) of an area.
func (s *Store) readSlots(area, lo, hi uint64) ([]exstore.Exception, error) {
	blk := uint64(s.align / RecordSize)
	first := lo - lo%blk
	last := (hi + blk - 1) / blk * blk
	b, err := s.readAt(s.areaOffset(area)+int64(first*RecordSize), int((last-first)*RecordSize))
	if err != nil {
		return nil, s.errf("read metadata area %d: %w", area, err)
	}
	out := make([]exstore.Exception, 0, hi-lo)
	for i := lo; i < hi; i++ {
		out = append(out, DecodeRecord(b, int(i-first)))
	}
	return out, nil
}

// recordBefore reads the record just before slot of area, in the previous
// area when slot is 0; ok is false at the very start of the metadata.
func (s *Store) recordBefore(area, slot uint64) (r exstore.Exception, ok bool, err error) {
	if slot == 0 {
		if area == 0 {
			return exstore.Exception{}, false, nil
		}
		area, slot = area-1, s.geo.PerArea
	}
	recs, err := s.readSlots(area, slot-1, slot)
	if err != nil {
		return exstore.Exception{}, false, err
	}
	return recs[0], true, nil
}
