package etcdcluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/volumes"
)

const (
	// cutScale multiplies clusterload's layout: node A, alone with EX
	// while it is cut off, writes a fresh chunk per request for as long
	// as its lease lasts.
	cutScale = 4
	// cutWriters is how many NBD connections of node A write at once,
	// and cutReaders how many read its snapshot, cutReadBytes at a time.
	cutWriters   = 4
	cutReaders   = 1
	cutReadBytes = 256 << 10
	// cutPhaseWrites is how many writes each node must have acknowledged
	// before the cut, and after A's restart.
	cutPhaseWrites = 16
	// lostMessage is what snapd serve says when its node lost its
	// cluster lockspace (cmd/snapd/serve.go).
	lostMessage = "this node lost its cluster lockspace"
	// errnoEIO is the NBD error a request gets once its node stopped its
	// I/O to the shared devices.
	errnoEIO = uint32(syscall.EIO)
)

// TestEtcdClusterCutFencesBeforeOtherGrant: node A serves with --lock
// etcd through an etcdtest.Proxy, node B straight to etcd. A's writers and
// B's writer write fresh origin chunks (each needs the COW store's lock in
// EX), every write followed by a flush; a reader of A's reads its
// snapshot. With A holding EX (B's writer held between two requests, then
// A acknowledged a fresh write sent after B's last), the proxy is cut and
// B's writer goes on: its next write needs the EX that A holds, so B's
// first fresh write acknowledged after the cut was granted that lock,
// which etcd gives only once A's lease (2 s) has lapsed. Checked against
// the clients' clocks (cutRecord.violations): every request of A's
// acknowledged, and A's first error, come before that; every client of
// A's ends with EIO or the end of its connection. A's snapd exits 1 saying
// it lost its cluster lockspace. The proxy heals, A starts again through
// it and serves, and both nodes race for fresh chunks again. Afterwards
// both stop on SIGTERM (exit 0, snapshot valid), snapd check is clean,
// and the origin and the snapshot view hold every flushed write and
// nothing nobody wrote.
func TestEtcdClusterCutFencesBeforeOtherGrant(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	start := time.Now()

	dir := t.TempDir()
	origin, cow := filepath.Join(dir, "origin.img"), filepath.Join(dir, "cow.img")
	originBlocks := int64(cutScale * clusterload.OriginBlocks)
	require.NoError(t, os.WriteFile(origin, clusterload.PristineImage(originBlocks), 0o600))
	require.NoError(t, blockdev.Create(cow, cutScale*clusterload.COWSize))
	clusterload.FormatCOW(t, cow, clusterload.ChunkBytes)
	requireDirect(t, cow)
	etcd := etcdtest.Start(t, 1)
	proxy := etcdtest.NewProxy(t, etcd.Endpoint(0))

	logFile := nodesLog(t, dir)
	a := cutNode(dir, 1, origin, cow, proxy.Endpoint(), logFile)
	b := cutNode(dir, 2, origin, cow, etcd.Endpoint(0), logFile)
	ns := []*node{a, b}
	defer func() {
		for _, n := range ns {
			if n.cmd != nil {
				select {
				case <-n.exited:
				default:
					n.kill()
				}
			}
		}
	}()
	for _, n := range ns {
		require.NoError(t, n.start())
	}
	for _, n := range ns {
		require.NoError(t, n.waitServing(ctx))
	}
	t.Logf("A (through the proxy) and B serving after %v", time.Since(start).Round(10*time.Millisecond))

	// The writers: A's on chunks 0, 1, … cutWriters-1 modulo
	// cutWriters+1, B's on the rest, each block written by one writer.
	h := clusterload.NewHistory()
	chunks := int(originBlocks / clusterload.BlocksPerChunk)
	var aSeq, bSeq atomic.Uint32
	var aWriters []*chunkWriter
	for j := range cutWriters {
		aWriters = append(aWriters, newChunkWriter(h, 1, &aSeq, j, cutWriters+1, chunks))
	}
	bw := newChunkWriter(h, 2, &bSeq, cutWriters, cutWriters+1, chunks)
	// A's readers check the snapshot against the original origin: nobody
	// writes the snapshot.
	pristine, err := os.ReadFile(origin)
	require.NoError(t, err)
	for j := range cutReaders {
		aWriters = append(aWriters, newSnapshotReader(1, pristine, uint64(j)))
	}
	fail := func(format string, args ...any) {
		t.Helper()
		for _, n := range ns {
			t.Logf("node %d output tail:\n%s", n.id, n.tail(40))
		}
		t.Fatalf(format, args...)
	}
	var wg sync.WaitGroup
	stopWriters := make(chan struct{})
	defer func() {
		select {
		case <-stopWriters:
		default:
			close(stopWriters)
		}
		wg.Wait()
	}()
	runAll := func(ws []*chunkWriter, n *node) {
		for _, w := range ws {
			wg.Go(func() {
				if w.pristine != nil {
					w.runReads(ctx, n.sock, stopWriters)
				} else {
					w.run(ctx, n.sock, stopWriters)
				}
			})
		}
	}
	runAll(aWriters, a)
	runAll([]*chunkWriter{bw}, b)
	waitWrites := func(w *chunkWriter, min int, what string) {
		t.Helper()
		if err := w.waitAcked(ctx, min); err != nil {
			fail("%s: %v", what, err)
		}
	}
	for _, w := range aWriters {
		waitWrites(w, cutPhaseWrites, "A before the cut")
	}
	waitWrites(bw, cutPhaseWrites, "B before the cut")

	// A takes EX: B's writer holds between two requests, then A has a
	// fresh write acknowledged that it sent after B's last.
	parked := bw.gate.hold()
	select {
	case <-parked:
	case <-ctx.Done():
		fail("B's writer does not hold: %v", ctx.Err())
	}
	bHeld := time.Now()
	if err := aWriters[0].waitAckedSentAfter(ctx, bHeld); err != nil {
		fail("A after B held: %v", err)
	}

	cutAt := time.Now()
	proxy.Cut()
	bw.gate.release()
	select {
	case <-a.exited:
	case <-ctx.Done():
		fail("A still runs %v after the cut: %v", time.Since(cutAt), ctx.Err())
	}
	aExited := time.Now()
	waitWrites(bw, bw.acked()+cutPhaseWrites/2, "B after the cut")
	// B holds until A serves again, so that both race for fresh chunks
	// after A's restart.
	parked = bw.gate.hold()
	select {
	case <-parked:
	case <-ctx.Done():
		fail("B's writer does not hold: %v", ctx.Err())
	}
	for _, w := range aWriters {
		if err := w.waitDone(ctx); err != nil {
			fail("A's writer: %v", err)
		}
	}

	rec := cutRecord{cut: cutAt}
	for _, w := range aWriters {
		w.mu.Lock()
		for _, k := range w.acks {
			rec.aAcks = append(rec.aAcks, k.acked)
		}
		if w.err != nil && (rec.aFirstErr.IsZero() || w.errAt.Before(rec.aFirstErr)) {
			rec.aFirstErr = w.errAt
		}
		w.mu.Unlock()
	}
	bw.mu.Lock()
	for _, k := range bw.acks {
		if k.fresh && k.sent.After(cutAt) {
			rec.bAcks = append(rec.bAcks, k.acked)
		}
	}
	bErr := bw.err
	bw.mu.Unlock()
	rec.log(t, aExited)
	for _, v := range rec.violations() {
		t.Error(v)
	}
	require.NoError(t, bErr, "B's writer")

	// Every client of A's ended with an error: EIO for a request snapd
	// had when A stopped its I/O, or the end of the connection for one
	// sent as snapd shut down. Which of the two a client gets depends on
	// where its request was at that moment, so the test counts the EIOs
	// and does not require one.
	ends := map[string]int{}
	for j, w := range aWriters {
		end, ok := clientEnd(w.err)
		ends[end]++
		assert.True(t, ok, "A's client %d ended with %v", j, w.err)
		t.Logf("A's client %d: %d requests acknowledged, %d of them fresh writes; ended with %s: %v", j, len(w.acks), min(w.next, w.pool), end, w.err)
	}
	t.Logf("A's %d clients ended with: %v", len(aWriters), ends)

	// A's snapd exits 1 and says why.
	var exit *exec.ExitError
	if assert.ErrorAs(t, a.waitErr, &exit, "A's exit") {
		assert.Equal(t, 1, exit.ExitCode(), "A's exit code")
	}
	assert.Contains(t, a.output(), lostMessage, "A's output")

	// A starts again through the healed proxy and serves; both write on.
	proxy.Heal()
	restarted := time.Now()
	require.NoError(t, a.start())
	if err := a.waitServing(ctx); err != nil {
		fail("A again: %v", err)
	}
	t.Logf("A serves again %v after its restart", time.Since(restarted).Round(10*time.Millisecond))
	for _, w := range aWriters {
		w.again()
	}
	runAll(aWriters, a)
	bw.gate.release()
	for _, w := range aWriters {
		waitWrites(w, w.acked()+cutPhaseWrites, "A after its restart")
	}
	waitWrites(bw, bw.acked()+cutPhaseWrites, "B after A's restart")
	close(stopWriters)
	wg.Wait()
	for _, w := range append(slices.Clone(aWriters), bw) {
		assert.NoError(t, w.err, "node %d's writer", w.node)
	}

	// Both stop cleanly, their snapshot valid; the files are checked.
	for _, n := range ns {
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := n.stop(sctx)
		cancel()
		out := n.output()
		assert.NoError(t, err, "node %d's exit:\n%s", n.id, n.tail(20))
		assert.Contains(t, out, "stopped", "node %d", n.id)
		assert.Regexp(t, `snapshot `+clusterload.SnapshotExport+`: .*, valid`, out, "node %d's snapshot at exit", n.id)
	}
	check, err := exec.CommandContext(ctx, snapdBinary, "check", cow).CombinedOutput()
	assert.NoError(t, err, "snapd check %s:\n%s", cow, check)
	finalOrigin, view, _ := clusterload.FinalImages(ctx, t, origin, cow)
	clusterload.CheckImages(t, h, finalOrigin, view)
	t.Logf("%d writes sent, %d acknowledged; %v in all", h.Sent(), h.Acked(), time.Since(start).Round(100*time.Millisecond))
}

