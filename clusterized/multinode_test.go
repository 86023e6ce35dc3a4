package clusterized_test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// errNodeDown is the error of every I/O of a node after its power went.
var errNodeDown = errors.New("node is down")

// nodeDevice is one node's path to a shared device. Fencing it stands for
// the node's power going: it waits for the node's I/O in flight and fails
// every later one, as a dead node does no more I/O (the DLM recovers locks
// only after fencing, so a crash test fences first, then Crash).
type nodeDevice struct {
	blockdev.Device
	mu   sync.RWMutex
	dead bool
}

func (d *nodeDevice) begin() error {
	d.mu.RLock()
	if d.dead {
		d.mu.RUnlock()
		return fmt.Errorf("%s: %w", d.Device.Name(), errNodeDown)
	}
	return nil
}

func (d *nodeDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.begin(); err != nil {
		return 0, err
	}
	defer d.mu.RUnlock()
	// Let other goroutines run between a lookup and the read it decided
	// on: that widens the windows the test is after.
	runtime.Gosched()
	return d.Device.ReadAt(p, off)
}

func (d *nodeDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.begin(); err != nil {
		return 0, err
	}
	defer d.mu.RUnlock()
	return d.Device.WriteAt(p, off)
}

func (d *nodeDevice) WriteAtSync(p []byte, off int64) (int, error) {
	if err := d.begin(); err != nil {
		return 0, err
	}
	defer d.mu.RUnlock()
	return d.Device.WriteAtSync(p, off)
}

func (d *nodeDevice) Sync() error {
	if err := d.begin(); err != nil {
		return err
	}
	defer d.mu.RUnlock()
	return d.Device.Sync()
}

func (d *nodeDevice) Close() error { return nil }

func (d *nodeDevice) fence() {
	d.mu.Lock()
	d.dead = true
	d.mu.Unlock()
}

// recorder notes every exception the nodes' stores handed out and
// committed.
type recorder struct {
	mu        sync.Mutex
	prepared  []recorded
	committed []recorded
	// durable is, by node, how many of committed were recorded before a
	// Sync of that node that succeeded began: that node's lazy commits
	// among them are on disk.
	durable map[int]int
}

type recorded struct {
	node int
	e    exstore.Exception
	lazy bool
}

// recordingStore passes everything to the node's store (a LazyStore) and
// records Prepare's, Commit's, CommitLazy's and Sync's successes; synced
// is the test clock before the node's latest successful Sync began. It is
// a LazyCommitter only; the COW engine gets it through forRecording, which
// adds exactly the other capabilities the node's store has, so that the
// engine takes the paths it takes in production (optimistic lookups
// above all).
type recordingStore struct {
	exstore.Store
	lazy   exstore.LazyCommitter
	node   int
	rec    *recorder
	clock  *atomic.Uint64
	synced atomic.Uint64
	// optimistic counts the optimistic lookups the engine made through
	// the wrapper, unchanged the Unchanged calls.
	optimistic, unchanged atomic.Int64
}

// The wrappers of a recordingStore by the capabilities the COW engine looks
// for (exstore/cow: LazyCommitter, RangeLookuper, OptimisticLookuper,
// AbsenceChecker), each claiming only what it forwards.
type (
	recordingRanges struct {
		*recordingStore
		ranges exstore.RangeLookuper
	}
	recordingOptimistic struct {
		recordingRanges
		opt exstore.OptimisticLookuper
	}
	recordingAbsence struct {
		recordingOptimistic
		absence exstore.AbsenceChecker
	}
)

var (
	_ exstore.LazyCommitter      = (*recordingStore)(nil)
	_ exstore.RangeLookuper      = recordingRanges{}
	_ exstore.LazyCommitter      = recordingRanges{}
	_ exstore.OptimisticLookuper = recordingOptimistic{}
	_ exstore.RangeLookuper      = recordingOptimistic{}
	_ exstore.LazyCommitter      = recordingOptimistic{}
	_ exstore.AbsenceChecker     = recordingAbsence{}
	_ exstore.OptimisticLookuper = recordingAbsence{}
	_ exstore.RangeLookuper      = recordingAbsence{}
	_ exstore.LazyCommitter      = recordingAbsence{}
)

