package storetest

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
)

// testRefresh checks that a second instance on the same device sees what
// the first commits and merges once it refreshes.
func testRefresh(t *testing.T, h Harness) {
	if h.OpenShared == nil {
		t.Skipf("%s cannot be opened twice", h.Name)
	}
	const c = 8
	span := h.span(c)
	ss := newSession(t, h, c, h.cowHolding(t, c, 3*span))
	other := h.OpenShared(t, ss.dev)
	require.NotNil(t, other, "%s: OpenShared returned no store", h.Name)
	t.Cleanup(func() { assert.NoError(t, other.Close(), "%s: Close of the second instance", h.Name) })

	var committed []exstore.Exception
	addSome := func(k int) {
		for range k {
			committed = append(committed, ss.add(exstore.Chunk(3*len(committed)+7)))
		}
	}
	check := func(when string) {
		t.Helper()
		require.NoError(t, other.Refresh(t.Context()), "%s: Refresh %s", h.Name, when)
		ss.checkWalk(other, exceptionMap(committed), "of the second instance "+when)
		assert.Equal(t, ss.s.Usage(), other.Usage(), "%s: usage of the second instance %s", h.Name, when)
		for _, e := range committed {
			if !ss.checkFound(other, e.Old, e.New) {
				break
			}
		}
	}
	addSome(40)
	check("after 40 commits")
	addSome(int(span) + 11)
	check("after commits that filled a metadata unit")
	if h.Merge {
		committed = mergeAll(ss, committed, len(committed)-int(span+1)/2)
		check("after a merge")
		ss.checkMissing(other, exstore.Chunk(3*(len(committed))+7), "in the second instance after it was merged")
	}
}
