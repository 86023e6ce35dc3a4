package etcdcluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/clustersnap/clustersnap/lockc/etcd/etcdtest"
)

// startCatalogCluster writes content as the origin in dir and starts three
// snapd serve --lock etcd processes over it, sharing a catalog in dir, each
// with its NBD and control sockets there and extra serve arguments; it
// returns them serving (index 1 to 3), and kills what still runs when the
// test ends.
func startCatalogCluster(ctx context.Context, t *testing.T, dir string, content []byte, extra ...string) []*node {
	t.Helper()
	origin, cat := filepath.Join(dir, "origin.img"), filepath.Join(dir, "catalog")
	require.NoError(t, os.WriteFile(origin, content, 0o600))
	requireDirect(t, origin)
	etcd := etcdtest.Start(t, 1)
	logFile := nodesLog(t, dir)
	ns := make([]*node, nodes+1)
	t.Cleanup(func() {
		for i := 1; i <= nodes; i++ {
			if n := ns[i]; n != nil && n.cmd != nil {
				select {
				case <-n.exited:
				default:
					n.kill()
				}
			}
		}
	})
	for i := 1; i <= nodes; i++ {
		sock, ctl := filepath.Join(dir, fmt.Sprintf("node-%d.nbd", i)), filepath.Join(dir, fmt.Sprintf("node-%d.ctl", i))
		args := append([]string{"serve",
			"--origin", origin, "--catalog", cat,
			"--cluster-id", "c1", "--lock", "etcd", "--etcd-endpoints", etcd.Endpoint(0), "--etcd-lease-ttl", leaseTTL.String(),
			"--listen", "", "--socket", sock, "--control", ctl, "--stats-interval", "0"}, extra...)
		ns[i] = &node{id: i, snapd: snapdBinary, sock: sock, ctl: ctl, log: logFile, args: args}
		require.NoError(t, ns[i].start())
	}
	for i := 1; i <= nodes; i++ {
		require.NoError(t, ns[i].waitServing(ctx))
	}
	return ns
}
