package clusterload

import (
	"fmt"
	"sync"
)

// WriteRec is one write the workload sent: acked once the server
// acknowledged it, flushed once a flush sent after that acknowledgement
// (on the same connection) completed.
type WriteRec struct {
	V       Value
	acked   bool
	flushed bool
}

// blockKey is one block of one device.
type blockKey struct {
	t     Target
	block int64
}

// History records every write the workload sent, per block in the order
// sent. Each block has one writer at a time (a node's writer that waits
// for each reply before it sends the next request), so this order is the
// order the writes reached the device in.
type History struct {
	mu     sync.Mutex
	writes map[blockKey][]*WriteRec
	sent   map[Value]blockKey
	acked  int
}

// Sent is how many writes were sent.
func (h *History) Sent() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.sent)
}

// NewHistory returns an empty history.
func NewHistory() *History {
	return &History{writes: map[blockKey][]*WriteRec{}, sent: map[Value]blockKey{}}
}

// Send records a write of v to block of t before it is sent.
func (h *History) Send(t Target, block int64, v Value) *WriteRec {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := &WriteRec{V: v}
	k := blockKey{t, block}
	h.writes[k] = append(h.writes[k], r)
	h.sent[v] = k
	return r
}

// Ack records the server's acknowledgement of r.
func (h *History) Ack(r *WriteRec) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !r.acked {
		h.acked++
	}
	r.acked = true
}

// Flushed records that a flush covering rs completed.
func (h *History) Flushed(rs []*WriteRec) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range rs {
		r.flushed = true
	}
}

// Acked is how many writes the servers acknowledged.
func (h *History) Acked() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.acked
}

// Readable reports whether a read of block on t may return v at a moment
// when the writes sent so far are the recorded ones: the original content,
// or a write sent to that very block.
func (h *History) Readable(t Target, block int64, v Value) bool {
	if v == Pristine {
		return true
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	k, ok := h.sent[v]
	return ok && k == blockKey{t, block}
}

// FinalReport is what CheckFinal found on one device.
type FinalReport struct {
	// Blocks were checked; of them, Written had a write sent and Flushed
	// a flushed write.
	Blocks, Written, Flushed int
	Problems                 []string
}

// CheckFinal checks the final image img of t: every block holds its last
// flushed write (the original if none was flushed) or a write sent after
// it; none holds a value nobody wrote there.
func (h *History) CheckFinal(t Target, img []byte) FinalReport {
	h.mu.Lock()
	defer h.mu.Unlock()
	var rep FinalReport
	for block := int64(0); block < int64(len(img)/BlockSize); block++ {
		rep.Blocks++
		data := img[block*BlockSize : (block+1)*BlockSize]
		got, ok := DecodeBlock(data, block)
		if !ok {
			rep.Problems = append(rep.Problems, fmt.Sprintf("%v block %d holds a value nobody wrote there", t, block))
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
			rep.Written++
		}
		if last >= 0 {
			rep.Flushed++
		}
		allowed := last < 0 && got == Pristine
		for _, r := range recs[max(last, 0):] {
			allowed = allowed || r.V == got
		}
		if !allowed {
			want := "the original content"
			if last >= 0 {
				want = recs[last].V.String()
			}
			rep.Problems = append(rep.Problems, fmt.Sprintf("%v block %d holds %v; the last flushed is %s (%d writes sent to it)", t, block, got, want, len(recs)))
		}
	}
	return rep
}
