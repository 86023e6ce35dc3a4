package clusterload

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/clustersnap/clustersnap/volumes"
)

// The layout of the workload at scale 1, in blocks of BlockSize. At scale
// k (Options.Scale) the origin, its written range and the snapshot ranges
// are k times as large, so that more chunks are fresh: a chunk is copied
// once, after which its writes take no cluster lock.
const (
	// Nodes is how many nodes the workload drives, numbered from 1.
	Nodes = 3
	// OriginBlocks is the origin's size: 16 MiB.
	OriginBlocks = 4096
	// COWSize is a COW that holds every chunk the workload copies.
	COWSize = 40 << 20
	// ChunkBytes is the COW's chunk: four blocks, written by different
	// nodes, so that nodes race to copy one chunk.
	ChunkBytes     = 16 << 10
	BlocksPerChunk = ChunkBytes / BlockSize
	// Origin writes go to blocks [0, OriginWritten); block b belongs to
	// node b%3+1. The rest of the origin keeps its original content.
	// Each chunk of that range is fresh until it is first written; the
	// writers walk the chunks once, then rewrite copied ones.
	OriginWritten = 3072
	// Node i writes the snapshot's blocks [SnapBase+(i-1)*SnapPerNode,
	// SnapBase+i*SnapPerNode): whole chunks, disjoint between nodes, that
	// the origin writes also reach.
	SnapBase    = 2048
	SnapPerNode = 256
	// FlushEvery is how many acknowledged writes a writer sends between
	// flushes.
	FlushEvery = 8
	// ReadBlocks is the length of a snapshot read, in blocks.
	ReadBlocks = 16
	// SnapshotExport is the snapshot's export name on every node.
	SnapshotExport = "snap"
)

// DialFunc connects to export on node i.
type DialFunc func(ctx context.Context, i int, export string) (*Client, error)

// Options configure a Workload.
type Options struct {
	// Seed makes the run deterministic up to timing.
	Seed uint64
	// Dial connects to a node's export.
	Dial DialFunc
	// RequestTimeout bounds one request; a survivor's request may wait
	// for the lock engine to give it a dead node's locks.
	RequestTimeout time.Duration
	// Scale multiplies the layout (0 means 1); the origin and COW must be
	// OriginBlocks and COWSize of the Workload.
	Scale int
}

// nodeLink is the workload's view of whether node i serves: workers
// connect only while up is closed.
type nodeLink struct {
	mu  sync.Mutex
	up  chan struct{}
	gen int // incarnation: 0 at first, +1 per Down
}

func (n *nodeLink) state() (<-chan struct{}, int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.up, n.gen
}

// Counts are what a Workload saw so far.
type Counts struct {
	// Acked are the origin writes acknowledged per node (index 0 unused).
	Acked [Nodes + 1]int
	// AckedGen are the writes (both devices) acknowledged by each node's
	// current incarnation; OriginGen those of them to the origin.
	AckedGen, OriginGen [Nodes + 1]int
	// Failed are the writes that failed or were in flight when a node
	// died.
	Failed [Nodes + 1]int
	// Flushes completed; snapshot Reads checked, with Checks blocks.
	Flushes, Reads, Checks int
	// Problems are what the workload found wrong.
	Problems []string
}

// Workload is the concurrent load on the nodes and what it saw. Its
// nodes start down: call Serving for each before its workers can connect.
type Workload struct {
	o     Options
	h     *History
	links [Nodes + 1]*nodeLink
	stop  chan struct{}
	wg    sync.WaitGroup
	once  sync.Once
	order []int        // the chunks origin writers walk
	turn  atomic.Int64 // origin writes that walked order so far
	scale int          // Options.Scale, at least 1

	mu      sync.Mutex
	changed chan struct{} // closed and replaced when the counters move
	c       Counts
}

// NewWorkload returns a workload of o, its nodes down, its workers not
// started.
func NewWorkload(o Options) *Workload {
	w := &Workload{o: o, h: NewHistory(), stop: make(chan struct{}), changed: make(chan struct{}), scale: max(o.Scale, 1)}
	for i := 1; i <= Nodes; i++ {
		w.links[i] = &nodeLink{up: make(chan struct{})}
	}
	w.order = rand.New(rand.NewPCG(o.Seed, 1)).Perm(w.scale * OriginWritten / BlocksPerChunk)
	return w
}

// FreshChunks is how many of the origin chunks the writers walk they have
// not reached yet, and how many they walk in all: while some are left,
// origin writes keep racing to copy chunks.
func (w *Workload) FreshChunks() (left, all int) {
	return max(0, len(w.order)-int(w.turn.Load())/Nodes), len(w.order)
}

