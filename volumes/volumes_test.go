package volumes

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized/snapset"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/cow"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/nbd"
	"github.com/clustersnap/clustersnap/persistent"
)

const (
	originSize = 1 << 20
	cowSize    = 1 << 20
	chunk      = 4096
)

// fixture is an origin whose every byte is 0x11 and two COW files: cow
// formatted with 4 KiB chunks, blank all zeroes.
type fixture struct {
	origin, cow, blank string
}

func newFixture(t *testing.T) fixture {
	t.Helper()
	dir := t.TempDir()
	f := fixture{origin: filepath.Join(dir, "origin"), cow: filepath.Join(dir, "cow"), blank: filepath.Join(dir, "blank")}
	require.NoError(t, os.WriteFile(f.origin, bytes.Repeat([]byte{0x11}, originSize), 0o600))
	for _, p := range []string{f.cow, f.blank} {
		require.NoError(t, blockdev.Create(p, cowSize))
	}
	dev, err := blockdev.Open(f.cow, blockdev.Options{})
	require.NoError(t, err)
	s, err := persistent.Format(context.Background(), dev, chunk/exstore.SectorSize, nil)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	require.NoError(t, dev.Close())
	return f
}

func open(t *testing.T, c Config) *Set {
	t.Helper()
	v, err := Open(context.Background(), c)
	require.NoError(t, err)
	t.Cleanup(func() { v.Close() })
	return v
}

func TestOpenServesTheSnapshotView(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	v := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}})
	require.Len(t, v.Snapshots(), 1)
	assert.Equal(t, "snap", v.Snapshots()[0].Name())
	assert.Equal(t, uint32(chunk/exstore.SectorSize), v.Snapshots()[0].ChunkSectors())

	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, chunk), 2*chunk, false))
	got := make([]byte, chunk)
	require.NoError(t, v.Snapshots()[0].ReadAt(ctx, got, 2*chunk))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, chunk), got, "the snapshot keeps the origin as it was")
}

func TestOpenRefusals(t *testing.T) {
	f := newFixture(t)
	blankBefore, err := os.ReadFile(f.blank)
	require.NoError(t, err)
	cluster := &Cluster{ID: "c1", Engine: inproc.New()}
	for _, tc := range []struct {
		name      string
		config    Config
		want      string
		configErr bool // refused before any device is opened
	}{
		{"cow is the origin", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.origin}}}, "is the origin itself", false},
		{"blank cow", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.blank}}}, "header is zero", false},
		{"blank cow, clustered", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.blank}}, Cluster: cluster}, "header is zero", false},
		{"missing cow", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.blank + ".nope"}}}, "snapshot snap", false},
		{"missing origin", Config{Origin: f.origin + ".nope"}, "origin", false},
		{"unknown store type", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow, Type: "Q"}}}, "unknown store type \"Q\" (known: persistent (P), transient (N))", true},
		{"transient clustered", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.blank, Type: "N", ChunkSectors: 8}}, Cluster: cluster}, "transient store cannot be clustered", true},
		{"name twice", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}, {Name: "snap", COW: f.blank}}}, "name is taken", true},
		{"origin's name", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: OriginExport, COW: f.cow}}}, "name is taken", true},
		{"merge step without a cluster", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}, MergeStep: 1 << 20}, "only with a cluster", true},
		{"negative merge step", Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}, Cluster: cluster, MergeStep: -1}, "want a positive size", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Open(context.Background(), tc.config)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
			assert.Equal(t, tc.configErr, errors.As(err, new(*ConfigError)), "a ConfigError: %v", err)
			blank, rerr := os.ReadFile(f.blank)
			require.NoError(t, rerr)
			assert.True(t, bytes.Equal(blankBefore, blank), "the blank COW is never formatted")
		})
	}
	assert.ErrorIs(t, func() error {
		_, err := Open(context.Background(), Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.blank, Type: "P"}}})
		return err
	}(), persistent.ErrNotFormatted)
}

func TestOpenLocksTheDevices(t *testing.T) {
	f := newFixture(t)
	c := Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}}
	v := open(t, c)
	_, err := Open(context.Background(), c)
	assert.Error(t, err, "the origin is locked")
	_, err = Open(context.Background(), Config{Origin: f.blank, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}})
	assert.Error(t, err, "the COW is locked")
	require.NoError(t, v.Close())
	open(t, c).Close()
}

