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
)

func openOn(t *testing.T, dev blockdev.Device, chunkSectors uint32) exstore.Store {
	t.Helper()
	s, err := persistent.Open(context.Background(), dev, persistent.Options{ChunkSectors: chunkSectors, Logger: quietLogger()})
	require.NoError(t, err)
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, storetest.Harness{
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
		Capacity: func(chunkSectors uint32, cowBytes int64) uint64 {
			return persistent.NewGeometry(chunkSectors, cowBytes).Capacity()
		},
		IsMetadata: func(chunkSectors uint32, c exstore.Chunk) bool {
			return persistent.NewGeometry(chunkSectors, 1<<40).IsMetadata(c)
		},
		WantUsage: func(chunkSectors uint32, cowBytes int64, n uint64) exstore.Usage {
			// In order: record g at chunk 2+g+floor(g/E); next_free follows the
			// last, skipping an area; the current area is the one record n goes to.
			g := persistent.NewGeometry(chunkSectors, cowBytes)
			c := uint64(chunkSectors)
			next := uint64(2)
			if n > 0 {
				last := n - 1
				next = 2 + last + last/g.PerArea + 1
				if next%(g.PerArea+1) == 1 {
					next++
				}
			}
			return exstore.Usage{
				AllocatedSectors: next * c,
				TotalSectors:     uint64(cowBytes) / exstore.SectorSize,
				MetadataSectors:  (n/g.PerArea + 2) * c,
				Exceptions:       n,
			}
		},
		Merge: true,
	})
}
