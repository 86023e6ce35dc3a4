package volumes

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized/snapset"
	"github.com/clustersnap/clustersnap/internal/cutcheck"
	"github.com/clustersnap/clustersnap/lockc/inproc"
)

// clusterNode opens f's origin as node id of engines, with cat as catalog.
func clusterNode(t *testing.T, engines *inproc.Cluster, id uint32, f fixture, cat string) *Set {
	c := Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "boot", COW: f.cow}}, Catalog: cat}
	c.Cluster = &Cluster{ID: "c1", Engine: engines.Node(id), EngineName: "local", Shared: true}
	return open(t, c)
}

// TestLiveSnapshotAcrossNodes creates a snapshot on node 1 while nodes 2
// and 3 write the origin, every write logged: every node then serves it,
// it reads the same on each, and it is a cut of all their writes. Deleted
// on node 3, it goes on every node. A node that cannot learn the new set
// (here: it reads another catalog) stops writing the origin.
func TestLiveSnapshotAcrossNodes(t *testing.T) {
	const regionBytes = 2 * chunk
	ctx := context.Background()
	f := newFixture(t)
	require.NoError(t, os.WriteFile(f.origin, make([]byte, originSize), 0o600))
	cat := filepath.Join(t.TempDir(), "catalog")
	engines := inproc.NewCluster()
	nodes := []*Set{clusterNode(t, engines, 1, f, cat), clusterNode(t, engines, 2, f, cat), clusterNode(t, engines, 3, f, cat)}
	h := cutcheck.New(regionBytes)
	wctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	warm := make(chan struct{}, 2)
	for i, n := range nodes[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(3, uint64(i)))
			buf := make([]byte, regionBytes)
			for k := 0; k < 20000 && (wctx.Err() == nil || k <= 50); k++ {
				if err := h.Write(rng.IntN(originSize/regionBytes), buf, func(p []byte, off int64) error { return n.Origin.WriteAt(ctx, p, off, false) }); err != nil {
					t.Errorf("node %d: %v", i+2, err)
					return
				}
				if k == 50 {
					warm <- struct{}{}
				}
			}
		}()
	}
	<-warm
	<-warm
	live := filepath.Join(t.TempDir(), "live.cow")
	h.CutBegins()
	_, err := nodes[0].CreateSnapshot(ctx, CreateRequest{Name: "live", COW: live, CreateBytes: 2 * originSize})
	h.CutEnds()
	require.NoError(t, err)
	// The writers' next writes wait until their node adopted the set.
	buf := make([]byte, regionBytes)
	for range 100 {
		require.NoError(t, h.Write(rand.IntN(originSize/regionBytes), buf, func(p []byte, off int64) error { return nodes[2].Origin.WriteAt(ctx, p, off, false) }))
	}
	stop()
	wg.Wait()

	var first []byte
	for i, n := range nodes {
		require.Equal(t, []string{"boot", "live"}, statusNames(n), "node %d", i+1)
		img := make([]byte, originSize)
		require.NoError(t, n.Snapshots()[1].ReadAt(ctx, img, 0))
		if first == nil {
			first = img
			assert.Empty(t, h.Check(img, 10))
		} else {
			assert.Equal(t, first, img, "node %d reads the snapshot as node 1 does", i+1)
		}
		assert.Equal(t, nodes[0].Status().Cluster.SnapshotSet, n.Status().Cluster.SnapshotSet)
	}

	require.NoError(t, nodes[2].DeleteSnapshot(ctx, "live"))
	for i, n := range nodes {
		require.NoError(t, n.Origin.WriteAt(ctx, make([]byte, chunk), 0, false), "node %d", i+1)
		assert.Equal(t, []string{"boot"}, statusNames(n), "node %d", i+1)
	}

	// Node 4 reads another catalog: it cannot learn the next set, so it
	// stops writing the origin instead of writing it uncopied.
	lost := clusterNode(t, engines, 4, f, filepath.Join(t.TempDir(), "another-catalog"))
	_, err = nodes[0].CreateSnapshot(ctx, CreateRequest{Name: "again", COW: filepath.Join(t.TempDir(), "again.cow"), CreateBytes: originSize})
	require.NoError(t, err)
	err = lost.Origin.WriteAt(ctx, make([]byte, chunk), 0, false)
	assert.ErrorIs(t, err, snapset.ErrSetChanged)
	require.NoError(t, nodes[1].Origin.WriteAt(ctx, make([]byte, chunk), 0, false))

	// Without a catalog, a clustered node refuses live changes.
	f2 := newFixture(t)
	c := Config{Origin: f2.origin, Snapshots: []SnapshotSpec{{Name: "boot", COW: f2.cow}}}
	c.Cluster = &Cluster{ID: "c2", Engine: inproc.NewCluster().Node(1), EngineName: "local", Shared: true}
	solo := open(t, c)
	_, err = solo.CreateSnapshot(ctx, CreateRequest{Name: "x", COW: filepath.Join(t.TempDir(), "x"), CreateBytes: originSize})
	assert.ErrorIs(t, err, ErrNoCatalog)
}

// A node that read the catalog just before another node created a
// snapshot joins with a set the cluster no longer serves: Open reads the
// catalog again and joins with the new set, rather than refusing.
func TestOpenDuringLiveChangeRetries(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	require.NoError(t, os.WriteFile(f.origin, make([]byte, originSize), 0o600))
	cat := filepath.Join(t.TempDir(), "catalog")
	engines := inproc.NewCluster()
	first := clusterNode(t, engines, 1, f, cat)

	c := Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "boot", COW: f.cow}}, Catalog: cat}
	c.Cluster = &Cluster{ID: "c1", Engine: engines.Node(2), EngineName: "local", Shared: true}
	reads := 0
	c.afterCatalog = func() {
		reads++
		if reads == 1 {
			_, err := first.CreateSnapshot(ctx, CreateRequest{Name: "live", COW: filepath.Join(t.TempDir(), "live.cow"), CreateBytes: 2 * originSize})
			require.NoError(t, err)
		}
	}
	second, err := Open(ctx, c)
	require.NoError(t, err, "the open that raced the create")
	t.Cleanup(func() { second.Close() })
	assert.Equal(t, 2, reads, "catalog reads")
	assert.Equal(t, []string{"boot", "live"}, statusNames(second))
	require.NoError(t, second.Origin.WriteAt(ctx, make([]byte, chunk), 0, false), "an origin write on the node that joined")
	assert.Equal(t, first.Status().Cluster.SnapshotSet, second.Status().Cluster.SnapshotSet)
}
