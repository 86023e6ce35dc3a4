package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/volumes"
)

const (
	// mergeChunkBytes is the live snapshot's chunk (snapd snapshot
	// create's default): the host changes every other one before the
	// merge, so the snapshot holds runs of one exception.
	mergeChunkBytes = volumes.DefaultChunkSectors * 512
	// mergeExceptions is how many exceptions the merge has to merge.
	mergeExceptions = liveOriginBytes / mergeChunkBytes / 2
	// mergeStep is node 1's snapd serve --merge-step: the merge takes many
	// steps, each of them published to nodes 2 and 3, which write between
	// them.
	mergeStep = "64KiB"
	// mergeRegionBytes is a region of the writers during the merge: it
	// spans four chunks of the live snapshot, the first and third of them
	// exceptions (mergeWrite).
	mergeRegionBytes = clusterload.ChunkBytes
	// mergeRegions is how many regions the origin has, and mergeFirst how
	// many of them, at its end, node 2 writes during the merge; node 3
	// writes the others. Their chunks change last before the merge, so
	// its first two steps merge their exceptions (a merge goes from the
	// newest exception back).
	mergeRegions, mergeFirst = liveOriginBytes / mergeRegionBytes, 16
	// mergeWarm is how many writes each writer has acknowledged since the
	// merge began when the host asks node 1 to wait for its end.
	mergeWarm = 4
)

// testLiveMerge, on the guests of TestClusterLive after
// testLiveSnapshot (node 1 serves with --merge-step 64KiB): the host
// writes random data over the whole origin through node 1; node 1
// creates snapshot "live" again, on another blank shared disk; the host
// changes every other 4 KiB chunk of the origin through the nodes, so
// "live" holds runs of one exception; then node 1 starts merging "live"
// back into the origin ('snapd merge --control --no-wait'), in steps
// under the origin lock, while the host writes the origin through nodes 2
// and 3, each to its own regions, one request at a time, remembering each
// region's last acknowledged content (node 2 writes chunks the first
// steps merge: see mergeWrite); then 'snapd merge --control' on node 1
// waits for the merge under way to end and reports it done, every
// exception merged. After the writers stopped and one origin write through
// each node (which passes a node's gate only once it followed the merge's
// end): the origin, read with nbdcopy through every node, is what "live"
// held (the origin as the create found it) with each region's last
// acknowledged write on top; 'snapd snapshot list' on every node lists
// only "snap" and the live export is refused. It returns that origin, for
// TestClusterLive's checks of the images.
func testLiveMerge(lc *liveCluster) []byte {
	t, ctx := lc.t, lc.ctx
	// Random content first, written through node 1, so that a merge
	// that puts anything but the snapshot's data back shows.
	snapContent := make([]byte, liveOriginBytes)
	rng := rand.New(rand.NewPCG(23, 23))
	for i := range snapContent {
		snapContent[i] = byte(rng.Uint32())
	}
	lc.write(1, 0, snapContent)
	lc.do(liveCreateMerge, 1)

	// Every other chunk changes, through every node at once, those of
	// node 2's regions last and through node 2: "live" then holds
	// mergeExceptions runs of one exception, the newest of them node 2's,
	// which node 2 knows without reading the metadata again.
	began := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, nodes+1)
	change := func(from, to int, through ...int) { // the even chunks in [from, to)
		for k, i := range through {
			wg.Go(func() {
				cl, err := clusterload.Dial(ctx, "tcp", lc.addrs[i], volumes.OriginExport)
				if err != nil {
					errs[i] = err
					return
				}
				defer cl.Close()
				changed := bytes.Repeat([]byte{0x5a}, mergeChunkBytes)
				for c := from + 2*k; c < to; c += 2 * len(through) {
					rctx, cancel := context.WithTimeout(ctx, requestTimeout)
					err := cl.Write(rctx, uint64(c*mergeChunkBytes), changed)
					cancel()
					if err != nil {
						errs[i] = fmt.Errorf("chunk %d: %w", c, err)
						return
					}
				}
			})
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				lc.fail("node %d: origin write before the merge: %v", i, err)
			}
		}
	}
	const firstChunk = (mergeRegions - mergeFirst) * mergeRegionBytes / mergeChunkBytes
	change(0, firstChunk, 1, 2, 3)
	change(firstChunk, liveOriginBytes/mergeChunkBytes, 2)
	t.Logf("%d chunks of the origin changed through the three nodes in %v", mergeExceptions, time.Since(began).Round(100*time.Millisecond))

	// The merge starts: from then on every node's origin reads as "live",
	// and the writes below land on that, whether their chunk is merged
	// yet or not.
	writers := map[int]*clusterload.Client{}
	for _, i := range []int{2, 3} {
		cl, err := clusterload.Dial(ctx, "tcp", lc.addrs[i], volumes.OriginExport)
		require.NoError(t, err, "node %d", i)
		writers[i] = cl
	}
	began = time.Now()
	start := mergeStatus(t, lc.do(liveMergeStart, 1)[1])
	require.Equal(t, volumes.MergeJobStatus{Snapshot: liveSnapshot, State: volumes.MergeRunning, Done: start.Done, Total: mergeExceptions}, start,
		"the merge as it started")
	want := bytes.Clone(snapContent)
	var wantMu sync.Mutex
	var stop atomic.Bool
	var acked [nodes + 1]atomic.Int64
	warm := make(chan int, 2*len(writers)) // each writer sends once warm and once when it ends
	for i, cl := range writers {
		wg.Go(func() {
			defer cl.Close()
			defer func() { warm <- i }()
			rng := rand.New(rand.NewPCG(29, uint64(i)))
			for n := 1; n <= 100000 && !stop.Load(); n++ {
				off, buf := mergeWrite(i, rng)
				rctx, cancel := context.WithTimeout(ctx, requestTimeout)
				err := cl.Write(rctx, uint64(off), buf)
				cancel()
				if err != nil {
					errs[i] = fmt.Errorf("%d bytes at %d: %w", len(buf), off, err)
					return
				}
				wantMu.Lock()
				copy(want[off:], buf)
				wantMu.Unlock()
				acked[i].Add(1)
				if n == mergeWarm {
					warm <- i
				}
			}
		})
	}
	for range writers {
		select {
		case i := <-warm:
			if errs[i] != nil {
				lc.fail("node %d: origin write during the merge: %v", i, errs[i])
			}
		case <-ctx.Done():
			lc.fail("the writers: %v", ctx.Err())
		}
	}
	// Node 1 waits for the merge under way; the writers go on meanwhile.
	end := mergeStatus(t, lc.do(liveMergeWait, 1)[1])
	took := time.Since(began)
	during := []int64{acked[2].Load(), acked[3].Load()}
	stop.Store(true)
	wg.Wait()
	for _, i := range []int{2, 3} {
		if errs[i] != nil {
			lc.fail("node %d: origin write during the merge: %v", i, errs[i])
		}
	}
	t.Logf("node 1 merged %d exceptions in steps of %s in %v as the host saw it, while nodes 2 and 3 acknowledged %v writes; %d and %d in all",
		end.Done, mergeStep, took.Round(100*time.Millisecond), during, acked[2].Load(), acked[3].Load())
	assert.Equal(t, volumes.MergeJobStatus{Snapshot: liveSnapshot, State: volumes.MergeDone, Done: mergeExceptions, Total: mergeExceptions}, end,
		"the merge as it ended")

	// Every node, once it followed the merge's end (its next origin write
	// waits for that), reads the origin as "live" with the writes on top.
	for i := 1; i <= nodes; i++ {
		off := (i - 1) * mergeRegionBytes
		lc.write(i, uint64(off), want[off:off+mergeRegionBytes])
	}
	for i := 1; i <= nodes; i++ {
		got := lc.read(i, volumes.OriginExport)
		assert.True(t, bytes.Equal(want, got), "node %d: the origin is not the snapshot with the last acknowledged writes on top: %s",
			i, chunksDiffer(got, want, snapContent))
	}
	lc.checkOnlySnap()
	return want
}