// OriginBlocks is the size of the workload's origin, in blocks.
func (w *Workload) OriginBlocks() int64 { return int64(w.scale) * OriginBlocks }

// COWSize is the size of a COW that holds every chunk the workload
// copies, in bytes.
func (w *Workload) COWSize() int64 { return int64(w.scale) * COWSize }

// History is every write the workload sent.
func (w *Workload) History() *History { return w.h }

// Serving says node i serves: its workers connect.
func (w *Workload) Serving(i int) {
	n := w.links[i]
	n.mu.Lock()
	defer n.mu.Unlock()
	close(n.up)
}

// Down starts node i's next incarnation, which does not serve yet: call
// it before the node is killed, so that its requests failing from then on
// are expected, not problems. It zeroes the node's per-incarnation counts.
func (w *Workload) Down(i int) {
	n := w.links[i]
	n.mu.Lock()
	n.up = make(chan struct{})
	n.gen++
	n.mu.Unlock()
	w.note(func() { w.c.AckedGen[i], w.c.OriginGen[i] = 0, 0 })
}

// Incarnation is node i's incarnation: 0 at first, +1 per Down.
func (w *Workload) Incarnation(i int) int {
	_, gen := w.links[i].state()
	return gen
}

// Go runs f as one of the workload's workers: Stop waits for it.
func (w *Workload) Go(f func()) { w.wg.Go(f) }

// Stop tells the workers to stop (each writer flushes once more) and
// waits for them. It may be called more than once.
func (w *Workload) Stop() {
	w.once.Do(func() { close(w.stop) })
	w.wg.Wait()
}

func (w *Workload) note(f func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	f()
	close(w.changed)
	w.changed = make(chan struct{})
}

// Problem records something the workload found wrong.
func (w *Workload) Problem(format string, args ...any) {
	w.note(func() { w.c.Problems = append(w.c.Problems, fmt.Sprintf(format, args...)) })
}

// proceed reports whether the workers may send another request: not once
// the workload stops or ctx ends.
func (w *Workload) proceed(ctx context.Context) bool {
	select {
	case <-w.stop:
		return false
	case <-ctx.Done():
		return false
	default:
		return true
	}
}

// failing reports whether the workload saw a problem.
func (w *Workload) failing() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.c.Problems) > 0
}

// Counts is what the workload saw so far.
func (w *Workload) Counts() Counts {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.c
	c.Problems = append([]string(nil), w.c.Problems...)
	return c
}

// WaitAcked waits until node i has had min origin writes acknowledged; it
// fails once the workload saw a problem, or when ctx ends.
func (w *Workload) WaitAcked(ctx context.Context, i, min int) error {
	for {
		w.mu.Lock()
		n, ch, bad := w.c.Acked[i], w.changed, len(w.c.Problems)
		w.mu.Unlock()
		if n >= min {
			return nil
		}
		if bad > 0 {
			return fmt.Errorf("node %d: %d origin writes acknowledged, waiting for %d, but the workload failed", i, n, min)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("node %d: %d origin writes acknowledged, waiting for %d: %w", i, n, min, ctx.Err())
		}
	}
}

// connect returns a connection to export on node i once it serves, with
// the node's incarnation it was made to, or nil when the workload stops.
// A node that serves must accept.
func (w *Workload) connect(ctx context.Context, i int, export string) (*Client, int) {
	for {
		up, gen := w.links[i].state()
		select {
		case <-up:
		case <-w.stop:
			return nil, 0
		case <-ctx.Done():
			return nil, 0
		}
		c, err := w.o.Dial(ctx, i, export)
		if err == nil {
			return c, gen
		}
		if _, now := w.links[i].state(); now == gen {
			w.Problem("node %d serves but refuses %s: %v", i, export, err)
			return nil, 0
		}
	}
}

// failedOnDeadNode tells whether a request to node i that failed in
// incarnation gen failed because the test killed the node: otherwise it
// is a problem.
func (w *Workload) failedOnDeadNode(i, gen int, what string, err error) bool {
	if _, now := w.links[i].state(); now != gen {
		return true
	}
	w.Problem("node %d %s failed while it serves: %v", i, what, err)
	return false
}