func TestOpenTransient(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	v := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "scratch", COW: f.blank, Type: "N", ChunkSectors: 16}}})
	s := v.Snapshots()[0]
	assert.Equal(t, uint32(16), s.ChunkSectors())
	require.NoError(t, s.WriteAt(ctx, bytes.Repeat([]byte{0x33}, 512), 0, false))
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x44}, chunk), 8*chunk, false))
	got := make([]byte, 2*chunk)
	require.NoError(t, s.ReadAt(ctx, got, 8*chunk))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, 2*chunk), got)
	require.NoError(t, s.ReadAt(ctx, got[:512], 0))
	assert.Equal(t, bytes.Repeat([]byte{0x33}, 512), got[:512])
}

// Ported from the clusterized registry type's tests: a clustered open
// never formats, and a second node of the cluster sees the first's
// exceptions.
func TestOpenClustered(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	cluster := &Cluster{ID: "c1", Engine: inproc.New()}
	c := Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}, Cluster: cluster}
	v := open(t, c)
	_, lazy := v.Snapshots()[0].Store().(exstore.LazyCommitter)
	assert.True(t, lazy, "the clustered store commits lazily, as the bare persistent one does")
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, chunk), 42*chunk, false))
	require.NoError(t, v.Origin.Flush(ctx))
	require.NoError(t, v.Close())

	v2 := open(t, c)
	store := v2.Snapshots()[0].Store()
	_, found, release, err := store.Lookup(ctx, 42)
	release()
	require.NoError(t, err)
	assert.True(t, found, "the second node sees the first's exception")
	got := make([]byte, chunk)
	require.NoError(t, v2.Snapshots()[0].ReadAt(ctx, got, 42*chunk))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, chunk), got)
}

func TestExports(t *testing.T) {
	f := newFixture(t)
	v := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow, Options: cow.SnapshotOptions{ReadOnly: true}}}})
	ex, err := v.Exports("")
	require.NoError(t, err)
	require.Len(t, ex, 2)
	assert.Equal(t, OriginExport, ex[0].Name)
	assert.Equal(t, "snap", ex[1].Name)
	assert.False(t, ex[0].ReadOnly)
	assert.True(t, ex[1].ReadOnly)
	for _, e := range ex {
		assert.True(t, e.MultiConn, e.Name)
	}
	_, ok := ex[1].Backend.(nbd.COWMapper)
	assert.True(t, ok, "a snapshot offers its COW map")
	_, ok = ex[0].Backend.(nbd.COWMapper)
	assert.False(t, ok, "the origin has no COW")

	ex, err = v.Exports("snap")
	require.NoError(t, err)
	require.Len(t, ex, 3)
	assert.Equal(t, "", ex[2].Name)
	assert.Contains(t, ex[2].Description, "(default export)")
	_, err = v.Exports("nosuch")
	assert.ErrorIs(t, err, ErrNoSuchExport)
}

func TestBackends(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	v := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}})
	snap, origin := snapshotBackend{v.Snapshots()[0]}, originBackend{v.Origin}

	// A write to the origin copies chunk 3 into the COW; a snapshot write
	// puts chunk 5 there.
	require.NoError(t, origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, chunk), 3*chunk, false))
	require.NoError(t, snap.WriteAt(ctx, bytes.Repeat([]byte{0x33}, chunk), 5*chunk, false))
	ext, err := snap.COWExtents(ctx, 0, 8*chunk)
	require.NoError(t, err)
	assert.Equal(t, []nbd.COWExtent{
		{Length: 3 * chunk}, {Length: chunk, InCOW: true},
		{Length: chunk}, {Length: chunk, InCOW: true},
		{Length: 2 * chunk},
	}, ext)

	// Fast zeroing is refused, and changes nothing.
	for _, z := range []nbd.Zeroer{snap, origin} {
		assert.ErrorIs(t, z.WriteZeroes(ctx, 0, chunk, nbd.ZeroOptions{Fast: true}), nbd.ErrZeroNotFast)
	}
	got := make([]byte, chunk)
	require.NoError(t, snap.ReadAt(ctx, got, 0))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, chunk), got)
	require.NoError(t, origin.ReadAt(ctx, got, 0))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, chunk), got)

	// Slow zeroing zeroes.
	require.NoError(t, snap.WriteZeroes(ctx, 0, chunk, nbd.ZeroOptions{}))
	require.NoError(t, snap.ReadAt(ctx, got, 0))
	assert.Equal(t, make([]byte, chunk), got)
	require.NoError(t, origin.WriteZeroes(ctx, chunk, chunk, nbd.ZeroOptions{NoHole: true}))
	require.NoError(t, origin.ReadAt(ctx, got, chunk))
	assert.Equal(t, make([]byte, chunk), got)
	require.NoError(t, snap.ReadAt(ctx, got, chunk))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, chunk), got, "the snapshot kept the origin's zeroed chunk")
}