func newRecordingStore(s exstore.Store, node int, rec *recorder, clock *atomic.Uint64) *recordingStore {
	r := &recordingStore{Store: s, node: node, rec: rec, clock: clock}
	r.lazy, _ = s.(exstore.LazyCommitter)
	return r
}

// forRecording returns r as the COW engine is to see it: with every
// capability of the store r wraps that the engine looks for, and no other.
// The stores of these tests are LazyCommitters; one that is an
// OptimisticLookuper or AbsenceChecker is also a RangeLookuper, and an
// AbsenceChecker also an OptimisticLookuper: other combinations have no
// wrapper, and fail the test.
func forRecording(t testing.TB, r *recordingStore) exstore.Store {
	t.Helper()
	require.NotNil(t, r.lazy, "the store commits lazily")
	ranges, isRanges := r.Store.(exstore.RangeLookuper)
	opt, isOpt := r.Store.(exstore.OptimisticLookuper)
	absence, isAbsence := r.Store.(exstore.AbsenceChecker)
	switch {
	case isAbsence && isOpt && isRanges:
		return recordingAbsence{recordingOptimistic{recordingRanges{r, ranges}, opt}, absence}
	case isAbsence:
		require.FailNow(t, "no recording wrapper for an AbsenceChecker that is no OptimisticLookuper and RangeLookuper")
	case isOpt && isRanges:
		return recordingOptimistic{recordingRanges{r, ranges}, opt}
	case isOpt:
		require.FailNow(t, "no recording wrapper for an OptimisticLookuper that is no RangeLookuper")
	case isRanges:
		return recordingRanges{r, ranges}
	}
	return r
}

func (r recordingRanges) LookupRange(ctx context.Context, first exstore.Chunk, into []exstore.LookupResult) (exstore.Release, error) {
	return r.ranges.LookupRange(ctx, first, into)
}

func (r recordingOptimistic) LookupOptimistic(old exstore.Chunk) (exstore.Chunk, bool, uint64, bool) {
	r.optimistic.Add(1)
	return r.opt.LookupOptimistic(old)
}

func (r recordingOptimistic) LookupRangeOptimistic(first exstore.Chunk, into []exstore.LookupResult) (uint64, bool) {
	r.optimistic.Add(1)
	return r.opt.LookupRangeOptimistic(first, into)
}

func (r recordingOptimistic) Unchanged(token uint64) bool {
	r.unchanged.Add(1)
	return r.opt.Unchanged(token)
}

func (r recordingAbsence) NoExceptions(first exstore.Chunk, n uint64) bool {
	return r.absence.NoExceptions(first, n)
}

func (r *recordingStore) CommitLazy(ctx context.Context, e exstore.Exception) error {
	err := r.lazy.CommitLazy(ctx, e)
	r.recordCommit(e, true, err)
	return err
}

// recordCommit records the commit of e if it succeeded (err nil).
func (r *recordingStore) recordCommit(e exstore.Exception, lazy bool, err error) {
	if err == nil {
		r.rec.mu.Lock()
		r.rec.committed = append(r.rec.committed, recorded{r.node, e, lazy})
		r.rec.mu.Unlock()
	}
}

func (r *recordingStore) Durable(new exstore.Chunk) bool { return r.lazy.Durable(new) }

func (r *recordingStore) Sync(ctx context.Context) error {
	start := r.clock.Add(1)
	r.rec.mu.Lock()
	n := len(r.rec.committed)
	r.rec.mu.Unlock()
	err := r.lazy.Sync(ctx)
	if err == nil {
		r.rec.mu.Lock()
		r.rec.durable[r.node] = max(r.rec.durable[r.node], n)
		r.rec.mu.Unlock()
		for {
			s := r.synced.Load()
			if s >= start || r.synced.CompareAndSwap(s, start) {
				break
			}
		}
	}
	return err
}

