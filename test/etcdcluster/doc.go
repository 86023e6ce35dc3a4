// Package etcdcluster tests snapd as a member of a cluster of processes on
// one host: three snapd serve --lock etcd processes over one origin file
// and one COW file (opened with O_DIRECT, without file locks, as shared
// storage), coordinated by an etcd server embedded in the test process
// (lockc/etcd/etcdtest: go.etcd.io/etcd/server/v3/embed on unix sockets). It has only
// tests, and needs no QEMU, no root and no network beyond loopback.
//
// TestEtcdClusterKills drives the workload of package test/clusterload
// (the one test/cluster drives against three DLM guests) over each node's
// NBD unix socket: origin writes racing for the same chunks from every
// node, snapshot writes, flushes, snapshot reads checked continuously. It
// kills a node with SIGKILL mid-workload, requires the survivors to go on
// once the node's lease (2 s) expires, starts it again and requires every
// node to go on; 3 kills, a different victim each time, or
// CLUSTERSNAP_SOAK_KILLS=N for a soak (run with -v to see the tally:
// kills, writes checked, violations); a soak's origin grows with its kills
// (clusterload.Options.Scale) so that its writers still race for fresh
// chunks at the end. CLUSTERSNAP_SEED sets the seed.
// Afterwards every node stops on SIGTERM with exit 0 and its snapshot
// valid, snapd check is clean on the COW, and the origin file and the
// snapshot view the COW holds keep every flushed write and hold nothing
// nobody wrote. A node serves once it printed "serving:"; nothing waits by
// sleeping. CLUSTERSNAP_CONSOLE_DIR, if set, receives every node's output
// (nodes.log).
//
// TestEtcdClusterCutFencesBeforeOtherGrant cuts one node's connection to
// etcd (an etcdtest.Proxy that stops forwarding) while that node holds the
// COW store's lock in EX and writes fresh origin chunks, and another node
// waits to write fresh chunks too. From the clients' clocks: every request
// the cut-off node acknowledged, and its clients' first error, come before
// the other node's first write that needed the lock; the cut-off node's
// clients all end with EIO or the end of their connection, and its snapd
// exits 1 saying it lost its cluster lockspace. It then serves again
// through the healed proxy, and the final checks above hold. The timing
// check is proven by a unit test on records that break it
// (TestCutRecordViolations).
//
// TestEtcdClusterLiveSnapshot serves an origin on three nodes with a shared
// catalog and takes a snapshot on node 1 ('snapd snapshot create') while
// NBD clients write the origin through nodes 2 and 3, logging every
// acknowledged write: nbdcopy reads the new snapshot the same through
// every node, and it is a cut of the logged writes (internal/cutcheck).
// A delete on node 2 then takes it off every node.
//
// TestEtcdClusterLiveMerge merges a snapshot back into the origin with
// 'snapd merge --control' on node 1 while NBD clients write the origin
// through nodes 2 and 3, each to its own regions: every node then reads
// the snapshot's content with each region's last acknowledged write on
// top, and serves the snapshot no more.
//
// snapd is built once per test binary (TestMain). TMPDIR must be on a file
// system that takes O_DIRECT (not tmpfs); the test fails saying so
// otherwise.
package etcdcluster