// clientEnd names how a client of a node that lost its lockspace ended:
// "EIO" (its request failed at the node's I/O fence), "ESHUTDOWN" (read
// as the server shut down) or "closed" (the server closed the
// connection); ok is false for anything else, nil included.
func clientEnd(err error) (end string, ok bool) {
	var re *clusterload.ReplyError
	switch {
	case errors.As(err, &re) && re.Errno == errnoEIO:
		return "EIO", true
	case errors.As(err, &re) && re.Errno == uint32(syscall.ESHUTDOWN):
		return "ESHUTDOWN", true
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "closed", true
	}
	return "unexpected", false
}

// cutNode is node id of the cut test, reaching etcd at endpoint.
func cutNode(dir string, id int, origin, cow, endpoint string, log *os.File) *node {
	sock, ctl := filepath.Join(dir, fmt.Sprintf("node-%d.nbd", id)), filepath.Join(dir, fmt.Sprintf("node-%d.ctl", id))
	return &node{id: id, snapd: snapdBinary, sock: sock, ctl: ctl, log: log, args: []string{"serve",
		"--origin", origin, "--snapshot", clusterload.SnapshotExport + "=" + cow,
		"--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", endpoint, "--etcd-lease-ttl", leaseTTL.String(),
		"--listen", "", "--socket", sock, "--control", ctl, "--stats-interval", "0"}}
}