func (r *recordingStore) Prepare(ctx context.Context, old exstore.Chunk) (exstore.Exception, error) {
	e, err := r.Store.Prepare(ctx, old)
	if err == nil {
		r.rec.mu.Lock()
		r.rec.prepared = append(r.rec.prepared, recorded{r.node, e, false})
		r.rec.mu.Unlock()
	}
	return e, err
}

func (r *recordingStore) Commit(ctx context.Context, e exstore.Exception) error {
	err := r.Store.Commit(ctx, e)
	r.recordCommit(e, false, err)
	return err
}

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

// node is one simulated node: its own store instance on the shared COW and
// its own COW engine over the shared origin.
type node struct {
	id      uint32
	origin  *nodeDevice
	cowDev  *nodeDevice
	store   *clusterized.Store
	rec     *recordingStore
	volume  *cow.Origin
	snap    *cow.Snapshot
	crashed atomic.Bool
}

const (
	mnChunkSectors = 8
	mnChunkBytes   = mnChunkSectors * exstore.SectorSize
	mnChunks       = 256 // origin chunks
	mnHot          = 250 // chunks the workers use; the others are for the crash
	mnClusterID    = "multi"
)

// TestMultiNode runs three nodes, each with its own store and COW engine
// over the same origin and COW devices, doing random concurrent origin
// writes, snapshot reads and writes and flushes, and checks them against a
// reference model. In the crash runs one node dies while it holds EX with an
// exception in commit; the survivors carry on.
//
// In most runs a node never writes the origin chunks it writes in the
// snapshot (each chunk's snapshot writes belong to one node, its origin
// writes to the others), so every race on a chunk is between nodes; "same
// node" lifts that and so also tests the COW engine's own guard of a
// snapshot read that went to the origin.
func TestMultiNode(t *testing.T) {
	for _, tc := range []struct {
		name     string
		seed     uint64
		crash    bool
		sameNode bool
	}{
		{"no crash", 1, false, false},
		{"crash", 2, true, false},
		{"crash 2", 3, true, false},
		{"same node", 4, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) { runMultiNode(t, tc.seed, tc.crash, tc.sameNode) })
	}
}