// With a cluster of other hosts, the devices are shared: no host-local
// lock keeps a second opener out, and they are opened with O_DIRECT.
func TestOpenSharedTakesNoHostLocks(t *testing.T) {
	f := newFixture(t)
	engines := inproc.NewCluster()
	c := Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}}
	c.Cluster = &Cluster{ID: "c1", Engine: engines.Node(1), Shared: true}
	v := open(t, c)
	c.Cluster = &Cluster{ID: "c1", Engine: engines.Node(2), Shared: true}
	v2 := open(t, c)
	ctx := context.Background()
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, chunk), 7*chunk, true))
	got := make([]byte, chunk)
	require.NoError(t, v2.Snapshots()[0].ReadAt(ctx, got, 7*chunk))
	assert.Equal(t, bytes.Repeat([]byte{0x11}, chunk), got, "node 2 reads the chunk node 1 copied")
	require.NoError(t, v2.Origin.ReadAt(ctx, got, 7*chunk))
	assert.Equal(t, bytes.Repeat([]byte{0x22}, chunk), got, "node 2 reads node 1's write past its page cache")
	assert.Greater(t, v.Origin.Device().Alignment(), 1, "the shared origin is open with O_DIRECT")
}

// Once a node loses its lockspace, it stops all I/O to the shared devices:
// origin reads and writes, snapshot reads, and the flush that would make a
// write acknowledged before the loss durable.
func TestLostNodeStopsSharedIO(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	engines := inproc.NewCluster()
	v := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}, Cluster: &Cluster{ID: "c1", Engine: engines.Node(1)}})
	buf := bytes.Repeat([]byte{0x22}, chunk)
	require.NoError(t, v.Origin.WriteAt(ctx, buf, 8*chunk, false))
	select {
	case <-v.Lost():
		t.Fatal("Lost closed before the loss")
	default:
	}
	engines.Crash(1)
	<-v.Lost()
	refused := func(err error, what string) {
		t.Helper()
		assert.True(t, errors.Is(err, ErrClusterLost) || errors.Is(err, lockc.ErrLost), "%s: %v", what, err)
	}
	assert.ErrorIs(t, v.Origin.ReadAt(ctx, buf, 0), ErrClusterLost)
	refused(v.Origin.WriteAt(ctx, buf, 8*chunk, false), "a write to a chunk already copied")
	refused(v.Origin.WriteAt(ctx, buf, 9*chunk, false), "a write that needs a copy")
	refused(v.Snapshots()[0].ReadAt(ctx, buf, 0), "a snapshot read")
	assert.ErrorIs(t, v.Origin.Flush(ctx), ErrClusterLost, "the flush of a write made before the loss")
}

// Status reports the origin, the membership and each store's counters,
// and counts what a second node's work made this node do.
func TestStatus(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	plain := open(t, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}}}).Status()
	assert.Nil(t, plain.Cluster)
	require.Len(t, plain.Snapshots, 1)
	assert.Nil(t, plain.Snapshots[0].Cluster)
	assert.Equal(t, int64(originSize), plain.Origin.SizeBytes)
	assert.Equal(t, "valid", plain.Snapshots[0].State)

	engines := inproc.NewCluster()
	f2 := newFixture(t)
	c := Config{Origin: f2.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f2.cow}}}
	c.Cluster = &Cluster{ID: "c1", Engine: engines.Node(1), EngineName: "local", Shared: true}
	a := open(t, c)
	c.Cluster = &Cluster{ID: "c1", Engine: engines.Node(2), EngineName: "local", Shared: true}
	b := open(t, c)
	require.NoError(t, a.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, chunk), 3*chunk, true))
	require.NoError(t, b.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x33}, chunk), 5*chunk, true))
	sa, sb := a.Status(), b.Status()
	require.NotNil(t, sa.Cluster)
	assert.Equal(t, "c1", sa.Cluster.ID)
	assert.Equal(t, "local", sa.Cluster.Engine)
	assert.NotEqual(t, sa.Cluster.NodeID, sb.Cluster.NodeID, "two nodes")
	assert.False(t, sa.Cluster.Lost)
	ca, cb := sa.Snapshots[0].Cluster, sb.Snapshots[0].Cluster
	require.NotNil(t, ca)
	require.NotNil(t, cb)
	assert.Positive(t, ca.UpConverts)
	assert.Positive(t, cb.UpConverts)
	assert.Positive(t, cb.Refreshes+cb.Reloads, "b took EX after a changed the metadata, so it read what a added")
	assert.Equal(t, uint64(2), sb.Snapshots[0].Exceptions)
	require.NotNil(t, sa.Cluster.SnapshotSet)
	assert.Equal(t, 1, sa.Cluster.SnapshotSet.Snapshots)
	assert.Equal(t, uint64(1), sa.Cluster.SnapshotSet.Generation)
	assert.Equal(t, sa.Cluster.SnapshotSet, sb.Cluster.SnapshotSet, "both nodes serve the set they published")
	assert.NotEmpty(t, sa.Snapshots[0].UUID, "the clustered Open stamped a UUID")
	assert.Equal(t, sa.Snapshots[0].UUID, sb.Snapshots[0].UUID)
}

