package etcdcluster

import (
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

	"github.com/clustersnap/clustersnap/internal/cutcheck"
	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/volumes"
)

// TestEtcdClusterLiveSnapshot: three snapd processes serve one origin
// file with a shared catalog; while NBD clients write the origin through
// nodes 2 and 3, every acknowledged write logged, 'snapd snapshot create'
// on node 1 takes a snapshot. nbdcopy's copy of it through each node must
// be the same, and a cut of the logged writes (package cutcheck). Then
// 'snapd snapshot delete' on node 2 removes it from every node.
func TestEtcdClusterLiveSnapshot(t *testing.T) {
	nbdcopy, err := exec.LookPath("nbdcopy")
	if err != nil {
		t.Skip("nbdcopy not found: apt-get install libnbd-bin")
	}
	const size, regionBytes = 4 << 20, 2 * clusterload.ChunkBytes
	ctx, cancel := context.WithTimeout(t.Context(), 3*time.Minute)
	defer cancel()
	dir := t.TempDir()
	ns := startCatalogCluster(ctx, t, dir, make([]byte, size))

	h := cutcheck.New(regionBytes)
	wctx, stopWriters := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var cutDone atomic.Bool
	warm, enough := make(chan struct{}, 2), make(chan struct{}, 2)
	for _, i := range []int{2, 3} {
		c, err := clusterload.Dial(ctx, "unix", ns[i].sock, volumes.OriginExport)
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			rng := rand.New(rand.NewPCG(11, uint64(i)))
			buf := make([]byte, regionBytes)
			after := 0
			for n := 0; n < 100000 && (wctx.Err() == nil || n <= 20); n++ {
				write := func(p []byte, off int64) error { return c.Write(ctx, uint64(off), p) }
				if err := h.Write(rng.IntN(size/regionBytes), buf, write); err != nil {
					t.Errorf("node %d: write: %v", i, err)
					return
				}
				if n == 20 {
					warm <- struct{}{}
				}
				if cutDone.Load() {
					if after++; after == 50 {
						enough <- struct{}{}
					}
				}
			}
		}()
	}
	<-warm
	<-warm
	cow := filepath.Join(dir, "live.cow")
	h.CutBegins()
	out, err := exec.CommandContext(ctx, snapdBinary, "snapshot", "create", "--control", ns[1].ctl, "--name", "live", "--cow", cow, "--cow-size", "8MiB").CombinedOutput()
	h.CutEnds()
	cutDone.Store(true)
	require.NoError(t, err, "snapshot create: %s", out)
	for range 2 {
		select {
		case <-enough:
		case <-ctx.Done():
			t.Fatal("the writers did not go on after the snapshot")
		}
	}
	stopWriters()
	wg.Wait()
	sent, acked := h.Writes()
	t.Logf("%d writes sent through nodes 2 and 3, %d acknowledged", sent, acked)

	var first []byte
	for i := 1; i <= nodes; i++ {
		img := filepath.Join(dir, fmt.Sprintf("live-%d.img", i))
		cmd := exec.CommandContext(ctx, nbdcopy, "nbd+unix:///live?socket="+ns[i].sock, img)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "nbdcopy from node %d: %s", i, out)
		got, err := os.ReadFile(img)
		require.NoError(t, err)
		if first == nil {
			first = got
			assert.Empty(t, h.Check(got, 10), "the snapshot is not a cut of the logged writes")
		} else {
			assert.True(t, string(first) == string(got), "node %d reads the snapshot otherwise than node 1", i)
		}
	}

	out, err = exec.CommandContext(ctx, snapdBinary, "snapshot", "delete", "--control", ns[2].ctl, "live").CombinedOutput()
	require.NoError(t, err, "snapshot delete: %s", out)
	for i := 1; i <= nodes; i++ {
		// An origin write passes the node's gate only once it took the
		// new set on.
		c, err := clusterload.Dial(ctx, "unix", ns[i].sock, volumes.OriginExport)
		require.NoError(t, err)
		require.NoError(t, c.Write(ctx, 0, make([]byte, regionBytes)))
		c.Close()
		out, err := exec.CommandContext(ctx, snapdBinary, "snapshot", "list", "--control", ns[i].ctl, "--json").Output()
		require.NoError(t, err)
		var snaps []volumes.SnapshotStatus
		require.NoError(t, json.Unmarshal(out, &snaps))
		assert.Empty(t, snaps, "node %d still serves the deleted snapshot", i)
	}
	for i := 1; i <= nodes; i++ {
		assert.NoError(t, ns[i].stop(ctx), "node %d", i)
	}
}
