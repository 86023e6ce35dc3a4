package clustertest

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/locktest"
	"github.com/clustersnap/clustersnap/persistent"
)

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
)

// Workload is one run of CheckMultiNode.
type Workload struct {
	// Name names the run in test output.
	Name string
	// Seed seeds every random choice of the run.
	Seed uint64
	// Crash: one node dies while it holds EX with an exception in commit,
	// a third of the way through; the survivors carry on.
	Crash bool
	// SameNode lets a node write the origin chunks it writes in the
	// snapshot.
	SameNode bool
	// Lead is how many operations a node may complete ahead of another
	// node still running before its workers wait for that node to catch
	// up (pacer); 0 leaves the nodes unpaced. It keeps the nodes'
	// operations interleaved on an engine that moves the lock slowly.
	Lead int
}

// CheckMultiNode runs three nodes, each with its own store and COW engine
// over the same origin and COW devices, doing random concurrent origin
// writes, snapshot reads and writes and flushes, and checks them against a
// reference model. In a crash run one node dies while it holds EX with an
// exception in commit (its devices fenced first, then the cluster's
// Crasher kills it); the survivors carry on. A crash run skips if the
// cluster is no locktest.Crasher.
//
// Unless w.SameNode, a node never writes the origin chunks it writes in
// the snapshot (each chunk's snapshot writes belong to one node, its
// origin writes to the others), so every race on a chunk is between nodes;
// SameNode lifts that and so also tests the COW engine's own guard of a
// snapshot read that went to the origin.
func CheckMultiNode(t testing.TB, h Harness, w Workload) {
	seed, crash, sameNode := w.Seed, w.Crash, w.SameNode
	ctx := context.Background()
	cluster := h.NewCluster(t)
	crasher, canCrash := cluster.(locktest.Crasher)
	if crash && !canCrash {
		t.Skipf("%s: the cluster cannot crash a node (no locktest.Crasher)", h.Name)
	}
	clusterID := newClusterID("multi")
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

	rec := &recorder{}
	rec.durable = map[int]int{}
	hist := &history{writes: map[uint32][]*snapWrite{}, dead: map[uint32]bool{}}
	nodes := make([]*node, 3)
	for i := range nodes {
		n := &node{id: uint32(i + 1), origin: &nodeDevice{Device: originDev}, cowDev: &nodeDevice{Device: cowDev}}
		n.store = openNode(t, h, cluster, n.id, n.cowDev, clusterID).store
		n.volume = cow.NewOrigin(n.origin)
		n.rec = newRecordingStore(engineStore(h, n.id, n.store), int(n.id), rec, &hist.clock)
		engineView := forRecording(t, n.rec)
		_, absence := engineView.(exstore.AbsenceChecker)
		require.False(t, absence, "the clustered store is no AbsenceChecker")
		var err error
		n.snap, err = n.volume.AddSnapshot("snap", engineView, n.cowDev, cow.SnapshotOptions{})
		require.NoError(t, err)
		nodes[i] = n
	}

	const workersPerNode, opsPerWorker = 3, 200
	var versions atomic.Uint64
	var opsDone atomic.Int64
	crashAt := int64(workersPerNode * len(nodes) * opsPerWorker / 3)
	crashNow := make(chan struct{})
	var crashOnce sync.Once
	pace := newPacer(w.Lead)
	for _, n := range nodes {
		for range workersPerNode {
			pace.add(n.id)
		}
	}
	var wg sync.WaitGroup
	for _, n := range nodes {
		for w := range workersPerNode {
			wrng := rand.New(rand.NewPCG(seed, uint64(n.id)*100+uint64(w)))
			wg.Go(func() {
				defer pace.exit(n.id)
				buf := make([]byte, 3*mnChunkBytes)
				for range opsPerWorker {
					if err := pace.wait(n.id); err != nil {
						t.Errorf("node %d: %v", n.id, err)
						return
					}
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
					if h.Inspector.LazyWaitingOutsideEX != nil && h.Inspector.LazyWaitingOutsideEX(n.store) {
						t.Errorf("node %d: lazy commits wait to be written while it does not hold EX", n.id)
					}
					pace.did(n.id)
				}
			})
		}
	}

	var victim *node
	var lastE0 exstore.Exception
	// published: a node published a counter before the crash, so the
	// resource held an LVB value when the victim died; before: the
	// survivors' counters then.
	var published bool
	var before clusterized.Stats
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
		// The victim holds EX, so no other node can be granted the lock,
		// publish or re-read metadata until it dies: these stay put.
		for _, n := range nodes {
			st := n.store.Stats()
			published = published || st.Publishes > 0
			if n != victim {
				before.InvalidLVBs += st.InvalidLVBs
				before.Reloads += st.Reloads
				before.Refreshes += st.Refreshes
			}
		}
		victim.crashed.Store(true)
		pace.stop(victim.id)
		victim.origin.fence()
		victim.cowDev.fence()
		hist.crash(victim.id, victim.rec.synced.Load())
		crasher.Crash(victim.id)
		require.ErrorIs(t, victim.rec.Sync(ctx), lockc.ErrLost, "a sync after the crash")
		err = victim.store.Commit(ctx, e1)
		require.ErrorIs(t, err, lockc.ErrLost, "commit after the crash")
		assert.ErrorContains(t, err, clusterID)
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
		assert.ErrorContains(t, err, clusterID)
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
		var after clusterized.Stats
		for _, n := range survivors {
			st := n.store.Stats()
			after.InvalidLVBs += st.InvalidLVBs
			after.Reloads += st.Reloads
			after.Refreshes += st.Refreshes
		}
		if !published && h.UnwrittenInvalidIsUnknown {
			// No counter was ever published: the engine reports the
			// invalidation as Unknown (Harness.UnwrittenInvalidIsUnknown),
			// which a node's first grant takes for a fresh resource, and
			// any later grant for lost content. Either way the survivor
			// re-reads the metadata.
			assert.Greater(t, after.Reloads+after.Refreshes, before.Reloads+before.Refreshes,
				"a survivor re-read the metadata after the crash (no counter was published before it)")
			t.Logf("no counter was published before the crash: the survivors saw the LVB Unknown")
		} else {
			assert.Greater(t, after.InvalidLVBs, before.InvalidLVBs, "a survivor saw the invalid LVB")
			assert.Greater(t, after.Reloads, before.Reloads, "a survivor reloaded fully")
		}
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
func mnOp(ctx context.Context, t testing.TB, n *node, rng *rand.Rand, buf []byte, progress int64, sameNode bool, versions *atomic.Uint64, hist *history) error {
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