// cutRecord is what the clients saw around the cut of node A's
// connection to etcd.
type cutRecord struct {
	cut       time.Time
	aAcks     []time.Time // when A's requests were acknowledged, every one
	aFirstErr time.Time   // when A's first request failed; zero if none did
	// bAcks are when B's fresh writes sent after the cut were
	// acknowledged. Each needed the EX that A held at the cut.
	bAcks []time.Time
}

// violations is everything in r that shows A going on, or failing to
// stop, once B could have been granted A's lock, or an unproven run.
func (r cutRecord) violations() []string {
	var v []string
	if len(r.bAcks) == 0 {
		v = append(v, "B had no write acknowledged after the cut")
	}
	if r.aFirstErr.IsZero() {
		v = append(v, "A's clients got no error")
	} else if r.aFirstErr.Before(r.cut) {
		v = append(v, fmt.Sprintf("A's first error came %v before the cut", r.cut.Sub(r.aFirstErr)))
	}
	if len(r.bAcks) == 0 {
		return v
	}
	bFirst := slices.MinFunc(r.bAcks, time.Time.Compare)
	if !r.aFirstErr.IsZero() && !r.aFirstErr.Before(bFirst) {
		v = append(v, fmt.Sprintf("A's first error at %s, not before B's first write after the cut was acknowledged (%s)", r.since(r.aFirstErr), r.since(bFirst)))
	}
	late := 0
	for _, at := range r.aAcks {
		if !at.Before(bFirst) {
			late++
		}
	}
	if late > 0 {
		v = append(v, fmt.Sprintf("A had %d requests acknowledged after B's first write after the cut (%s), the last at %s", late, r.since(bFirst), r.since(slices.MaxFunc(r.aAcks, time.Time.Compare))))
	}
	return v
}

