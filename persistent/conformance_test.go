package persistent_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/storetest"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/persistent/persistenttest"
)

func openOn(t *testing.T, dev blockdev.Device, chunkSectors uint32) exstore.Store {
	t.Helper()
	s, err := persistent.Open(context.Background(), dev, persistent.Options{ChunkSectors: chunkSectors, Logger: quietLogger()})
	require.NoError(t, err)
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, persistenttest.WithLayout(storetest.Harness{
		Name: "persistent",
		New: func(t *testing.T, chunkSectors uint32, cowBytes int64) (exstore.Store, blockdev.Device) {
			dev := faultdev.New("cow", cowBytes)
			return openOn(t, dev, chunkSectors), dev
		},
		Reopen: func(t *testing.T, s exstore.Store, dev blockdev.Device) exstore.Store {
			require.NoError(t, s.Close())
			return openOn(t, dev, 0)
		},
		OpenShared: func(t *testing.T, dev blockdev.Device) exstore.Store { return openOn(t, dev, 0) },
		Merge:      true,
	}))
}