func runMultiNode(t *testing.T, seed uint64, crash, sameNode bool) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 77))
	originDev := faultdev.New("origin", mnChunks*mnChunkBytes)
	initial := make([]byte, mnChunkBytes)
	for c := range mnChunks {
		fillTag(initial, tag{chunk: uint32(c), kind: kindOriginal})
		_, err := originDev.WriteAt(initial, int64(c)*mnChunkBytes)
		require.NoError(t, err)
	}
	cowDev := faultdev.New("cow", 2*mnChunks*mnChunkBytes)
	formatCOW(t, cowDev, mnChunkSectors)

	cluster := inproc.NewCluster()
	rec := &recorder{}
	rec.durable = map[int]int{}
	hist := &history{writes: map[uint32][]*snapWrite{}, dead: map[uint32]bool{}}
	nodes := make([]*node, 3)
	for i := range nodes {
		n := &node{id: uint32(i + 1), origin: &nodeDevice{Device: originDev}, cowDev: &nodeDevice{Device: cowDev}}
		var err error
		n.store, err = openPersistent(ctx, n.cowDev, cluster.Node(n.id), mnClusterID)
		require.NoError(t, err)
		t.Cleanup(func() { _ = n.store.Close() })
		n.volume = cow.NewOrigin(n.origin)
		n.rec = newRecordingStore(n.store.Exstore(), int(n.id), rec, &hist.clock)
		engineStore := forRecording(t, n.rec)
		_, absence := engineStore.(exstore.AbsenceChecker)
		require.False(t, absence, "the clustered store is no AbsenceChecker")
		n.snap, err = n.volume.AddSnapshot("snap", engineStore, n.cowDev, cow.SnapshotOptions{})
		require.NoError(t, err)
		nodes[i] = n
	}

	const workersPerNode, opsPerWorker = 3, 200
	var versions atomic.Uint64
	var opsDone atomic.Int64
	crashAt := int64(workersPerNode * len(nodes) * opsPerWorker / 3)
	crashNow := make(chan struct{})
	var crashOnce sync.Once
	var wg sync.WaitGroup
	for _, n := range nodes {
		for w := range workersPerNode {
			wrng := rand.New(rand.NewPCG(seed, uint64(n.id)*100+uint64(w)))
			wg.Go(func() {
				buf := make([]byte, 3*mnChunkBytes)
				for range opsPerWorker {
					progress := opsDone.Add(1)
					if progress == crashAt {
						crashOnce.Do(func() { close(crashNow) })
					}
					if err := mnOp(ctx, t, n, wrng, buf, progress, sameNode, &versions, hist); err != nil {
						if n.crashed.Load() {
							return // a dead node's I/O fails; checked below
						}
						t.Errorf("node %d: %v", n.id, err)
						return
					}
					if n.store.LazyWaitingOutsideEX() {
						t.Errorf("node %d: lazy commits wait to be written while it does not hold EX", n.id)
					}
				}
			})
		}
	}

	var victim *node
	var lastE0 exstore.Exception
	if crash {
		<-crashNow
		victim = nodes[rng.IntN(len(nodes))]
		// The victim dies holding EX, in the middle of a commit (e1 is
		// still being copied), with a lazy commit (e0) visible on it that
		// may not be written yet. (One goroutine never holds a prepared
		// exception while it asks for another: see "Nested users" in
		// gate.go.)
		e0, err := victim.rec.Prepare(ctx, mnChunks-4)
		require.NoError(t, err)
		_, err = victim.cowDev.WriteAt(make([]byte, mnChunkBytes), int64(e0.New)*mnChunkBytes)
		require.NoError(t, err)
		require.NoError(t, victim.rec.CommitLazy(ctx, e0))
		got, found, release, err := victim.rec.Lookup(ctx, e0.Old)
		release()
		require.NoError(t, err)
		require.True(t, found && got == e0.New, "the victim sees its lazy commit")
		lastE0 = e0
		e1, err := victim.rec.Prepare(ctx, mnChunks-1)
		require.NoError(t, err)
		_, err = victim.cowDev.WriteAt(make([]byte, mnChunkBytes), int64(e1.New)*mnChunkBytes)
		require.NoError(t, err)
		victim.crashed.Store(true)
		victim.origin.fence()
		victim.cowDev.fence()
		hist.crash(victim.id, victim.rec.synced.Load())
		cluster.Crash(victim.id)
		require.ErrorIs(t, victim.rec.Sync(ctx), lockc.ErrLost, "a sync after the crash")
		err = victim.store.Commit(ctx, e1)
		require.ErrorIs(t, err, lockc.ErrLost, "commit after the crash")
		assert.ErrorContains(t, err, mnClusterID)
		t.Logf("node %d crashed holding EX; its commit: %v", victim.id, err)
	} else {
		crashOnce.Do(func() {})
	}
	wg.Wait()

	var survivors []*node
	for _, n := range nodes {
		if n != victim {
			survivors = append(survivors, n)
		}
	}

	if victim != nil {
		// The dead node fails with a clear error and writes nothing.
		assert.ErrorIs(t, victim.store.Err(), lockc.ErrLost)
		_, err := victim.store.Prepare(ctx, mnChunks-3)
		assert.ErrorIs(t, err, lockc.ErrLost)
		assert.ErrorContains(t, err, mnClusterID)
		_, _, release, err := victim.store.Lookup(ctx, mnChunks-3)
		release()
		assert.ErrorIs(t, err, lockc.ErrLost)
		assert.Error(t, victim.volume.WriteAt(ctx, make([]byte, mnChunkBytes), 0, false))
		// (Its device may have failed a commit first: then the snapshot says
		// it is invalid, else that the lock is lost.)
		assert.Error(t, victim.snap.ReadAt(ctx, make([]byte, mnChunkBytes), 0), "a snapshot read of the dead node")
	}

	// Every survivor sees every committed exception, and the disk agrees.
	for _, n := range survivors {
		require.NoError(t, n.store.Refresh(ctx))
		require.NoError(t, n.volume.Flush(ctx))
	}
	if victim != nil {
		// The first survivor granted the lock after the crash found the
		// LVB invalid and reloaded. (The survivors' workload may have
		// ended before either asked for the lock again: the Refreshes
		// above ask.)
		var invalid, reloads uint64
		for _, n := range survivors {
			st := n.store.Stats()
			invalid += st.InvalidLVBs
			reloads += st.Reloads
		}
		assert.Positive(t, invalid, "a survivor saw the invalid LVB")
		assert.Positive(t, reloads, "a survivor reloaded fully")
	}
	disk, err := persistent.Open(ctx, cowDev, persistent.Options{NoFormat: true, Logger: quietLogger()})
	require.NoError(t, err)
	defer disk.Close()
	want := walkMap(disk)
	require.NotEmpty(t, want)
	for _, n := range survivors {
		assert.Equal(t, want, walkMap(n.store), "node %d's exceptions", n.id)
	}
	// recommitted[i]: a survivor committed the very exception committed[i]
	// after it. A survivor's Prepare refuses an origin chunk that has an
	// exception on disk, so the earlier one was not there: the dead node's
	// lazy commit was lost, and its COW chunk was the next free one again.
	recommitted := make([]bool, len(rec.committed))
	bySurvivorLater := map[exstore.Exception]bool{}
	for i := len(rec.committed) - 1; i >= 0; i-- {
		r := rec.committed[i]
		if victim == nil || r.node != int(victim.id) {
			bySurvivorLater[r.e] = true
		} else {
			recommitted[i] = bySurvivorLater[r.e]
		}
	}
	byNew := map[exstore.Chunk]recorded{}
	lostLazy := 0
	for i, r := range rec.committed {
		if victim != nil && r.node == int(victim.id) && r.lazy && i >= rec.durable[r.node] && (want[r.e.Old] != r.e.New || recommitted[i]) {
			// Committed lazily by the dead node and not written before
			// it died: no sync covered it, so it may be lost, and its COW
			// chunk is free for the survivors, which may make the very
			// same exception again.
			lostLazy++
			continue
		}
		assert.Equal(t, r.e.New, want[r.e.Old], "committed exception %v of node %d on disk (lazily: %v)", r.e, r.node, r.lazy)
		if prev, dup := byNew[r.e.New]; dup {
			t.Errorf("COW chunk %d committed twice: %v by node %d and %v by node %d", r.e.New, prev.e, prev.node, r.e, r.node)
		}
		byNew[r.e.New] = r
	}
	// No COW chunk is allocated twice, except one the dead node allocated
	// and that was not on disk when it died (it writes nothing after):
	// prepared and never committed, or committed lazily and lost. The
	// survivors' reload finds it free, and may allocate it again, even
	// for the same origin chunk (so the same exception: a survivor's
	// Prepare refuses an origin chunk that has an exception on disk).
	preparedBySurvivor := map[exstore.Exception]bool{}
	for _, r := range rec.prepared {
		if victim == nil || r.node != int(victim.id) {
			preparedBySurvivor[r.e] = true
		}
	}
	seen := map[exstore.Chunk]recorded{}
	freedByCrash := 0
	for _, r := range rec.prepared {
		if victim != nil && r.node == int(victim.id) && (want[r.e.Old] != r.e.New || preparedBySurvivor[r.e]) {
			freedByCrash++
			continue
		}
		if prev, dup := seen[r.e.New]; dup {
			t.Errorf("COW chunk %d allocated twice: %v by node %d and %v by node %d", r.e.New, prev.e, prev.node, r.e, r.node)
		}
		seen[r.e.New] = r
	}
	if victim != nil {
		// Written or not (the victim's own commits and flushes may have
		// written it), the survivors agree with the disk, checked above.
		t.Logf("the dead node's last lazy commit %v on disk: %v", lastE0, want[lastE0.Old] == lastE0.New)
	}
	lazyCommits := 0
	for _, r := range rec.committed {
		if r.lazy {
			lazyCommits++
		}
	}
	assert.Positive(t, lazyCommits, "snapshot writes commit lazily")
	t.Logf("%d exceptions; %d prepared (%d of them freed by the crash), %d committed (%d lazily, %d of them lost with the dead node)", len(want), len(rec.prepared), freedByCrash, len(rec.committed), lazyCommits, lostLazy)

	// Every survivor reads the snapshot as the model says, quiescent now.
	p := make([]byte, mnChunkBytes)
	for _, n := range survivors {
		for c := range uint32(mnHot) {
			start := hist.clock.Add(1)
			require.NoError(t, n.snap.ReadAt(ctx, p, int64(c)*mnChunkBytes))
			tg, uniform := readTag(p)
			if assert.True(t, uniform, "node %d: chunk %d is torn", n.id, c) {
				if msg := hist.check(c, tg, start, hist.clock.Add(1)); msg != "" {
					t.Errorf("node %d, final read: %s", n.id, msg)
				}
			}
		}
	}
	for _, n := range survivors {
		st := n.store.Stats()
		t.Logf("node %d: %+v; %d optimistic lookups, %d Unchanged", n.id, st, n.rec.optimistic.Load(), n.rec.unchanged.Load())
		// The engine reads the snapshot as it does in production.
		assert.Positive(t, n.rec.optimistic.Load(), "node %d: optimistic lookups", n.id)
		assert.Positive(t, n.rec.unchanged.Load(), "node %d: Unchanged calls", n.id)
	}
}