// since formats at as a delay after the cut.
func (r cutRecord) since(at time.Time) string {
	if at.IsZero() {
		return "never"
	}
	return "+" + at.Sub(r.cut).Round(time.Millisecond).String()
}

// log reports when things happened after the cut.
func (r cutRecord) log(t *testing.T, aExited time.Time) {
	t.Helper()
	lastA, firstB := "never", "never"
	after := 0
	if len(r.aAcks) > 0 {
		lastA = r.since(slices.MaxFunc(r.aAcks, time.Time.Compare))
	}
	for _, at := range r.aAcks {
		if at.After(r.cut) {
			after++
		}
	}
	if len(r.bAcks) > 0 {
		firstB = r.since(slices.MinFunc(r.bAcks, time.Time.Compare))
	}
	t.Logf("after the cut: A acknowledged %d requests, the last %s; A's first error %s; A's snapd exited %s; B's first write acknowledged %s",
		after, lastA, r.since(r.aFirstErr), r.since(aExited), firstB)
}

// ackRec is one acknowledged request of a chunkWriter.
type ackRec struct {
	sent, acked time.Time
	write       bool // a write
	fresh       bool // a write to a chunk not written before
	read        bool // a read; neither: the flush after a write
}

// chunkWriter is one NBD connection's writer of the origin: its k-th
// write goes to a chunk of its own (chunks c with c%of == slot), a new one
// while it has some left (each needs a new exception, hence the COW
// store's lock in EX), then to its chunks again, another block of each;
// every write is followed by a flush. It records when each request was
// acknowledged and how its run ended.
type chunkWriter struct {
	h *clusterload.History
	// pristine, when set, makes it a reader of the snapshot, which must
	// read as this image; rng picks what it reads.
	pristine []byte
	rng      *rand.Rand
	node     uint8          // clusterload.Value.Node of its writes
	seq      *atomic.Uint32 // the node's write sequence, shared by its writers
	mine     []int          // its chunks
	pool     int            // len(mine)
	gate     gate

	mu      sync.Mutex
	changed chan struct{} // closed and replaced when acks or err change
	next    int           // how many writes it has sent
	acks    []ackRec
	err     error // how its run ended; nil while it runs or if it was stopped
	errAt   time.Time
	done    chan struct{} // closed when its run returns
}

func newChunkWriter(h *clusterload.History, node uint8, seq *atomic.Uint32, slot, of, chunks int) *chunkWriter {
	w := &chunkWriter{h: h, node: node, seq: seq, changed: make(chan struct{}), done: make(chan struct{})}
	for c := slot; c < chunks; c += of {
		w.mine = append(w.mine, c)
	}
	w.pool = len(w.mine)
	w.gate.open = make(chan struct{})
	close(w.gate.open)
	return w
}

// newSnapshotReader is a chunkWriter that reads the snapshot export of
// node, which must read as pristine.
func newSnapshotReader(node uint8, pristine []byte, seed uint64) *chunkWriter {
	w := &chunkWriter{node: node, pristine: pristine, rng: rand.New(rand.NewPCG(seed, 19)), changed: make(chan struct{}), done: make(chan struct{})}
	w.gate.open = make(chan struct{})
	close(w.gate.open)
	return w
}