// mergeWrite is a random write of node i (2 or 3) during the merge: its
// offset and data. Node 2 writes one chunk with an exception in one of
// the last mergeFirst regions, which the merge's first steps merge: for
// most of the merge it writes chunks already merged, whose writes must go
// to the origin now, and its lookups hit in the table it had before, so
// that only following the merge step by step tells it (a write that went
// to the COW would be lost; a write with a chunk the node finds no
// exception for would re-read the table). Node 3 writes a whole region
// of the others, chunks with and without an exception, merged or not.
func mergeWrite(i int, rng *rand.Rand) (int, []byte) {
	var off, n int
	switch i {
	case 2:
		r := mergeRegions - mergeFirst + rng.IntN(mergeFirst)
		off, n = r*mergeRegionBytes+rng.IntN(2)*2*mergeChunkBytes, mergeChunkBytes
	default:
		off, n = rng.IntN(mergeRegions-mergeFirst)*mergeRegionBytes, mergeRegionBytes
	}
	buf := make([]byte, n)
	for j := range buf {
		buf[j] = byte(rng.Uint32())
	}
	return off, buf
}

// mergeStatus is the merge status a 'snapd merge --control --json' result
// line holds.
func mergeStatus(t *testing.T, out string) volumes.MergeJobStatus {
	t.Helper()
	var st volumes.MergeJobStatus
	require.NoError(t, json.Unmarshal([]byte(out), &st), "snapd merge --json: %s", out)
	return st
}

// chunksDiffer says in which of the live snapshot's chunks got differs
// from want, and in how many of them got holds what the snapshot held.
func chunksDiffer(got, want, snapContent []byte) string {
	var bad []int
	old := 0
	for c := 0; (c+1)*mergeChunkBytes <= len(want); c++ {
		g := got[c*mergeChunkBytes : (c+1)*mergeChunkBytes]
		if !bytes.Equal(g, want[c*mergeChunkBytes:(c+1)*mergeChunkBytes]) {
			bad = append(bad, c)
			if bytes.Equal(g, snapContent[c*mergeChunkBytes:(c+1)*mergeChunkBytes]) {
				old++
			}
		}
	}
	return fmt.Sprintf("%d chunks differ (%d of them as the snapshot held them), the first %v", len(bad), old, bad[:min(len(bad), 8)])
}
