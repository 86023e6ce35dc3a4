package clusterized_test

import (
	"context"
	"io"
	"log/slog"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/clusterized"
	"github.com/clustersnap/clustersnap/exstore"
	"github.com/clustersnap/clustersnap/exstore/blockdev"
	"github.com/clustersnap/clustersnap/exstore/blockdev/faultdev"
	"github.com/clustersnap/clustersnap/exstore/storetest"
	"github.com/clustersnap/clustersnap/lockc"
	"github.com/clustersnap/clustersnap/lockc/inproc"
	"github.com/clustersnap/clustersnap/persistent"
	"github.com/clustersnap/clustersnap/persistent/persistenttest"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// formatCOW writes an empty persistent store on dev, as snapd create does
// before any clustered node opens it.
func formatCOW(t testing.TB, dev blockdev.Device, chunkSectors uint32) {
	t.Helper()
	s, err := persistent.Format(context.Background(), dev, chunkSectors, quietLogger())
	require.NoError(t, err)
	require.NoError(t, s.Close())
}

// twoNodes returns nodes A (1) and B (2) of a fresh in-process cluster,
// each with its own store of cluster id on one fresh 4 MiB COW device of
// 4 KiB chunks, closed when the test ends, and the cluster.
func twoNodes(t *testing.T, id string) (a, b *clusterized.Store, cluster *inproc.Cluster) {
	t.Helper()
	dev := faultdev.New("cow", 4<<20)
	formatCOW(t, dev, 8)
	cluster = inproc.NewCluster()
	a = openClustered(t, dev, cluster.Node(1), id)
	t.Cleanup(func() { _ = a.Close() })
	b = openClustered(t, dev, cluster.Node(2), id)
	t.Cleanup(func() { _ = b.Close() })
	return a, b, cluster
}

func openClustered(t testing.TB, dev blockdev.Device, engine lockc.Engine, id string) *clusterized.Store {
	t.Helper()
	s, err := openPersistent(context.Background(), dev, engine, id)
	require.NoError(t, err)
	return s
}

// plainCore hides every optional interface of the store it holds (and
// that it is a *persistent.Store), so that the wrapper falls back to what
// it does for any core: prepared exceptions count as users inside, and
// every commit is durable.
type plainCore struct{ exstore.Store }

// openPlainClustered is openClustered over a plainCore.
func openPlainClustered(t testing.TB, dev blockdev.Device, engine lockc.Engine, id string) *clusterized.Store {
	t.Helper()
	open := func(ctx context.Context) (exstore.Store, error) {
		core, err := persistent.Open(ctx, dev, persistent.Options{NoFormat: true, Logger: quietLogger()})
		if err != nil {
			return nil, err
		}
		return plainCore{core}, nil
	}
	core, err := open(context.Background())
	require.NoError(t, err)
	s, err := clusterized.New(context.Background(), core, engine, id, clusterized.Options{Reopen: open})
	require.NoError(t, err)
	return s
}

// TestConformance runs the store suite against the wrapper on a one-node
// engine; OpenShared joins the same cluster as a second member, which
// contends for the lock like another node. "plain core" runs it over a
// core without optional interfaces.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name string
		open func(t testing.TB, dev blockdev.Device, engine lockc.Engine, id string) *clusterized.Store
	}{
		{"clusterized", openClustered},
		{"clusterized plain core", openPlainClustered},
	} {
		t.Run(tc.name, func(t *testing.T) { runConformance(t, tc.name, tc.open) })
	}
}

func runConformance(t *testing.T, name string, open func(t testing.TB, dev blockdev.Device, engine lockc.Engine, id string) *clusterized.Store) {
	var mu sync.Mutex
	engines := map[blockdev.Device]lockc.Engine{}
	engineOf := func(dev blockdev.Device) lockc.Engine {
		mu.Lock()
		defer mu.Unlock()
		e := engines[dev]
		if e == nil {
			e = inproc.New()
			engines[dev] = e
		}
		return e
	}
	storetest.Run(t, persistenttest.WithLayout(storetest.Harness{
		Name: name,
		// Exstore: over a lazily committing core the suite's lazy
		// subtest runs too.
		New: func(t *testing.T, chunkSectors uint32, cowBytes int64) (exstore.Store, blockdev.Device) {
			dev := faultdev.New("cow", cowBytes)
			formatCOW(t, dev, chunkSectors)
			return open(t, dev, engineOf(dev), "conformance").Exstore(), dev
		},
		Reopen: func(t *testing.T, s exstore.Store, dev blockdev.Device) exstore.Store {
			require.NoError(t, s.Close())
			return open(t, dev, engineOf(dev), "conformance").Exstore()
		},
		OpenShared: func(t *testing.T, dev blockdev.Device) exstore.Store {
			return open(t, dev, engineOf(dev), "conformance").Exstore()
		},
		Merge: true,
	}))
}