// mnOp does one random operation of node n.
func mnOp(ctx context.Context, t *testing.T, n *node, rng *rand.Rand, buf []byte, progress int64, sameNode bool, versions *atomic.Uint64, hist *history) error {
	// Mostly near a frontier that moves with the test's progress, so that
	// the nodes contend for chunks that have no exception yet.
	c := uint32((progress/6 + int64(rng.IntN(6))) % mnHot)
	if rng.IntN(4) == 0 {
		c = uint32(rng.IntN(mnHot))
	}
	// snapWriter is the node that writes chunk c in the snapshot, unless
	// sameNode.
	snapWriter := func(c uint32) uint32 { return c%3 + 1 }
	r := rng.IntN(100)
	switch {
	case sameNode:
	case r < 35 && snapWriter(c) == n.id:
		c = (c + 1) % mnHot
	case r >= 70 && r < 92 && snapWriter(c) != n.id:
		c = c - c%3 + n.id - 1
		if c >= mnHot {
			c -= 3
		}
	}
	off := int64(c) * mnChunkBytes
	switch {
	case r < 35: // origin write, whole or half chunk
		p := buf[:mnChunkBytes]
		if rng.IntN(2) == 0 {
			p = buf[:mnChunkBytes/2]
		}
		fillTag(p, tag{chunk: c, kind: kindOrigin, node: uint8(n.id), version: versions.Add(1)})
		return n.volume.WriteAt(ctx, p, off, rng.IntN(4) == 0)
	case r < 70: // snapshot read of one to three chunks
		k := 1 + rng.IntN(3)
		if int(c)+k > mnHot {
			k = mnHot - int(c)
		}
		p := buf[:k*mnChunkBytes]
		start := hist.clock.Add(1)
		if err := n.snap.ReadAt(ctx, p, off); err != nil {
			return err
		}
		end := hist.clock.Add(1)
		for i := range k {
			tg, uniform := readTag(p[i*mnChunkBytes : (i+1)*mnChunkBytes])
			if !uniform {
				t.Errorf("node %d: snapshot chunk %d is torn", n.id, int(c)+i)
				continue
			}
			if msg := hist.check(c+uint32(i), tg, start, end); msg != "" {
				t.Errorf("node %d: %s", n.id, msg)
			}
		}
		return nil
	case r < 92: // snapshot write of a whole chunk
		v := versions.Add(1)
		p := buf[:mnChunkBytes]
		fillTag(p, tag{chunk: c, kind: kindSnapshot, node: uint8(n.id), version: v})
		w := hist.begin(c, v, n.id)
		err := n.snap.WriteAt(ctx, p, off, false)
		hist.end(w, err == nil)
		return err
	default:
		if rng.IntN(2) == 0 {
			return n.volume.Flush(ctx)
		}
		return n.snap.Flush(ctx)
	}
}
