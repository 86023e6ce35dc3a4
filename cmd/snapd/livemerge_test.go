package main

import (
	"bytes"
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/test/clusterload"
	"github.com/clustersnap/clustersnap/volumes"
)

// TestLiveMergeEndToEnd rolls a served origin back to a snapshot with
// 'snapd merge --control' while NBD clients keep writing the origin, each
// to its own regions, every acknowledged write remembered: afterwards
// nbdcopy's copy of the origin must be the snapshot's content with each
// region's last acknowledged write on top (a write to a chunk not yet
// merged went to the COW and was merged, one to a merged chunk went to the
// origin: none is lost, none undone). The snapshot's export is gone and
// status reports the merge done.
func TestLiveMergeEndToEnd(t *testing.T) {
	nbdcopy := tool(t, "nbdcopy", "libnbd-bin")
	nbdinfo := tool(t, "nbdinfo", "libnbd-bin")
	bin := buildSnapd(t)
	const size, chunk, regionBytes, writers = 8 << 20, 4096, 8192, 3
	dir := t.TempDir()
	origin, sock, ctl := filepath.Join(dir, "origin"), filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "control.sock")
	snapContent := make([]byte, size)
	rng := rand.New(rand.NewPCG(5, 5))
	for i := range snapContent {
		snapContent[i] = byte(rng.Uint32())
	}
	require.NoError(t, os.WriteFile(origin, snapContent, 0o600))
	srv := startServe(t, bin, "--origin", origin, "--listen", "", "--socket", sock, "--control", ctl)
	run1(t, bin, "snapshot", "create", "--control", ctl, "--name", "s", "--cow", filepath.Join(dir, "s.cow"), "--cow-size", "32MiB")

	// Change every other chunk, so that the snapshot holds many runs of
	// one exception: the merge takes a while, and writes land among them.
	ctx := context.Background()
	c, err := clusterload.Dial(ctx, "unix", sock, volumes.OriginExport)
	require.NoError(t, err)
	for off := 0; off < size; off += 2 * chunk {
		require.NoError(t, c.Write(ctx, uint64(off), bytes.Repeat([]byte{0x5a}, chunk)))
	}
	c.Close()

	// From the merge's start on, the origin reads as the snapshot: the
	// writes below land on that (earlier ones are rolled back with it).
	run1(t, bin, "merge", "--control", ctl, "--snapshot", "s", "--no-wait")
	want := bytes.Clone(snapContent)
	var wantMu sync.Mutex
	var stop atomic.Bool
	var wg sync.WaitGroup
	var acked atomic.Int64
	for w := range writers {
		c, err := clusterload.Dial(ctx, "unix", sock, volumes.OriginExport)
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			rng := rand.New(rand.NewPCG(9, uint64(w)))
			buf := make([]byte, regionBytes)
			for n := 0; n < 200000 && (!stop.Load() || n < 20); n++ {
				r := rng.IntN(size/regionBytes/writers)*writers + w // this writer's regions only
				for i := range buf {
					buf[i] = byte(rng.Uint32())
				}
				if err := c.Write(ctx, uint64(r*regionBytes), buf); err != nil {
					t.Errorf("writer %d: %v", w, err)
					return
				}
				wantMu.Lock()
				copy(want[r*regionBytes:], buf)
				wantMu.Unlock()
				acked.Add(1)
			}
		}()
	}
	out := run1(t, bin, "merge", "--control", ctl, "--snapshot", "s") // waits for the merge under way
	during := acked.Load()
	stop.Store(true)
	wg.Wait()
	t.Logf("%s%d writes acknowledged while the merge ran, %d in all", out, during, acked.Load())
	assert.Contains(t, out, "merged snapshot s into the origin")
	assert.Positive(t, during, "writes went on during the merge")

	img := filepath.Join(dir, "origin.img")
	run1(t, nbdcopy, "nbd+unix:///origin?socket="+sock, img)
	got, err := os.ReadFile(img)
	require.NoError(t, err)
	if !bytes.Equal(got, want) {
		t.Errorf("the origin after the merge is not the snapshot plus the writes: %s", firstDifference(got, want))
	}
	assert.NotContains(t, run1(t, nbdinfo, "--list", "nbd+unix:///?socket="+sock), `export="s"`)
	var st volumes.Status
	require.NoError(t, json.Unmarshal([]byte(run1(t, bin, "status", "--control", ctl, "--json")), &st))
	require.NotNil(t, st.MergeJob)
	assert.Equal(t, volumes.MergeDone, st.MergeJob.State)
	assert.GreaterOrEqual(t, st.MergeJob.Total, uint64(size/chunk/2), "every other chunk, and what the writers changed before the merge began")
	assert.Equal(t, st.MergeJob.Total, st.MergeJob.Done)
	assert.Empty(t, st.Snapshots)

	// A merge of a snapshot that is not served is refused, exit 1.
	out2, err := exec.Command(bin, "merge", "--control", ctl, "--snapshot", "s").CombinedOutput()
	assert.Error(t, err)
	assert.Contains(t, string(out2), "no such snapshot")
	code, _ := srv.stop(t)
	assert.Equal(t, 0, code)
}

// firstDifference says where got first differs from want.
func firstDifference(got, want []byte) string {
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			return "first difference at byte " + itoa(i)
		}
	}
	return "lengths " + itoa(len(got)) + " and " + itoa(len(want))
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }
