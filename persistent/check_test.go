package persistent_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/persistent"
)

func TestCheckFindsEachProblemAndWhere(t *testing.T) {
	ctx := context.Background()
	full := make([][2]uint64, 256)
	for i := range full {
		full[i] = [2]uint64{uint64(1000 + i), uint64(2 + i)}
	}
	for _, tc := range []struct {
		name     string
		size     int64
		areas    map[uint64][][2]uint64
		errors   uint64
		where    [2]uint64 // area, slot of the first problem
		what     string
		warnings int
	}{
		{"clean", 16 * mib, map[uint64][][2]uint64{0: {{7, 4}, {3, 2}, {9, 3}}}, 0, [2]uint64{}, "", 0},
		{"past the end", 16 * mib, map[uint64][][2]uint64{0: {{7, 2}, {8, 999999}}}, 1, [2]uint64{0, 1}, "past the end", 0},
		{"metadata chunk", 16 * mib, map[uint64][][2]uint64{0: {{7, 2}, {8, 258}}}, 1, [2]uint64{0, 1}, "metadata area", 0},
		{"duplicate origin chunk", 16 * mib, map[uint64][][2]uint64{0: {{7, 2}, {7, 3}}}, 1, [2]uint64{0, 1}, "origin chunk 7 already has an exception (area 0 slot 0)", 0},
		{"duplicate COW chunk", 16 * mib, map[uint64][][2]uint64{0: {{7, 2}, {8, 3}, {9, 2}}}, 1, [2]uint64{0, 2}, "COW chunk 2 is used by an earlier record", 0},
		{"no terminator", 258 * 4096, map[uint64][][2]uint64{0: full}, 1, [2]uint64{0, 255}, "no terminator", 0},
		{"stale record after the terminator", 16 * mib, map[uint64][][2]uint64{0: {{7, 2}, {0, 0}, {9, 3}}}, 0, [2]uint64{}, "", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := image(tc.size, tc.areas)
			var calls int
			r, err := persistent.Check(ctx, faultdev.FromBytes("cow", img), func(done, max uint64) {
				calls++
				assert.LessOrEqual(t, done, max)
			})
			require.NoError(t, err)
			assert.Equal(t, tc.errors, r.Errors)
			assert.Equal(t, tc.errors == 0, r.OK())
			assert.Len(t, r.Warnings, tc.warnings)
			assert.Positive(t, calls, "progress reported")
			if tc.errors > 0 {
				require.NotEmpty(t, r.Problems)
				assert.Equal(t, tc.where, [2]uint64{r.Problems[0].Area, r.Problems[0].Slot})
				assert.Contains(t, r.Problems[0].What, tc.what)
			}
		})
	}
}

func TestCheckAgreesWithAStoreItWrote(t *testing.T) {
	dev := faultdev.New("cow", 16*mib)
	s := open(t, dev, 8)
	for i := 0; i < 700; i++ { // three areas with 4 KiB chunks
		take(t, s, dev, exstore.Chunk(i*3), byte(i))
	}
	r, err := persistent.Check(context.Background(), dev, nil)
	require.NoError(t, err)
	assert.True(t, r.OK(), "%v", r.Problems)
	assert.Equal(t, uint64(700), r.Exceptions)
	assert.Equal(t, uint64(3), r.Areas)
	assert.Empty(t, r.Warnings)
}
