package etcdcluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/volumes"
)

// TestEtcdClusterLiveMerge: three snapd processes serve one origin; a
// snapshot taken on node 1 is merged back into the origin with 'snapd
// merge --control' on node 1, in steps of 64 KiB, while NBD clients write
// the origin through nodes 2 and 3, each to its own regions (node 2 the
// chunks the first steps merge, whose exceptions it made itself). Afterwards nbdcopy reads, through
// every node, the snapshot's content with each region's last acknowledged
// write on top, and no node serves the snapshot any more.
func TestEtcdClusterLiveMerge(t *testing.T) {
	nbdcopy, err := exec.LookPath("nbdcopy")
	if err != nil {
		t.Skip("nbdcopy not found: apt-get install libnbd-bin")
	}
	const (
		size        = 4 << 20
		chunk       = volumes.DefaultChunkSectors * 512 // the live snapshot's
		regionBytes = 4 * chunk
		regions     = size / regionBytes
		// The last firstRegions regions are node 2's during the merge;
		// their even chunks change last before it, through node 2, so the
		// first steps merge exceptions node 2 made itself, and node 2
		// writes only those chunks during the merge: it finds them in
		// its own table, and only re-reading the metadata after each step
		// keeps it from writing a COW chunk already merged.
		firstRegions = 16
	)
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	snapContent := make([]byte, size)
	rng := rand.New(rand.NewPCG(13, 13))
	for i := range snapContent {
		snapContent[i] = byte(rng.Uint32())
	}
	// Many steps, each followed by the other nodes.
	ns := startCatalogCluster(ctx, t, dir, snapContent, "--merge-step", "64KiB")
	snapd := func(args ...string) string {
		t.Helper()
		out, err := exec.CommandContext(ctx, snapdBinary, args...).CombinedOutput()
		require.NoError(t, err, "snapd %v: %s", args, out)
		return string(out)
	}
	snapd("snapshot", "create", "--control", ns[1].ctl, "--name", "s", "--cow", filepath.Join(dir, "s.cow"), "--cow-size", "16MiB")
	// Every other chunk changes, through every node: the snapshot holds
	// many runs of one exception.
	dial := func(i int) *clusterload.Client {
		c, err := clusterload.Dial(ctx, "unix", ns[i].sock, volumes.OriginExport)
		require.NoError(t, err)
		return c
	}
	clients := []*clusterload.Client{nil, dial(1), dial(2), dial(3)}
	firstChunk := (regions - firstRegions) * regionBytes / chunk
	for c := 0; c < size/chunk; c += 2 {
		through := clients[1+c/2%3]
		if c >= firstChunk {
			through = clients[2]
		}
		require.NoError(t, through.Write(ctx, uint64(c*chunk), bytes.Repeat([]byte{0x5a}, chunk)))
	}

	// From its start on, the origin reads as the snapshot on every node;
	// the writes below land on that.
	snapd("merge", "--control", ns[1].ctl, "--snapshot", "s", "--no-wait")
	want := bytes.Clone(snapContent)
	var wantMu sync.Mutex
	var stop atomic.Bool
	var acked atomic.Int64
	var wg sync.WaitGroup
	write := func(i int, off int64, n int, rng *rand.Rand) bool {
		buf := make([]byte, n)
		for j := range buf {
			buf[j] = byte(rng.Uint32())
		}
		if err := clients[i].Write(ctx, uint64(off), buf); err != nil {
			t.Errorf("node %d: write: %v", i, err)
			return false
		}
		wantMu.Lock()
		copy(want[off:], buf)
		wantMu.Unlock()
		acked.Add(1)
		return true
	}
	// Node 3 writes whole regions of the others all along.
	wg.Add(1)
	go func() {
		defer wg.Done()
		rng := rand.New(rand.NewPCG(17, 3))
		for k := 0; k < 100000 && (!stop.Load() || k <= 20); k++ {
			if !write(3, int64(rng.IntN(regions-firstRegions)*regionBytes), regionBytes, rng) {
				return
			}
		}
	}()
	// Node 2 writes each of its chunks once, as soon as the first steps
	// merged them and while the merge goes on: only a node 2 that re-read
	// the metadata after those steps writes them to the origin, not to
	// COW chunks already merged (where they would be lost).
	nodeChunks := (size/chunk - firstChunk) / 2
	for {
		var st volumes.Status
		require.NoError(t, json.Unmarshal([]byte(snapd("status", "--control", ns[1].ctl, "--json")), &st))
		require.NotNil(t, st.MergeJob)
		require.Equal(t, volumes.MergeRunning, st.MergeJob.State, "the merge ended before node 2 wrote: make it longer")
		if st.MergeJob.Done >= uint64(nodeChunks) {
			break
		}
	}
	rng2 := rand.New(rand.NewPCG(17, 2))
	for _, k := range rng2.Perm(nodeChunks) {
		if !write(2, int64((firstChunk+2*k)*chunk), chunk, rng2) {
			break
		}
	}
	var st volumes.Status
	require.NoError(t, json.Unmarshal([]byte(snapd("status", "--control", ns[1].ctl, "--json")), &st))
	require.Equal(t, volumes.MergeRunning, st.MergeJob.State, "node 2's writes came after the merge's end: make it longer")
	out := snapd("merge", "--control", ns[1].ctl, "--snapshot", "s") // waits for the merge under way
	during := acked.Load()
	stop.Store(true)
	wg.Wait()
	t.Logf("%s%d writes acknowledged through nodes 2 and 3 while the merge ran", out, during)
	assert.Contains(t, out, "merged snapshot s")
	assert.Positive(t, during)

	for i := 1; i <= nodes; i++ {
		// A write passes a node's gate once it followed the merge's end.
		require.NoError(t, clients[i].Write(ctx, 0, want[:chunk]))
		img := filepath.Join(dir, fmt.Sprintf("origin-%d.img", i))
		out, err := exec.CommandContext(ctx, nbdcopy, "nbd+unix:///origin?socket="+ns[i].sock, img).CombinedOutput()
		require.NoError(t, err, "nbdcopy from node %d: %s", i, out)
		got, err := os.ReadFile(img)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(got, want), "node %d: the origin is not the snapshot with the writes on top", i)
		var snaps []volumes.SnapshotStatus
		list := snapd("snapshot", "list", "--control", ns[i].ctl, "--json")
		require.NoError(t, json.Unmarshal([]byte(list), &snaps))
		assert.Empty(t, snaps, "node %d", i)
		clients[i].Close()
	}
	for i := 1; i <= nodes; i++ {
		assert.NoError(t, ns[i].stop(ctx), "node %d", i)
	}
}
