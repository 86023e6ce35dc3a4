package clusterized_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
)

func TestRegister(t *testing.T) {
	ctx := context.Background()
	r := exstore.NewRegistry()
	engine := inproc.New()
	require.NoError(t, clusterized.Register(r, engine))
	require.Error(t, clusterized.Register(r, engine), "registered twice")
	assert.Contains(t, r.Names(), clusterized.TypeName)

	blank := faultdev.New("blank", 1<<20)
	_, err := r.Open(ctx, clusterized.TypeName, blank, exstore.Args{Params: []string{"c1"}})
	assert.ErrorIs(t, err, persistent.ErrNotFormatted, "a clustered node never formats")
	assert.Equal(t, make([]byte, 1<<20), blank.Bytes(), "nothing written to the blank device")

	dev := faultdev.New("cow", 1<<20)
	formatCOW(t, dev, 8)
	_, err = r.Open(ctx, clusterized.TypeName, dev, exstore.Args{})
	assert.ErrorContains(t, err, "cluster id")
	_, err = r.Open(ctx, clusterized.TypeName, dev, exstore.Args{Params: []string{"a", "b"}})
	assert.Error(t, err)

	s, err := r.Open(ctx, clusterized.TypeName, dev, exstore.Args{Params: []string{"c1"}})
	require.NoError(t, err)
	cs, ok := s.(*clusterized.LazyStore)
	require.True(t, ok, "the persistent core commits lazily, and so does the store the registry opens")
	assert.Equal(t, "c1", cs.ClusterID())
	assert.Equal(t, uint32(8), s.ChunkSectors())
	e := add(t, s, 42)
	require.NoError(t, s.Close())

	// Another member of the cluster (the same engine, a new process) sees it.
	s2, err := r.Open(ctx, clusterized.TypeName, dev, exstore.Args{Params: []string{"c1"}})
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
		_, err := clusterized.OpenPersistent(context.Background(), dev, inproc.New(), id, clusterized.PersistentOptions{})
		assert.Error(t, err, "cluster id of %d bytes", len(id))
	}
}
