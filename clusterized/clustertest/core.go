package clustertest

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/lockc/locktest"
	"github.com/clustersnap/clustersnap/persistent"
)

// Core is the core store a node of the suite opens on the shared COW
// device, for its first core and for every full reload: the persistent
// store, with the hook through which a check forces a race inside Prepare.
// It has every method of *persistent.Store, so a wrapper that embeds it
// keeps every capability the clusterized store looks for.
type Core struct {
	*persistent.Store
	hooks *coreHooks
}

// coreHooks is what the cores of one node share across reloads.
type coreHooks struct {
	// beforePrepare, if set, runs once, at the start of the next
	// PrepareIfUnchanged.
	beforePrepare atomic.Pointer[func()]
}

// PrepareIfUnchanged runs the hook a check armed, if any, then the
// persistent store's PrepareIfUnchanged.
func (c Core) PrepareIfUnchanged(ctx context.Context, old exstore.Chunk, word *atomic.Uint64, want uint64) (exstore.Exception, error) {
	if hook := c.hooks.beforePrepare.Swap(nil); hook != nil {
		(*hook)()
	}
	return c.Store.PrepareIfUnchanged(ctx, old, word, want)
}

var _ exstore.ConditionalPreparer = Core{}

// openedNode is one node's clustered store and the hooks of its cores.
type openedNode struct {
	store *clusterized.Store
	hooks *coreHooks
}

// openNode opens node id's clustered store of cluster clusterID on dev,
// through cluster's engine for id with its tokens hidden (withoutTokens),
// with h's WrapCore over every core it opens; the store is closed when the
// test ends.
func openNode(tb testing.TB, h Harness, cluster locktest.Cluster, id uint32, dev blockdev.Device, clusterID string) openedNode {
	tb.Helper()
	hooks := &coreHooks{}
	open := func(ctx context.Context, dev blockdev.Device) (exstore.Store, error) {
		p, err := persistent.Open(ctx, dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
		if err != nil {
			return nil, err
		}
		core := Core{Store: p, hooks: hooks}
		if h.WrapCore != nil {
			return h.WrapCore(id, core), nil
		}
		return core, nil
	}
	s, err := clusterized.Open(context.Background(), dev, open, withoutTokens(cluster, id), clusterID, clusterized.Options{})
	require.NoError(tb, err, "node %d joins cluster %s", id, clusterID)
	tb.Cleanup(func() { _ = s.Close() })
	return openedNode{store: s, hooks: hooks}
}

// engineStore is the store node id's COW engine gets from s: s.Exstore(),
// through h's WrapEngineStore.
func engineStore(h Harness, id uint32, s *clusterized.Store) exstore.Store {
	if h.WrapEngineStore != nil {
		return h.WrapEngineStore(id, s.Exstore())
	}
	return s.Exstore()
}

// newClusterID returns a cluster id starting with prefix that no other run
// uses: an engine whose resources outlive a cluster (the kernel DLM keeps
// a released resource, and its LVB, for a while) must not hand one run's
// counter to the next.
func newClusterID(prefix string) string {
	return fmt.Sprintf("%s-%08x", prefix, rand.Uint32())
}

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// formatCOW writes an empty persistent store on dev, as snapd create does
// before any clustered node opens it.
func formatCOW(tb testing.TB, dev blockdev.Device, chunkSectors uint32) {
	tb.Helper()
	s, err := persistent.Format(context.Background(), dev, chunkSectors, quietLogger())
	require.NoError(tb, err)
	require.NoError(tb, s.Close())
}

// add prepares and commits an exception for old.
func add(tb testing.TB, s exstore.Store, old exstore.Chunk) exstore.Exception {
	tb.Helper()
	e, err := s.Prepare(context.Background(), old)
	require.NoError(tb, err, "prepare %d", old)
	require.NoError(tb, s.Commit(context.Background(), e), "commit %v", e)
	return e
}

// walkMap returns s's exceptions, origin chunk to COW chunk.
func walkMap(s exstore.Store) map[exstore.Chunk]exstore.Chunk {
	m := map[exstore.Chunk]exstore.Chunk{}
	s.Walk(func(e exstore.Exception) bool {
		m[e.Old] = e.New
		return true
	})
	return m
}
