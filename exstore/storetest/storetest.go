package storetest

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
)

// Harness describes how to make stores of one type for the suite.
type Harness struct {
	// Name names the store type in failure messages.
	Name string
	// New returns a new, empty store on a fresh COW device of cowBytes bytes
	// with the given chunk size. It also returns the device so the suite can
	// write chunk data and inspect it. The device must accept I/O of whole
	// 512-byte sectors (the suite uses chunks of 1, 8 and 16 sectors) and
	// stay open until the test ends (register its Close with t.Cleanup).
	New func(t *testing.T, chunkSectors uint32, cowBytes int64) (exstore.Store, blockdev.Device)
	// Reopen closes s and opens a new store on the same device, as after a
	// restart. nil: the type keeps no metadata.
	Reopen func(t *testing.T, s exstore.Store, dev blockdev.Device) exstore.Store
	// OpenShared opens a second, independent store instance on the same
	// device (another node). nil: unsupported. The suite closes it.
	OpenShared func(t *testing.T, dev blockdev.Device) exstore.Store
	// Capacity is how many exceptions a COW of that size holds.
	Capacity func(chunkSectors uint32, cowBytes int64) uint64
	// IsMetadata reports whether COW chunk c is a header/metadata chunk
	// (must never be handed out).
	IsMetadata func(chunkSectors uint32, c exstore.Chunk) bool
	// WantUsage is the usage the store must report after n committed
	// exceptions (and nothing else) on a fresh store.
	WantUsage func(chunkSectors uint32, cowBytes int64, n uint64) exstore.Usage
	// Span is, for a chunk size, how many exceptions one unit of the
	// store's metadata records (for dm-snapshot's "P" layout, one metadata
	// area: chunk bytes/16 records). Tests that must cross from one unit to
	// the next commit more than a Span, and the allocation test fills COWs
	// whose end falls at the edges of a unit, found with IsMetadata. nil:
	// the store's metadata has no such unit; the suite counts in
	// defaultSpan and fills COWs of sizes of its own.
	Span func(chunkSectors uint32) uint64
	// Merge: the store supports PrepareMerge/CommitMerge.
	Merge bool
	// WaitLimit bounds how long the suite waits for a Commit it expects to
	// return, so that a store that never wakes a waiter fails instead of
	// hanging; 0 means defaultWaitLimit.
	WaitLimit time.Duration
}

// defaultWaitLimit is Harness.WaitLimit's default.
const defaultWaitLimit = 30 * time.Second

// Run runs the conformance suite against the stores h makes.
func Run(t *testing.T, h Harness) {
	require.NotEmpty(t, h.Name, "harness name")
	require.NotNil(t, h.New, "%s harness: New", h.Name)
	require.NotNil(t, h.Capacity, "%s harness: Capacity", h.Name)
	require.NotNil(t, h.IsMetadata, "%s harness: IsMetadata", h.Name)
	require.NotNil(t, h.WantUsage, "%s harness: WantUsage", h.Name)

	t.Run("allocation", func(t *testing.T) { testAllocation(t, h) })
	t.Run("order", func(t *testing.T) { testOrder(t, h) })
	t.Run("lookup", func(t *testing.T) { testLookup(t, h) })
	t.Run("walk", func(t *testing.T) { testWalk(t, h) })
	t.Run("in-order commit", func(t *testing.T) { testInOrderCommit(t, h) })
	t.Run("reload", func(t *testing.T) { testReload(t, h) })
	t.Run("usage", func(t *testing.T) { testUsage(t, h) })
	t.Run("invalidate", func(t *testing.T) { testInvalidate(t, h) })
	t.Run("merge", func(t *testing.T) { testMerge(t, h) })
	t.Run("refresh", func(t *testing.T) { testRefresh(t, h) })
	t.Run("concurrency", func(t *testing.T) { testConcurrency(t, h) })
	t.Run("conditional prepare", func(t *testing.T) { testConditionalPrepare(t, h) })
	t.Run("lazy commit", func(t *testing.T) { testLazyCommit(t, h) })
}
