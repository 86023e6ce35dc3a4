package storetest

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// defaultSpan is the span the suite counts in for a harness without Span.
const defaultSpan = 256

// span is the harness's Span for chunk size c, or defaultSpan.
func (h Harness) span(c uint32) uint64 {
	if h.Span != nil {
		return h.Span(c)
	}
	return defaultSpan
}

// chunkBytes is the chunk size in bytes.
func chunkBytes(chunkSectors uint32) int64 { return int64(chunkSectors) * exstore.SectorSize }

// cowOfChunks is the size of a COW of the given number of chunks.
func cowOfChunks(chunkSectors uint32, chunks int64) int64 { return chunks * chunkBytes(chunkSectors) }

// cowHolding is the size of the smallest COW of whole chunks that holds n
// exceptions, by the harness's Capacity.
func (h Harness) cowHolding(t *testing.T, c uint32, n uint64) int64 {
	t.Helper()
	limit := 4*int64(n) + 64
	for chunks := int64(n); chunks <= limit; chunks++ {
		if b := cowOfChunks(c, chunks); h.Capacity(c, b) >= n {
			return b
		}
	}
	require.FailNow(t, "no COW holds the exceptions", "%s: no COW of up to %d %d-sector chunks holds %d exceptions", h.Name, limit, c, n)
	return 0
}

// cowSize is a COW size the allocation test fills.
type cowSize struct {
	name  string
	bytes int64
}

// edgeSizes are COW sizes whose end falls at the edges of a unit of the
// store's metadata: m is the first metadata chunk (by IsMetadata) at least
// three spans in, and the next metadata chunk after it ends m's unit. They
// are none without a Span, or when no chunk there is metadata.
func (h Harness) edgeSizes(c uint32) []cowSize {
	if h.Span == nil {
		return nil
	}
	span := int64(h.Span(c))
	limit := 3*span + 2*(span+2)
	next := func(from int64) int64 {
		for ch := from; ch < limit; ch++ {
			if h.IsMetadata(c, exstore.Chunk(ch)) {
				return ch
			}
		}
		return -1
	}
	m := next(3 * span)
	if m < 0 {
		return nil
	}
	unit := next(m+1) - m
	if unit < 3 {
		return nil
	}
	sizes := []cowSize{
		{"metadata unit ends with the device", cowOfChunks(c, m)},
		{"last chunk is metadata", cowOfChunks(c, m+1)},
		{"last chunk is the first data chunk after metadata", cowOfChunks(c, m+2)},
		{"mid-unit", cowOfChunks(c, m+unit/2)},
	}
	if c > 1 {
		sizes = append(sizes, cowSize{"mid-unit with a partial chunk", cowOfChunks(c, m+unit/2) + chunkBytes(c)/2})
	}
	return sizes
}
