package volumes

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// TestMergeAcrossNodes merges a snapshot on node 1, in steps under the
// origin lock, while nodes 2 and 3 write the origin, each to its own
// regions: every node follows the merge (merge mode, then the snapshot
// gone), and every node then reads the origin as the snapshot with each
// region's last acknowledged write on top.
func TestMergeAcrossNodes(t *testing.T) {
	assert.Empty(t, mergeAcrossNodes(t, func(*Set) {}))
}

// The check catches a follower that does not switch to merge mode (its
// writes to chunks the snapshot holds reach the origin, and the merge
// overwrites them) and one that does not re-read what a step merged (its
// writes go to COW chunks already merged).
func TestMergeAcrossNodesCatchesBrokenFollowers(t *testing.T) {
	for name, brk := range map[string]func(*Set){
		"no merge mode": func(v *Set) { v.breaks.noMergeMode = true },
		"no refresh":    func(v *Set) { v.breaks.noRefresh = true },
	} {
		t.Run(name, func(t *testing.T) {
			problems := mergeAcrossNodes(t, brk)
			assert.NotEmpty(t, problems, "the broken follower went unnoticed")
			t.Log(problems)
		})
	}
}

// mergeAcrossNodes runs the test with followers broken by brk and returns
// what it found wrong.
func mergeAcrossNodes(t *testing.T, brk func(*Set)) []string {
	const regionBytes = chunk
	ctx := context.Background()
	f := newFixture(t)
	cat := filepath.Join(t.TempDir(), "catalog")
	engines := inproc.NewCluster()
	// Node 1 merges in steps of four chunks: many steps, with writes
	// between them.
	c := Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "boot", COW: f.cow}}, Catalog: cat, MergeStep: 4 * chunk}
	c.Cluster = &Cluster{ID: "c1", Engine: engines.Node(1), EngineName: "local", Shared: true}
	nodes := []*Set{open(t, c), clusterNode(t, engines, 2, f, cat), clusterNode(t, engines, 3, f, cat)}
	for _, n := range nodes[1:] {
		brk(n)
	}
	var problemsMu sync.Mutex
	var problems []string
	problem := func(format string, args ...any) {
		problemsMu.Lock()
		defer problemsMu.Unlock()
		problems = append(problems, fmt.Sprintf(format, args...))
	}
	_, err := nodes[0].CreateSnapshot(ctx, CreateRequest{Name: "s", COW: filepath.Join(t.TempDir(), "s.cow"), CreateBytes: 2 * originSize})
	require.NoError(t, err)
	snapContent, err := os.ReadFile(f.origin)
	require.NoError(t, err)
	// Every other chunk changes, through every node: runs of one.
	for c := 0; c < originSize/chunk; c += 2 {
		require.NoError(t, nodes[c/2%3].Origin.WriteAt(ctx, bytes.Repeat([]byte{0x5a}, chunk), int64(c*chunk), false))
	}

	// The merge starts: from then on every node's origin reads as the
	// snapshot, and the writes below land on it, whether their chunk is
	// merged yet or not.
	_, err = nodes[0].StartMerge(ctx, "s")
	require.NoError(t, err)
	want := bytes.Clone(snapContent)
	var wantMu sync.Mutex
	var stop atomic.Bool
	var wg sync.WaitGroup
	var during atomic.Int64
	for i, n := range nodes[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(21, uint64(i)))
			buf := make([]byte, regionBytes)
			for k := 0; k < 100000 && (!stop.Load() || k <= 20); k++ {
				r := rng.IntN(originSize/regionBytes/2)*2 + i // node 2 the even regions, node 3 the odd
				for j := range buf {
					buf[j] = byte(rng.Uint32())
				}
				if err := n.Origin.WriteAt(ctx, buf, int64(r*regionBytes), k%16 == 0); err != nil {
					problem("node %d: write: %v", i+2, err)
					return
				}
				wantMu.Lock()
				copy(want[r*regionBytes:], buf)
				wantMu.Unlock()
				if _, _, merging := nodes[0].Merging(); merging {
					during.Add(1)
				}
			}
		}()
	}
	end, err := nodes[0].WaitMerge(ctx)
	require.NoError(t, err)
	stop.Store(true)
	wg.Wait()
	t.Logf("%d writes acknowledged while node 1 was merging", during.Load())
	if end.State != MergeDone || end.Done != end.Total || end.Total < originSize/chunk/2 {
		problem("the merge ended %+v", end)
	}
	for i, n := range nodes {
		// An origin write passes a node's gate once it followed the end.
		if err := n.Origin.WriteAt(ctx, want[:chunk], 0, false); err != nil {
			problem("node %d: write after the merge: %v", i+1, err)
			continue
		}
		got := make([]byte, originSize)
		require.NoError(t, n.Origin.ReadAt(ctx, got, 0))
		if !bytes.Equal(got, want) {
			problem("node %d: the origin after the merge is not the snapshot plus the writes: %s", i+1, diffAt(got, want, chunk))
		}
		if _, _, merging := n.Merging(); merging {
			problem("node %d still merges", i+1)
		}
		if names := statusNames(n); len(names) != 1 || names[0] != "boot" {
			problem("node %d serves %v", i+1, names)
		}
	}
	if len(problems) == 0 {
		// A restarted node serves the merged origin without the
		// snapshot; and writes went on during the merge.
		assert.Equal(t, []string{"boot"}, statusNames(clusterNode(t, engines, 4, f, cat)))
		assert.Positive(t, during.Load())
	}
	return problems
}

// diffAt describes where got differs from want, by blocks of size.
func diffAt(got, want []byte, size int) string {
	var bad []int
	for b := 0; b*size < len(want); b++ {
		if !bytes.Equal(got[b*size:(b+1)*size], want[b*size:(b+1)*size]) {
			bad = append(bad, b)
		}
	}
	if len(bad) > 8 {
		return fmt.Sprintf("%d blocks differ, the first %v", len(bad), bad[:8])
	}
	return fmt.Sprintf("blocks %v differ", bad)
}