// runReads connects to the snapshot export at sock and reads it,
// cutReadBytes at a time, until stop is closed (nil error) or a request
// fails or reads anything but pristine (the error, recorded).
func (w *chunkWriter) runReads(ctx context.Context, sock string, stop <-chan struct{}) {
	defer close(w.done)
	fail := func(err error) { w.note(func() { w.err, w.errAt = err, time.Now() }) }
	c, err := clusterload.Dial(ctx, "unix", sock, clusterload.SnapshotExport)
	if err != nil {
		fail(err)
		return
	}
	defer c.Close()
	blocks := int64(len(w.pristine)-cutReadBytes)/clusterload.BlockSize + 1
	for k := 0; ; k++ {
		if !w.gate.pass(stop) {
			return
		}
		off := w.rng.Int64N(blocks) * clusterload.BlockSize
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		sent := time.Now()
		data, err := c.Read(rctx, uint64(off), cutReadBytes)
		cancel()
		if err != nil {
			fail(fmt.Errorf("read %d (at %d): %w", k, off, err))
			return
		}
		acked := time.Now()
		if !bytes.Equal(data, w.pristine[off:off+cutReadBytes]) {
			fail(fmt.Errorf("read %d (at %d): the snapshot does not read as the original origin", k, off))
			return
		}
		w.note(func() { w.acks = append(w.acks, ackRec{sent: sent, acked: acked, read: true}) })
	}
}

// block is the block of the writer's k-th write.
func (w *chunkWriter) block(k int) int64 {
	c := w.mine[k%w.pool]
	return int64(c*clusterload.BlocksPerChunk + k/w.pool%clusterload.BlocksPerChunk)
}

// note changes the writer's record under its lock and wakes its waiters.
func (w *chunkWriter) note(f func()) {
	w.mu.Lock()
	defer w.mu.Unlock()
	f()
	close(w.changed)
	w.changed = make(chan struct{})
}

// run connects to export origin at sock and writes until stop is closed
// (nil error) or a request fails (the error, recorded).
func (w *chunkWriter) run(ctx context.Context, sock string, stop <-chan struct{}) {
	defer close(w.done)
	fail := func(err error) { w.note(func() { w.err, w.errAt = err, time.Now() }) }
	c, err := clusterload.Dial(ctx, "unix", sock, volumes.OriginExport)
	if err != nil {
		fail(err)
		return
	}
	defer c.Close()
	for {
		if !w.gate.pass(stop) {
			return
		}
		k := w.next
		block := w.block(k)
		r := w.h.Send(clusterload.ToOrigin, block, clusterload.Value{Kind: clusterload.ToOrigin, Node: w.node, Seq: w.seq.Add(1)})
		w.note(func() { w.next++ })
		rctx, cancel := context.WithTimeout(ctx, requestTimeout)
		sent := time.Now()
		err := c.Write(rctx, uint64(block)*clusterload.BlockSize, clusterload.EncodeBlock(r.V, block))
		if err != nil {
			cancel()
			fail(fmt.Errorf("write %d (block %d): %w", k, block, err))
			return
		}
		w.h.Ack(r)
		w.note(func() { w.acks = append(w.acks, ackRec{sent: sent, acked: time.Now(), write: true, fresh: k < w.pool}) })
		sent = time.Now()
		err = c.Flush(rctx)
		cancel()
		if err != nil {
			fail(fmt.Errorf("flush after write %d: %w", k, err))
			return
		}
		w.h.Flushed([]*clusterload.WriteRec{r})
		w.note(func() { w.acks = append(w.acks, ackRec{sent: sent, acked: time.Now()}) })
	}
}

// again readies the writer for another run after its last one ended.
func (w *chunkWriter) again() {
	w.note(func() { w.err, w.errAt, w.done = nil, time.Time{}, make(chan struct{}) })
}

// acked is how many of its writes (or reads, for a reader) were
// acknowledged.
func (w *chunkWriter) acked() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.ops()
}

// ops is acked, under w.mu.
func (w *chunkWriter) ops() int {
	n := 0
	for _, a := range w.acks {
		if a.write || a.read {
			n++
		}
	}
	return n
}

