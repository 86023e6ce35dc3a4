package persistenttest

import (
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/storetest"
)

// recordBytes is the size of one on-disk exception record: two
// little-endian 64-bit chunk numbers (spec §1.2).
const recordBytes = 16

// perArea is E, the records one metadata area holds: an area is one chunk.
func perArea(chunkSectors uint32) uint64 {
	return uint64(chunkSectors) * exstore.SectorSize / recordBytes
}

// isMetadata reports whether chunk c is the header (chunk 0) or a metadata
// area: area i lives at chunk 1+(E+1)·i (spec §1.3).
func isMetadata(chunkSectors uint32, c exstore.Chunk) bool {
	return c == 0 || (uint64(c)-1)%(perArea(chunkSectors)+1) == 0
}

// capacity counts the exceptions a COW of cowBytes takes by running the
// kernel's allocator (spec §1.4): next_free starts at 2 and skips area
// positions; an allocation is refused once its chunk would lie past the
// end, and so is one whose record would fill an area whose successor lies
// past the end (the edge case N ≡ 1 mod E+1). It is a simulation rather
// than the spec's closed form on purpose: the store computes the closed
// form, and the suite must not check the store against itself.
func capacity(chunkSectors uint32, cowBytes int64) uint64 {
	e := perArea(chunkSectors)
	chunks := uint64(cowBytes) / (uint64(chunkSectors) * exstore.SectorSize)
	var n uint64
	for next := uint64(2); next < chunks; n++ {
		if n%e == e-1 && 1+(e+1)*(n/e+1) >= chunks {
			break // filling this area would need a next area past the end
		}
		next++
		if next%(e+1) == 1 {
			next++
		}
	}
	return n
}

// WithLayout returns h with Capacity, IsMetadata, WantUsage and Span set
// from the "P" layout: record g goes to chunk 2+g+floor(g/E), next_free
// follows the last record, skipping a metadata area, the current area is
// the one record n goes to, and a metadata area records E exceptions.
func WithLayout(h storetest.Harness) storetest.Harness {
	h.Span = perArea
	h.Capacity = capacity
	h.IsMetadata = isMetadata
	h.WantUsage = func(chunkSectors uint32, cowBytes int64, n uint64) exstore.Usage {
		e := perArea(chunkSectors)
		c := uint64(chunkSectors)
		next := uint64(2)
		if n > 0 {
			last := n - 1
			next = 2 + last + last/e + 1
			if next%(e+1) == 1 {
				next++
			}
		}
		return exstore.Usage{
			AllocatedSectors: next * c,
			TotalSectors:     uint64(cowBytes) / exstore.SectorSize,
			MetadataSectors:  (n/e + 2) * c,
			Exceptions:       n,
		}
	}
	return h
}
