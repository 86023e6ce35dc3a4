package clustertest

import (
	"encoding/binary"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
)

// Chunk content: 16-byte tags repeated over the chunk, saying which chunk
// it belongs to, what wrote it and which write it was.
const (
	kindOriginal = 0 // the origin's content when the snapshot was taken
	kindOrigin   = 1 // an origin write after it
	kindSnapshot = 2 // a snapshot write
	tagSize      = 16
)

type tag struct {
	chunk   uint32
	kind    uint8
	node    uint8
	version uint64
}

func fillTag(p []byte, tg tag) {
	for i := 0; i+tagSize <= len(p); i += tagSize {
		binary.LittleEndian.PutUint32(p[i:], tg.chunk)
		p[i+4], p[i+5], p[i+6], p[i+7] = tg.kind, tg.node, 0, 0
		binary.LittleEndian.PutUint64(p[i+8:], tg.version)
	}
}

// readTag returns the tag of a chunk's content, and false if the content
// is not one tag repeated.
func readTag(p []byte) (tag, bool) {
	tg := tag{
		chunk:   binary.LittleEndian.Uint32(p),
		kind:    p[4],
		node:    p[5],
		version: binary.LittleEndian.Uint64(p[8:]),
	}
	for i := tagSize; i+tagSize <= len(p); i += tagSize {
		if string(p[i:i+tagSize]) != string(p[:tagSize]) {
			return tg, false
		}
	}
	return tg, true
}

// snapWrite is one snapshot write in the history of a chunk, in the logical
// time of the test's clock; a write that failed may still have landed, so
// it never supersedes anything.
type snapWrite struct {
	version    uint64
	node       uint32
	start, end uint64
	ok         bool
}

// history is the snapshot writes of every chunk.
type history struct {
	mu     sync.Mutex
	clock  atomic.Uint64
	writes map[uint32][]*snapWrite
	dead   map[uint32]bool // nodes that crashed
}

func (h *history) begin(chunk uint32, version uint64, node uint32) *snapWrite {
	w := &snapWrite{version: version, node: node, start: h.clock.Add(1), end: math.MaxUint64}
	h.mu.Lock()
	h.writes[chunk] = append(h.writes[chunk], w)
	h.mu.Unlock()
	return w
}

// end records the end of w; a write of a node that crashed before it
// ended may be lost.
func (h *history) end(w *snapWrite, ok bool) {
	end := h.clock.Add(1)
	h.mu.Lock()
	w.end, w.ok = end, ok && !h.dead[w.node]
	h.mu.Unlock()
}

// crash records that node crashed, and that its snapshot writes that
// ended after synced (the clock before its last Sync that succeeded
// began) may be lost: their exceptions may have been committed lazily and
// never written, and they were never flushed.
func (h *history) crash(node uint32, synced uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dead[node] = true
	for _, writes := range h.writes {
		for _, w := range writes {
			if w.node == node && w.end > synced {
				w.ok = false
			}
		}
	}
}

// check says what is wrong with a snapshot read of chunk that started at
// start, ended at end and returned tg, or "".
func (h *history) check(chunk uint32, tg tag, start, end uint64) string {
	if tg.chunk != chunk {
		return fmt.Sprintf("chunk %d read the data of chunk %d (%+v)", chunk, tg.chunk, tg)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	writes := h.writes[chunk]
	supersededBefore := func(after uint64) bool { // a write that began after `after` and ended before the read began
		for _, w := range writes {
			if w.ok && w.start > after && w.end < start {
				return true
			}
		}
		return false
	}
	switch tg.kind {
	case kindOrigin:
		return fmt.Sprintf("chunk %d: snapshot read returned origin data written after the snapshot (%+v)", chunk, tg)
	case kindOriginal:
		if supersededBefore(0) {
			return fmt.Sprintf("chunk %d: snapshot read returned the original data after a snapshot write completed", chunk)
		}
		return ""
	case kindSnapshot:
		for _, w := range writes {
			if w.version == tg.version {
				if w.start > end {
					return fmt.Sprintf("chunk %d: read returned write %d before it began", chunk, tg.version)
				}
				if w.end != math.MaxUint64 && supersededBefore(w.end) {
					return fmt.Sprintf("chunk %d: read returned write %d, superseded before the read began", chunk, tg.version)
				}
				return ""
			}
		}
		return fmt.Sprintf("chunk %d: read returned snapshot write %d, which never happened", chunk, tg.version)
	}
	return fmt.Sprintf("chunk %d: unknown content %+v", chunk, tg)
}