// Writer writes t on node i until the workload stops, flushing every
// FlushEvery acknowledged writes and once at the end. It reconnects to a
// node that serves again after Down.
func (w *Workload) Writer(ctx context.Context, i int, t Target) {
	rng := rand.New(rand.NewPCG(w.o.Seed, uint64(i)<<8|uint64(t)))
	export := volumes.OriginExport
	if t == ToSnapshot {
		export = SnapshotExport
	}
	var seq uint32
	var mine []int64 // origin blocks this writer wrote
	next := func() int64 {
		if t == ToSnapshot {
			per := w.scale * SnapPerNode
			return int64(w.scale*SnapBase + (i-1)*per + rng.IntN(per))
		}
		if len(mine) > 0 && rng.IntN(4) == 0 {
			return mine[rng.IntN(len(mine))]
		}
		// Three turns in a row, taken by whichever writers come, go to
		// one chunk not written before, each to a block of it the writer
		// owns: nodes race to copy the chunk, and every few writes need
		// a new exception (and the cluster's locks).
		chunk := w.order[int(w.turn.Add(1)-1)/Nodes%len(w.order)]
		var own []int64
		for b := int64(chunk * BlocksPerChunk); b < int64((chunk+1)*BlocksPerChunk); b++ {
			if int(b%Nodes)+1 == i {
				own = append(own, b)
			}
		}
		b := own[rng.IntN(len(own))]
		mine = append(mine, b)
		return b
	}
	for {
		c, gen := w.connect(ctx, i, export)
		if c == nil {
			return
		}
		var pending []*WriteRec
		for {
			if !w.proceed(ctx) {
				rctx, cancel := context.WithTimeout(ctx, w.o.RequestTimeout)
				err := c.Flush(rctx)
				cancel()
				if err == nil {
					w.h.Flushed(pending)
				} else {
					w.failedOnDeadNode(i, gen, "final flush", err)
				}
				c.Close()
				return
			}
			block := next()
			seq++
			r := w.h.Send(t, block, Value{Kind: t, Node: uint8(i), Seq: seq})
			rctx, cancel := context.WithTimeout(ctx, w.o.RequestTimeout)
			err := c.Write(rctx, uint64(block)*BlockSize, EncodeBlock(r.V, block))
			if err == nil && len(pending)+1 == FlushEvery {
				w.h.Ack(r)
				pending = append(pending, r)
				if err = c.Flush(rctx); err == nil {
					w.h.Flushed(pending)
					pending = nil
					w.note(func() { w.c.Flushes++ })
				}
			} else if err == nil {
				w.h.Ack(r)
				pending = append(pending, r)
			}
			cancel()
			if err != nil {
				w.note(func() { w.c.Failed[i]++ })
				w.failedOnDeadNode(i, gen, fmt.Sprintf("%v write", t), err)
				break
			}
			w.note(func() {
				if t == ToOrigin {
					w.c.Acked[i]++
				}
				if _, now := w.links[i].state(); now == gen {
					w.c.AckedGen[i]++
					if t == ToOrigin {
						w.c.OriginGen[i]++
					}
				}
			})
		}
		c.Close()
		if w.failing() {
			return
		}
	}
}

// Reader reads the snapshot on node i until the workload stops, checking
// every block: the original content, or a snapshot write sent to it.
func (w *Workload) Reader(ctx context.Context, i int) {
	rng := rand.New(rand.NewPCG(w.o.Seed, uint64(i)<<8|0xff))
	for {
		c, gen := w.connect(ctx, i, SnapshotExport)
		if c == nil {
			return
		}
		for {
			if !w.proceed(ctx) {
				c.Close()
				return
			}
			first := rng.Int64N(w.OriginBlocks() - ReadBlocks + 1)
			rctx, cancel := context.WithTimeout(ctx, w.o.RequestTimeout)
			data, err := c.Read(rctx, uint64(first)*BlockSize, ReadBlocks*BlockSize)
			cancel()
			if err != nil {
				w.failedOnDeadNode(i, gen, "snapshot read", err)
				break
			}
			bad := 0
			for k := range int64(ReadBlocks) {
				b := first + k
				v, ok := DecodeBlock(data[k*BlockSize:(k+1)*BlockSize], b)
				if !ok || !w.h.Readable(ToSnapshot, b, v) {
					bad++
					if bad == 1 {
						w.Problem("node %d: snapshot block %d reads %v (decoded: %v): neither the original nor a snapshot write to it", i, b, v, ok)
					}
				}
			}
			w.note(func() { w.c.Reads++; w.c.Checks += ReadBlocks })
			if bad > 0 {
				break
			}
		}
		c.Close()
		if w.failing() {
			return
		}
	}
}
