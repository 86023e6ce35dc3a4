package storetest

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// testUsage checks the usage after every commit up to capacity.
func testUsage(t *testing.T, h Harness) {
	for _, c := range []uint32{1, 8} {
		t.Run(fmt.Sprintf("C=%d", c), func(t *testing.T) {
			span := h.span(c)
			ss := newSession(t, h, c, h.cowHolding(t, c, 2*span+span/2))
			capacity := ss.capacity()
			require.Positive(t, capacity, "COW too small for the test")
			checkUsage := func(n uint64) bool {
				t.Helper()
				want, got := ss.wantUsage(n), ss.s.Usage()
				ok := assert.Equal(t, want, got, "%s: usage after %d exceptions", h.Name, n)
				ok = assert.Equal(t, uint64(ss.bytes)/exstore.SectorSize, got.TotalSectors, "%s: total sectors", h.Name) && ok
				ok = assert.Equal(t, n, got.Exceptions, "%s: exception count", h.Name) && ok
				ok = assert.Zero(t, got.AllocatedSectors%uint64(c), "%s: allocation %d is not whole chunks", h.Name, got.AllocatedSectors) && ok
				ok = assert.LessOrEqual(t, got.MetadataSectors, got.AllocatedSectors, "%s: metadata beyond the allocation", h.Name) && ok
				ok = assert.LessOrEqual(t, got.AllocatedSectors, got.TotalSectors, "%s: allocation beyond the device", h.Name) && ok
				if n == 0 || n == 1 || n == capacity {
					ok = assert.Equal(t, fmt.Sprintf("%d/%d %d", want.AllocatedSectors, want.TotalSectors, want.MetadataSectors),
						got.String(), "%s: status after %d exceptions", h.Name, n) && ok
				}
				return ok
			}
			checkUsage(0)
			for n := uint64(1); n <= capacity; n++ {
				ss.add(exstore.Chunk(n * 2))
				if !checkUsage(n) {
					break
				}
			}
		})
	}
}
