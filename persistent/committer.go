package persistent

import (
	"fmt"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

func (s *Store) start() { go s.committer() }

// committer writes batches: every commit that arrives while a batch is being
// written joins the next one, so the number of syncs per exception falls as
// the load rises.
func (s *Store) committer() {
	defer close(s.stopped)
	for {
		select {
		case <-s.wake:
		case <-s.stop:
			return
		}
		for s.commitBatch() {
		}
	}
}

// takeReady pops the in-order prefix of the queue that is ready or aborted.
func (s *Store) takeReady() []*prepared {
	s.allocMu.Lock()
	defer s.allocMu.Unlock()
	i := 0
	for i < len(s.queue) && (s.queue[i].ready || s.queue[i].aborted) {
		i++
	}
	if i == 0 {
		return nil
	}
	batch := make([]*prepared, 0, i)
	for _, p := range s.queue[:i] {
		delete(s.byNew, p.e.New)
		if p.ready {
			if p.lazy {
				s.lazyWaiting--
			} else {
				s.durableWaiting--
			}
			batch = append(batch, p)
		}
		// Aborted ones left pendingOld at Abort, and their origin chunk
		// may be pending again (ready ones stay marked until their record
		// is in the table).
	}
	s.queue = append(s.queue[:0], s.queue[i:]...)
	if len(batch) > 0 {
		s.batchesStarted++
	}
	return batch
}

// batchWrittenLocked records the end of a batch: the lazily committed
// exceptions still waiting are those left in the queue. The caller holds
// allocMu.
func (s *Store) batchWrittenLocked() {
	first := uint64(noLazy)
	for _, p := range s.queue {
		if p.lazy {
			first = uint64(p.e.New)
			break
		}
	}
	s.setLazyFirstLocked(first)
	s.endBatchLocked()
}

// endBatchLocked counts a batch as done and wakes the Syncs waiting for
// one. The caller holds allocMu.
func (s *Store) endBatchLocked() {
	s.batchesDone++
	close(s.batchEnd)
	s.batchEnd = make(chan struct{})
}

// commitBatch writes one batch and reports whether it found work.
func (s *Store) commitBatch() bool {
	s.metaMu.Lock()
	defer s.metaMu.Unlock()
	batch := s.takeReady()
	if batch == nil {
		return false
	}
	if len(batch) == 0 { // only aborts
		return true
	}
	err := s.Err()
	if err == nil {
		recs := make([]exstore.Exception, len(batch))
		for i, p := range batch {
			recs[i] = p.e
		}
		written, werr := s.writeRecords(recs)
		if werr != nil {
			err, _ = s.invalidate(fmt.Errorf("commit of %d exceptions: %w", len(recs), werr))
			s.unreserve(len(recs) - written)
		} else {
			// Lazily committed ones are in the table already.
			recs = recs[:0]
			for _, p := range batch {
				if !p.lazy {
					recs = append(recs, p.e)
				}
			}
			err = s.insert(s.table.Load(), recs, true)
		}
	} else {
		s.unreserve(len(batch))
	}
	s.allocMu.Lock()
	for _, p := range batch {
		delete(s.pendingOld, p.e.Old)
		if !p.lazy {
			s.unsettled-- // written or failed: its Commit returns
		}
	}
	if err == nil {
		s.batchWrittenLocked()
	} else {
		// Nothing more will be written; Sync sees the store invalid.
		s.endBatchLocked()
	}
	s.allocMu.Unlock()
	for _, p := range batch {
		if p.done != nil {
			p.done <- err
		}
	}
	return true
}

// unreserve gives back the reservations of n exceptions no batch will write.
func (s *Store) unreserve(n int) {
	s.allocMu.Lock()
	s.reserved -= uint64(n)
	s.allocMu.Unlock()
}

// flushMutant selects where writeRecords flushes. Only flushFirst keeps the
// ordering the on-disk format needs; the others exist for the crash tests'
// self-tests (see export_test.go).
type flushMutant uint8

const (
	flushFirst         flushMutant = iota // before the metadata write
	flushAfterMetadata                    // after it: records may point at lost data
	flushNever                            // not at all
)

// areaWrite is one area's part of a batch.
type areaWrite struct {
	area     uint64
	from, to uint64 // record slots written
	recs     []exstore.Exception
}

// writeRecords appends recs to the metadata with the kernel's ordering:
// zero the successor of every area the batch fills, flush (so the data the
// records point to, and those zeroes, are durable), then write each touched
// area durably, in order. It returns how many records were written before
// an error. The caller holds metaMu.
func (s *Store) writeRecords(recs []exstore.Exception) (int, error) {
	g := s.geo
	s.allocMu.Lock()
	area, slot := s.currentArea, s.committed
	s.allocMu.Unlock()
	continuesTail := true
	if slot == g.PerArea { // merge stepped back into a full area
		area, slot, continuesTail = area+1, 0, false
	}

	var writes []areaWrite
	for rest := recs; len(rest) > 0; {
		n := min(uint64(len(rest)), g.PerArea-slot)
		writes = append(writes, areaWrite{area: area, from: slot, to: slot + n, recs: rest[:n]})
		rest = rest[n:]
		if slot+n == g.PerArea {
			area, slot = area+1, 0
		} else {
			slot += n
		}
	}
	for _, w := range writes {
		if w.to == g.PerArea {
			if err := s.zeroChunk(g.AreaLocation(w.area + 1)); err != nil {
				return 0, fmt.Errorf("zero metadata area %d: %w", w.area+1, err)
			}
		}
	}
	if s.flushMutant == flushFirst {
		if err := s.dev.Sync(); err != nil {
			return 0, fmt.Errorf("flush before metadata write: %w", err)
		}
	}
	written := 0
	for i, w := range writes {
		if err := s.writeArea(w, i == 0 && continuesTail); err != nil {
			return written, err
		}
		if s.flushMutant == flushAfterMetadata {
			if err := s.dev.Sync(); err != nil {
				return written, fmt.Errorf("flush after metadata write: %w", err)
			}
		}
		written += len(w.recs)
		// The area position and the reservation move together, so Prepare
		// never counts a record twice.
		s.allocMu.Lock()
		if w.to == g.PerArea {
			s.currentArea, s.committed = w.area+1, 0
		} else {
			s.currentArea, s.committed = w.area, w.to
		}
		s.reserved -= uint64(len(w.recs))
		s.allocMu.Unlock()
		s.lastRec, s.hasLastRec = w.recs[len(w.recs)-1], true
	}
	return written, nil
}

// writeArea writes the aligned blocks of one area that hold slots
// [from, to), durably. Blocks are rebuilt from the tail block (records before
// from) and the new records; anything after them is zero, which also clears
// stale records past the terminator up to dirtyTo.
func (s *Store) writeArea(w areaWrite, continuesTail bool) error {
	a := int64(s.align)
	start := int64(w.from*RecordSize) / a * a
	end := int64(w.to * RecordSize)
	if continuesTail {
		end = max(end, s.dirtyTo)
	}
	end = min((end+a-1)/a*a, s.geo.ChunkBytes)
	if int64(cap(s.writeBuf)) < end-start {
		s.writeBuf = blockdev.AlignedBuffer(int(end-start), s.align)
	}
	buf := s.writeBuf[:end-start]
	clear(buf)
	if continuesTail {
		copy(buf, s.tail)
	}
	for i, r := range w.recs {
		EncodeRecord(buf, int(w.from-uint64(start)/RecordSize)+i, r)
	}
	if _, err := s.dev.WriteAtSync(buf, s.areaOffset(w.area)+start); err != nil {
		return fmt.Errorf("write metadata area %d (chunk %d): %w", w.area, s.geo.AreaLocation(w.area), err)
	}
	if continuesTail {
		s.dirtyTo = 0
	}
	// Keep the block that holds the next free slot as the new tail.
	if w.to == s.geo.PerArea {
		clear(s.tail)
	} else {
		last := int64(w.to*RecordSize) / a * a
		copy(s.tail, buf[last-start:])
		clear(s.tail[int64(w.to*RecordSize)-last:])
	}
	return nil
}
