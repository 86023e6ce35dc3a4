package cluster

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"sync"
)

// blockSize is the unit every workload write and check uses.
const blockSize = 4096

// target is a device the workload writes: the origin or the snapshot.
type target uint8

const (
	toOrigin target = iota + 1
	toSnapshot
)

func (t target) String() string {
	if t == toOrigin {
		return "origin"
	}
	return "snapshot"
}

// value names what a block holds: the original content (kind 0), or one
// write: which device it went to, which node sent it, and that node's
// sequence number (unique per node and run).
type value struct {
	kind target // 0: the original content
	node uint8
	seq  uint32
}

// pristine is what every block holds before the workload.
var pristine = value{}

func (v value) String() string {
	if v == pristine {
		return "the original content"
	}
	return fmt.Sprintf("%v write %d of node %d", v.kind, v.seq, v.node)
}

// blockMagic starts every sector of a block the test wrote.
var blockMagic = [8]byte{'c', 's', 'n', 'a', 'p', 'b', 'l', 'k'}

// encodeBlock is the content of block (its index on its device) holding
// v: every 512-byte sector names the value, the block and itself, and the
// rest of it is a pseudo-random fill derived from those, so that a block
// holding a value written to another block, a mix of two writes or any
// other bytes decodes as nobody's.
func encodeBlock(v value, block int64) []byte {
	b := make([]byte, blockSize)
	for s := range blockSize / 512 {
		sec := b[s*512 : (s+1)*512]
		copy(sec, blockMagic[:])
		sec[8], sec[9], sec[10] = byte(v.kind), v.node, byte(s)
		binary.BigEndian.PutUint32(sec[12:], v.seq)
		binary.BigEndian.PutUint64(sec[16:], uint64(block))
		x := uint64(block)<<20 ^ uint64(v.seq)<<8 ^ uint64(v.node)<<4 ^ uint64(v.kind) ^ uint64(s)<<60 | 1
		for k := 24; k < 512; k += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			binary.LittleEndian.PutUint64(sec[k:], x)
		}
	}
	return b
}

// decodeBlock returns the value block holds, or false if it holds
// anything nobody wrote there.
func decodeBlock(data []byte, block int64) (value, bool) {
	if len(data) != blockSize || !bytes.Equal(data[:8], blockMagic[:]) {
		return value{}, false
	}
	v := value{kind: target(data[8]), node: data[9], seq: binary.BigEndian.Uint32(data[12:])}
	return v, bytes.Equal(data, encodeBlock(v, block))
}

// writeRec is one write the workload sent: acked once the server
// acknowledged it, flushed once a flush sent after that acknowledgement
// (on the same connection) completed.
type writeRec struct {
	v       value
	acked   bool
	flushed bool
}

// blockKey is one block of one device.
type blockKey struct {
	t     target
	block int64
}

// history records every write the workload sent, per block in the order
// sent. Each block has one writer at a time (a node's writer that waits
// for each reply before it sends the next request), so this order is the
// order the writes reached the device in.
type history struct {
	mu     sync.Mutex
	writes map[blockKey][]*writeRec
	sent   map[value]blockKey
}

func newHistory() *history {
	return &history{writes: map[blockKey][]*writeRec{}, sent: map[value]blockKey{}}
}

// send records a write before it is sent.
func (h *history) send(t target, block int64, v value) *writeRec {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := &writeRec{v: v}
	k := blockKey{t, block}
	h.writes[k] = append(h.writes[k], r)
	h.sent[v] = k
	return r
}

// ack records the server's acknowledgement of r.
func (h *history) ack(r *writeRec) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r.acked = true
}

// flushed records that a flush covering rs completed.
func (h *history) flushed(rs []*writeRec) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range rs {
		r.flushed = true
	}
}

// readable reports whether a read of block on t may return v at a moment
// when the writes sent so far are the recorded ones: the original content, or a
// write sent to that very block.
func (h *history) readable(t target, block int64, v value) bool {
	if v == pristine {
		return true
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	k, ok := h.sent[v]
	return ok && k == blockKey{t, block}
}

// finalReport is what checkFinal found on one device.
type finalReport struct {
	blocks, written, flushed int // blocks checked, of them written, of them with a flushed write
	problems                 []string
}

// checkFinal checks the final image img of t: every block holds its last
// flushed write (the original if none was flushed) or a write sent after
// it; none holds a value nobody wrote there.
func (h *history) checkFinal(t target, img []byte) finalReport {
	h.mu.Lock()
	defer h.mu.Unlock()
	var rep finalReport
	for block := int64(0); block < int64(len(img)/blockSize); block++ {
		rep.blocks++
		data := img[block*blockSize : (block+1)*blockSize]
		got, ok := decodeBlock(data, block)
		if !ok {
			rep.problems = append(rep.problems, fmt.Sprintf("%v block %d holds a value nobody wrote there", t, block))
			continue
		}
		recs := h.writes[blockKey{t, block}]
		last := -1
		for i, r := range recs {
			if r.flushed {
				last = i
			}
		}
		if len(recs) > 0 {
			rep.written++
		}
		if last >= 0 {
			rep.flushed++
		}
		allowed := last < 0 && got == pristine
		for _, r := range recs[max(last, 0):] {
			allowed = allowed || r.v == got
		}
		if !allowed {
			want := "the original content"
			if last >= 0 {
				want = recs[last].v.String()
			}
			rep.problems = append(rep.problems, fmt.Sprintf("%v block %d holds %v; the last flushed is %s (%d writes sent to it)", t, block, got, want, len(recs)))
		}
	}
	return rep
}
