package persistenttest

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/clustersnap/clustersnap/exstore"
)

// The layout the suite expects, against the spec's own figures
// (shared/specs/dm-snapshot-format.md §1.3, §1.4 and vectors 4, 5, 13, 14).
func TestLayoutMatchesTheSpecsVectors(t *testing.T) {
	const mib = 1 << 20
	for c, e := range map[uint32]uint64{1: 32, 8: 256, 16: 512, 32: 1024, 1024: 32768} {
		assert.Equal(t, e, perArea(c), "E for C=%d", c)
	}
	for _, c := range []exstore.Chunk{0, 1, 258, 515} {
		assert.True(t, isMetadata(8, c), "C=8 chunk %d", c)
	}
	for _, c := range []exstore.Chunk{2, 257, 259, 514} {
		assert.False(t, isMetadata(8, c), "C=8 chunk %d", c)
	}
	assert.Equal(t, uint64(4079), capacity(8, 16*mib), "vector 13: C=8, N=4096")
	assert.Equal(t, uint64(65279), capacity(8, 256*mib), "vector 14: C=8, N=65536 ≡ 1 mod 257")
	assert.Equal(t, uint64(31), capacity(1, 34*512), "C=1, N=34 ≡ 1 mod 33")
	assert.Equal(t, uint64(255), capacity(8, 258*4096), "C=8, N=258 ≡ 1 mod 257: area 0 must not fill")
	// Away from the edge case, the spec's closed form N-2-floor((N-2)/(E+1)).
	for _, tc := range []struct {
		c uint32
		n uint64
	}{{8, 3}, {8, 259}, {8, 1000}, {1, 33}, {1, 35}, {16, 5000}} {
		e := perArea(tc.c)
		want := tc.n - 2 - (tc.n-2)/(e+1)
		assert.Equal(t, want, capacity(tc.c, int64(tc.n*uint64(tc.c)*exstore.SectorSize)), "C=%d N=%d", tc.c, tc.n)
	}
	assert.Equal(t, uint64(0), capacity(8, 2*4096), "header and area only")
}