// waitFor waits until cond holds of the writer's record; it fails if the
// run ends first, or when ctx ends.
func (w *chunkWriter) waitFor(ctx context.Context, what string, cond func() bool) error {
	for {
		w.mu.Lock()
		ok, ch, err := cond(), w.changed, w.err
		w.mu.Unlock()
		if ok {
			return nil
		}
		if err != nil {
			return fmt.Errorf("node %d's writer, waiting for %s: %w", w.node, what, err)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("node %d's writer, waiting for %s: %w", w.node, what, ctx.Err())
		}
	}
}

// waitAcked waits until min of its writes (or reads) were acknowledged.
func (w *chunkWriter) waitAcked(ctx context.Context, min int) error {
	return w.waitFor(ctx, fmt.Sprintf("%d acknowledged requests", min), func() bool { return w.ops() >= min })
}

// waitAckedSentAfter waits until a fresh-chunk write it sent after t was
// acknowledged.
func (w *chunkWriter) waitAckedSentAfter(ctx context.Context, t time.Time) error {
	return w.waitFor(ctx, "a fresh write sent after "+t.Format(time.StampMicro), func() bool {
		for _, a := range w.acks {
			if a.fresh && a.sent.After(t) {
				return true
			}
		}
		return false
	})
}

// waitDone waits until its run returned.
func (w *chunkWriter) waitDone(ctx context.Context) error {
	w.mu.Lock()
	done := w.done
	w.mu.Unlock()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("node %d's writer still runs: %w", w.node, ctx.Err())
	}
}

// gate holds a writer between two requests while the test wants it to.
type gate struct {
	mu     sync.Mutex
	open   chan struct{} // closed while the writer may send
	parked chan struct{} // closed once the held writer waits; nil once closed
}

// hold stops the writer before its next request; the channel returned is
// closed once it waits there (its last request acknowledged).
func (g *gate) hold() <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.open, g.parked = make(chan struct{}), make(chan struct{})
	return g.parked
}

// release lets the writer go on.
func (g *gate) release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	close(g.open)
}

// pass waits while the writer is held; false means stop was closed.
func (g *gate) pass(stop <-chan struct{}) bool {
	g.mu.Lock()
	open := g.open
	select {
	case <-open:
	default:
		if g.parked != nil {
			close(g.parked)
			g.parked = nil
		}
	}
	g.mu.Unlock()
	select {
	case <-open:
	case <-stop:
		return false
	}
	select {
	case <-stop:
		return false
	default:
		return true
	}
}

// The timing check fails a run in which A went on after B could have
// been granted its lock, or that proves nothing.
func TestCutRecordViolations(t *testing.T) {
	cut := time.Unix(1000, 0)
	at := func(ms int) time.Time { return cut.Add(time.Duration(ms) * time.Millisecond) }
	good := cutRecord{cut: cut, aAcks: []time.Time{at(-20), at(-10), at(5), at(1500)}, aFirstErr: at(1600), bAcks: []time.Time{at(2300), at(2100), at(2400)}}
	for _, c := range []struct {
		name   string
		change func(*cutRecord)
		want   int
	}{
		{"fenced in time", func(*cutRecord) {}, 0},
		{"A acknowledged after B's first", func(r *cutRecord) { r.aAcks = append(r.aAcks, at(2200)) }, 1},
		{"A acknowledged as B's first", func(r *cutRecord) { r.aAcks = append(r.aAcks, at(2100)) }, 1},
		{"A failed after B's first", func(r *cutRecord) { r.aFirstErr = at(2150) }, 1},
		{"A failed and acknowledged late", func(r *cutRecord) { r.aFirstErr, r.aAcks = at(2500), append(r.aAcks, at(2400)) }, 2},
		{"A never failed", func(r *cutRecord) { r.aFirstErr = time.Time{} }, 1},
		{"A failed before the cut", func(r *cutRecord) { r.aFirstErr = at(-1) }, 1},
		{"B never acknowledged", func(r *cutRecord) { r.bAcks = nil }, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := good
			r.aAcks = slices.Clone(good.aAcks)
			r.bAcks = slices.Clone(good.bAcks)
			c.change(&r)
			v := r.violations()
			assert.Len(t, v, c.want, "%q", v)
		})
	}
}