// Every node serving the origin must serve it with the same snapshots: a
// node with a snapshot fewer would overwrite chunks without copying them.
func TestOpenRefusesAnotherSnapshotSet(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	cow2 := filepath.Join(t.TempDir(), "cow2")
	require.NoError(t, blockdev.Create(cow2, cowSize))
	dev, err := blockdev.Open(cow2, blockdev.Options{})
	require.NoError(t, err)
	s, err := persistent.Format(ctx, dev, chunk/exstore.SectorSize, nil)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	require.NoError(t, dev.Close())

	engines := inproc.NewCluster()
	both := []SnapshotSpec{{Name: "snap", COW: f.cow}, {Name: "snap2", COW: cow2}}
	v := open(t, Config{Origin: f.origin, Snapshots: both, Cluster: &Cluster{ID: "c1", Engine: engines.Node(1), Shared: true}})
	_, err = Open(ctx, Config{Origin: f.origin, Snapshots: both[:1], Cluster: &Cluster{ID: "c1", Engine: engines.Node(2), Shared: true}})
	require.ErrorIs(t, err, snapset.ErrSetMismatch)
	assert.False(t, errors.As(err, new(*ConfigError)), "the devices disagree, not the flags")
	assert.Contains(t, err.Error(), "this node serves 1 snapshots (snap)")
	assert.Contains(t, err.Error(), "the cluster serves 2 snapshots, generation 1")

	// The refused node left nothing behind: a node with the same set
	// joins, and the first node's origin writes go on.
	v3 := open(t, Config{Origin: f.origin, Snapshots: both, Cluster: &Cluster{ID: "c1", Engine: engines.Node(3), Shared: true}})
	require.NoError(t, v.Origin.WriteAt(ctx, bytes.Repeat([]byte{0x22}, chunk), 3*chunk, true))
	got := make([]byte, chunk)
	for _, sn := range v3.Snapshots() {
		require.NoError(t, sn.ReadAt(ctx, got, 3*chunk))
		assert.Equal(t, bytes.Repeat([]byte{0x11}, chunk), got, "node 3's %s kept the chunk node 1 overwrote", sn.Name())
	}
}

// A node that lost the lockspace of its snapshot set's membership stops
// its I/O too, as for a store's.
func TestLostSnapshotSetStopsSharedIO(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t)
	engines := inproc.NewCluster()
	v := open(t, Config{Origin: f.origin, Cluster: &Cluster{ID: "c1", Engine: engines.Node(1)}})
	buf := bytes.Repeat([]byte{0x22}, chunk)
	require.NoError(t, v.Origin.WriteAt(ctx, buf, 0, false), "an origin without snapshots is a set too")
	engines.Crash(1)
	<-v.Lost()
	err := v.Origin.WriteAt(ctx, buf, 0, false)
	assert.ErrorIs(t, err, lockc.ErrLost, "the gate refuses")
	assert.ErrorIs(t, v.Origin.ReadAt(ctx, buf, 0), ErrClusterLost)
}

// Nodes that open one unlabelled COW at once stamp it one at a time: the
// first stamps a UUID and the others find it, so they all join one
// snapshot set (which names the COW by that UUID).
func TestConcurrentOpensStampOneLabel(t *testing.T) {
	ctx := context.Background()
	for round := range 5 {
		f := newFixture(t)
		engines := inproc.NewCluster()
		const nodes = 3
		sets := make([]*Set, nodes)
		errs := make([]error, nodes)
		var wg sync.WaitGroup
		for i := range nodes {
			wg.Add(1)
			go func() {
				defer wg.Done()
				sets[i], errs[i] = Open(ctx, Config{Origin: f.origin, Snapshots: []SnapshotSpec{{Name: "snap", COW: f.cow}},
					Cluster: &Cluster{ID: "c1", Engine: engines.Node(uint32(i + 1)), Shared: true}})
			}()
		}
		wg.Wait()
		for i := range nodes {
			require.NoError(t, errs[i], "round %d node %d", round, i+1)
			defer sets[i].Close()
		}
		dev, err := blockdev.Open(f.cow, blockdev.Options{ReadOnly: true})
		require.NoError(t, err)
		l, ok, err := persistent.ReadLabel(ctx, dev)
		require.NoError(t, dev.Close())
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, "c1", l.ClusterID)
		assert.False(t, l.UUID.IsZero())
	}
}
