// Package cutcheck checks that a snapshot taken while writers ran is a
// cut of their history: test code for live snapshot creation.
//
// The writers write whole regions of the volume, each write filling its
// region with a stamp that names it (Fill), and the History logs, on one
// logical clock, when each write was sent and when it was acknowledged,
// and when the snapshot's creation began and returned. A snapshot image is
// a cut when every region reads as exactly one write (or the region's
// content before any write, stamp 0) that:
//   - was sent before the creation returned (nothing that started after
//     it may show), and
//   - was not superseded before the creation began: no other write of the
//     region was sent after it was acknowledged and acknowledged itself
//     before the creation began (every write acknowledged before the
//     creation began shows, or a later one does).
//
// A region that mixes stamps shows a write only in part: a write in
// flight during the creation must be wholly in or wholly out.
package cutcheck

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
)

// StampBytes is the size of one stamp in a region's content.
const StampBytes = 8

// Fill fills p, one region's content, with stamp repeated.
func Fill(p []byte, stamp uint64) {
	for i := 0; i+StampBytes <= len(p); i += StampBytes {
		binary.LittleEndian.PutUint64(p[i:], stamp)
	}
}

// Initial fills a region with stamp 0 (the content before any write).
func Initial(p []byte) { Fill(p, 0) }

// write is one logged write.
type write struct {
	region      int
	sent, acked uint64 // clock ticks; acked 0 while in flight or failed
}

// History logs region writes and one snapshot creation on a logical clock.
// It is safe for concurrent use.
type History struct {
	regionBytes int
	clock       atomic.Uint64
	mu          sync.Mutex
	writes      map[uint64]*write // by stamp
	next        uint64
	cutBegin    uint64
	cutEnd      uint64
}

// New returns the history of a volume cut into regions of regionBytes
// (a multiple of StampBytes).
func New(regionBytes int) *History {
	if regionBytes <= 0 || regionBytes%StampBytes != 0 {
		panic(fmt.Sprintf("cutcheck: region of %d bytes is not a positive multiple of %d", regionBytes, StampBytes))
	}
	return &History{regionBytes: regionBytes, writes: map[uint64]*write{}}
}

// RegionBytes is the size of a region.
func (h *History) RegionBytes() int { return h.regionBytes }

// Send logs a write of region about to be sent and returns its stamp,
// which the caller fills the region's buffer with.
func (h *History) Send(region int) uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.next++
	h.writes[h.next] = &write{region: region, sent: h.clock.Add(1)}
	return h.next
}

// Ack logs the acknowledgement of the write of stamp. A write that failed
// is never acknowledged: it may show or not.
func (h *History) Ack(stamp uint64) {
	tick := h.clock.Add(1)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.writes[stamp].acked = tick
}

// Write writes region with write (given the region's content and offset),
// logging it: buf, of RegionBytes, is filled with the write's stamp. The
// write is acknowledged if write returns nil, whose error it returns.
func (h *History) Write(region int, buf []byte, write func(p []byte, off int64) error) error {
	stamp := h.Send(region)
	Fill(buf, stamp)
	if err := write(buf, int64(region)*int64(h.regionBytes)); err != nil {
		return err
	}
	h.Ack(stamp)
	return nil
}

// CutBegins logs that the snapshot's creation is about to be asked for.
func (h *History) CutBegins() { h.cutBegin = h.clock.Add(1) }

// CutEnds logs that the creation returned.
func (h *History) CutEnds() { h.cutEnd = h.clock.Add(1) }

// Writes is the number of writes logged, and how many were acknowledged.
func (h *History) Writes() (sent, acked int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, w := range h.writes {
		if w.acked != 0 {
			acked++
		}
	}
	return len(h.writes), acked
}

// Check judges image, the snapshot read in full, and returns a description
// of every region that breaks the cut (at most limit of them; 0 for all).
func (h *History) Check(image []byte, limit int) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cutBegin == 0 || h.cutEnd == 0 {
		return []string{"the history has no cut"}
	}
	var bad []string
	add := func(format string, args ...any) bool {
		bad = append(bad, fmt.Sprintf(format, args...))
		return limit > 0 && len(bad) >= limit
	}
	byRegion := map[int][]*write{}
	for _, w := range h.writes {
		byRegion[w.region] = append(byRegion[w.region], w)
	}
	for r := 0; (r+1)*h.regionBytes <= len(image); r++ {
		region := image[r*h.regionBytes : (r+1)*h.regionBytes]
		stamp := binary.LittleEndian.Uint64(region)
		for i := StampBytes; i < len(region); i += StampBytes {
			if s := binary.LittleEndian.Uint64(region[i:]); s != stamp {
				if add("region %d: stamps %d and %d (at byte %d): a write shows only in part", r, stamp, s, i) {
					return bad
				}
				stamp = 0
				break
			}
		}
		if msg := h.judge(r, stamp, byRegion[r]); msg != "" {
			if add("region %d: %s", r, msg) {
				return bad
			}
		}
	}
	return bad
}

// judge says what is wrong with region r showing stamp, "" if nothing.
func (h *History) judge(r int, stamp uint64, writes []*write) string {
	var shown *write
	if stamp != 0 {
		w, ok := h.writes[stamp]
		switch {
		case !ok:
			return fmt.Sprintf("stamp %d was never written", stamp)
		case w.region != r:
			return fmt.Sprintf("stamp %d was written to region %d", stamp, w.region)
		case w.sent > h.cutEnd:
			return fmt.Sprintf("stamp %d was sent after the creation returned", stamp)
		}
		shown = w
	}
	for _, c := range writes {
		if c == shown || c.acked == 0 || c.acked > h.cutBegin {
			continue
		}
		// c was acknowledged before the creation began: what shows must
		// be c or a write not acknowledged before c was sent.
		if shown == nil {
			return "shows its initial content, but a write was acknowledged before the creation began"
		}
		if shown.acked != 0 && shown.acked < c.sent {
			return fmt.Sprintf("stamp %d was overwritten by a write acknowledged before the creation began", stamp)
		}
	}
	return ""
}
