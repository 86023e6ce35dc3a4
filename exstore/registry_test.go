package exstore_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/transient"
	"github.com/clustersnap/clustersnap/persistent"
)

func TestRegistryOpensTypesByNameAndAlias(t *testing.T) {
	ctx := context.Background()
	r := exstore.NewRegistry()
	require.NoError(t, persistent.Register(r))
	require.NoError(t, transient.Register(r))
	assert.Equal(t, []string{"persistent", "transient"}, r.Names())

	for _, tc := range []struct {
		name         string
		wantMetadata uint64 // sectors: the P store has a header and an area, N none
	}{{"persistent", 16}, {"P", 16}, {"p", 16}, {"transient", 0}, {"N", 0}} {
		dev := faultdev.New("cow", 1<<20)
		s, err := r.Open(ctx, tc.name, dev, exstore.Args{ChunkSectors: 8})
		require.NoError(t, err, tc.name)
		assert.Equal(t, uint32(8), s.ChunkSectors(), tc.name)
		assert.Equal(t, tc.wantMetadata, s.Usage().MetadataSectors, tc.name)
		require.NoError(t, s.Close())
	}
}

func TestRegistryRefusesDuplicatesAndUnknownTypes(t *testing.T) {
	r := exstore.NewRegistry()
	require.NoError(t, persistent.Register(r))
	err := r.Register(exstore.Type{Name: "other", Aliases: []string{"p"},
		Open: func(context.Context, blockdev.Device, exstore.Args) (exstore.Store, error) { return nil, nil }})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `"p" is already registered`)
	_, ok := r.Lookup("other")
	assert.False(t, ok, "a refused type is not half-registered")

	_, err = r.Open(context.Background(), "clustered", faultdev.New("cow", 1<<20), exstore.Args{})
	require.Error(t, err)
	assert.Contains(t, err.Error(), `unknown store type "clustered" (known: persistent)`)

	_, err = r.Open(context.Background(), "P", faultdev.New("cow", 1<<20), exstore.Args{Params: []string{"x"}})
	assert.ErrorContains(t, err, "takes no parameters")
}

func TestRegistryNoFormatLeavesABlankDeviceAlone(t *testing.T) {
	r := exstore.NewRegistry()
	require.NoError(t, persistent.Register(r))
	blank := faultdev.New("blank", 1<<20)
	_, err := r.Open(context.Background(), "P", blank, exstore.Args{ChunkSectors: 8, NoFormat: true})
	assert.ErrorIs(t, err, persistent.ErrNotFormatted)
	assert.Equal(t, make([]byte, 1<<20), blank.Bytes(), "nothing written to the blank device")
}
