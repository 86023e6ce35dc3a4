package exstore

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestTableExtentTreeModel drives the B+ tree with random inserts, removals and
// in-place front extensions against a sorted slice, checking floor, ceil,
// find and the tree's shape.
func TestTableExtentTreeModel(t *testing.T) {
	ops := 200_000
	if testing.Short() || raceEnabled {
		ops = 40_000
	}
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 99))
			var tree extentTree
			var model []extent // sorted by old, disjoint
			maxHeight, minHeightAfterMax := 0, 0
			// Extents live on a grid of 100-chunk cells, at most one per
			// cell, starting at offset 10..29 and ending before the cell
			// does; front extensions stay within the cell.
			const cells = 5000
			index := func(old Chunk) (int, bool) {
				return slices.BinarySearchFunc(model, old, func(x extent, c Chunk) int {
					switch {
					case x.old < c:
						return -1
					case x.old > c:
						return 1
					}
					return 0
				})
			}
			for op := range ops {
				// Phases that mostly grow and mostly shrink the tree, so
				// it gains and loses levels.
				insertPct := 50
				if (op/20_000)%2 == 1 {
					insertPct = 15
				}
				cell := Chunk(rng.IntN(cells))
				switch r := rng.IntN(100); {
				case r < insertPct:
					old := cell*100 + 10 + Chunk(rng.IntN(20))
					i, _ := index(old)
					if (i > 0 && model[i-1].old/100 == cell) || (i < len(model) && model[i].old/100 == cell) {
						break // cell taken
					}
					x := extent{old: old, new: Chunk(rng.Uint64N(1 << 40)), n: 1 + rng.Uint64N(50)}
					tree.insert(x)
					model = slices.Insert(model, i, x)
				case r < 90:
					if len(model) == 0 {
						break
					}
					i := rng.IntN(len(model))
					require.True(t, tree.remove(model[i].old))
					require.False(t, tree.remove(model[i].old+1), "removed a start that is not one")
					model = slices.Delete(model, i, i+1)
				default:
					if len(model) == 0 {
						break
					}
					i := rng.IntN(len(model))
					room := uint64(model[i].old % 100) // chunks before it in its cell
					if room == 0 {
						break
					}
					d := 1 + rng.Uint64N(min(room, 10))
					tree.moveStart(model[i].old, d)
					model[i].old -= Chunk(d)
					model[i].new -= Chunk(d)
					model[i].n += d
				}
				require.Equal(t, len(model), tree.count)
				if h := treeHeight(&tree); h > maxHeight {
					maxHeight, minHeightAfterMax = h, h
				} else {
					minHeightAfterMax = min(minHeightAfterMax, h)
				}
				for range 3 {
					c := Chunk(rng.IntN(cells * 100))
					requireExtentSearch(t, &tree, model, c)
				}
				if op%5000 == 0 {
					requireTreeShape(t, &tree)
					got := []extent{}
					tree.each(func(x *extent) bool { got = append(got, *x); return true })
					require.Equal(t, append([]extent{}, model...), got)
				}
			}
			requireTreeShape(t, &tree)
			require.GreaterOrEqual(t, maxHeight, 3, "the tree never grew a third level")
			require.Less(t, minHeightAfterMax, maxHeight, "the tree never lost a level")
		})
	}
}

// treeHeight is the number of levels of tree.
func treeHeight(tree *extentTree) int {
	h := 0
	for n := tree.root; n != nil; h++ {
		if n.leaf() {
			return h + 1
		}
		n = n.kids[0]
	}
	return h
}

// requireExtentSearch checks floor, ceil and find of c against model.
func requireExtentSearch(t *testing.T, tree *extentTree, model []extent, c Chunk) {
	t.Helper()
	i := sort.Search(len(model), func(j int) bool { return model[j].old > c })
	var wantFloor, wantCeil, wantFind *extent
	if i > 0 {
		wantFloor = &model[i-1]
		if c <= model[i-1].last() {
			wantFind = &model[i-1]
		}
	}
	if i > 0 && model[i-1].old == c {
		wantCeil = &model[i-1]
	} else if i < len(model) {
		wantCeil = &model[i]
	}
	for _, tc := range []struct {
		name      string
		got, want *extent
	}{
		{"floor", tree.floor(c), wantFloor},
		{"ceil", tree.ceil(c), wantCeil},
		{"find", tree.find(c), wantFind},
	} {
		if (tc.got == nil) != (tc.want == nil) || (tc.got != nil && *tc.got != *tc.want) {
			t.Fatalf("%s(%d) = %+v, want %+v", tc.name, c, tc.got, tc.want)
		}
	}
}
