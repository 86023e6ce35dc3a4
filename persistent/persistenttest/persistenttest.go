package persistenttest

import (
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/storetest"
	"github.com/clustersnap/clustersnap/persistent"
)

// WithLayout returns h with Capacity, IsMetadata, WantUsage and Span set
// from the "P" layout: record g goes to chunk 2+g+floor(g/E), next_free
// follows the last record, skipping a metadata area, the current area is
// the one record n goes to, and a metadata area records E exceptions.
func WithLayout(h storetest.Harness) storetest.Harness {
	h.Span = func(chunkSectors uint32) uint64 {
		return persistent.NewGeometry(chunkSectors, 1<<40).PerArea
	}
	h.Capacity = func(chunkSectors uint32, cowBytes int64) uint64 {
		return persistent.NewGeometry(chunkSectors, cowBytes).Capacity()
	}
	h.IsMetadata = func(chunkSectors uint32, c exstore.Chunk) bool {
		return persistent.NewGeometry(chunkSectors, 1<<40).IsMetadata(c)
	}
	h.WantUsage = func(chunkSectors uint32, cowBytes int64, n uint64) exstore.Usage {
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
	}
	return h
}
