package clusterized_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

// openPersistent opens a clustered persistent store on dev for cluster id,
// as a caller wires one: through Open, with an opener that never formats.
func openPersistent(ctx context.Context, dev blockdev.Device, engine lockc.Engine, id string) (*clusterized.Store, error) {
	open := func(ctx context.Context, dev blockdev.Device) (exstore.Store, error) {
		return persistent.Open(ctx, dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
	}
	return clusterized.Open(ctx, dev, open, engine, id, clusterized.Options{})
}

func TestOpenPersistent(t *testing.T) {
	ctx := context.Background()
	engine := inproc.New()

	blank := faultdev.New("blank", 1<<20)
	_, err := openPersistent(ctx, blank, engine, "c1")
	assert.ErrorIs(t, err, persistent.ErrNotFormatted, "a clustered node never formats")
	assert.Equal(t, make([]byte, 1<<20), blank.Bytes(), "nothing written to the blank device")

	dev := faultdev.New("cow", 1<<20)
	formatCOW(t, dev, 8)
	cs, err := openPersistent(ctx, dev, engine, "c1")
	require.NoError(t, err)
	s := cs.Exstore()
	_, ok := s.(*clusterized.LazyStore)
	require.True(t, ok, "the persistent core commits lazily, and so does the store handed to the COW engine")
	assert.Equal(t, "c1", cs.ClusterID())
	assert.Equal(t, uint32(8), s.ChunkSectors())
	e := add(t, s, 42)
	require.NoError(t, s.Close())

	// Another member of the cluster (the same engine, a new process) sees it.
	s2, err := openPersistent(ctx, dev, engine, "c1")
	require.NoError(t, err)
	defer s2.Close()
	got, found, release, err := s2.Lookup(ctx, 42)
	release()
	require.NoError(t, err)
	assert.True(t, found)
	assert.Equal(t, e.New, got)
}

func TestNewRejectsBadClusterIDs(t *testing.T) {
	dev := faultdev.New("cow", 1<<20)
	formatCOW(t, dev, 8)
	for _, id := range []string{"", string(make([]byte, 61))} {
		_, err := openPersistent(context.Background(), dev, inproc.New(), id)
		assert.Error(t, err, "cluster id of %d bytes", len(id))
	}
}

// Opening a store joins its lock even while other nodes' conversions keep
// its convert queue from ever emptying: a new request waits behind every
// queued conversion, so a plain NL request would wait for ever here. The
// queued conversion below can never be granted while the first lock holds
// CR, which stands for a busy store's conversions that follow one another.
func TestOpenJoinsABusyStoreLock(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	cluster := inproc.NewCluster()
	dev := faultdev.New("cow", 1<<20)
	formatCOW(t, dev, 8)
	res := clusterized.ResourceName("busy")
	other, err := cluster.Node(2).Open(ctx, clusterized.DefaultLockspace)
	require.NoError(t, err)
	defer other.Close()
	holder, err := other.Lock(ctx, res, lockc.CR)
	require.NoError(t, err)
	converter, err := other.Lock(ctx, res, lockc.CR)
	require.NoError(t, err)
	queued := make(chan error, 1)
	convertCtx, stopConverting := context.WithCancel(ctx)
	defer stopConverting()
	go func() { queued <- converter.Convert(convertCtx, lockc.EX) }()
	require.NoError(t, cluster.WaitQueueLen(ctx, clusterized.DefaultLockspace, res, 1, 0))

	s, err := openPersistent(ctx, dev, cluster.Node(1), "busy")
	require.NoError(t, err, "the store opens though a conversion stays queued")
	require.NoError(t, s.Close())
	stopConverting()
	require.ErrorIs(t, <-queued, context.Canceled)
	require.NoError(t, holder.Unlock(ctx))
}
