// Package cluster tests snapd as a member of a real cluster: three QEMU
// guests, each running Debian's kernel with corosync, dlm_controld and
// snapd serve --lock dlm over the same origin and COW images (shared
// virtio disks), driven over NBD from the host through forwarded
// loopback ports. It has only tests; see test/guest for the guests and
// their guest-only network, and README.md for what each test proves.
//
// TestClusterKills drives the workload of package test/clusterload (shared
// with test/etcdcluster) with its own NBD client, which sends
// one request at a time per connection, so the test knows which writes
// were acknowledged and which a completed flush covered. Every block it
// writes encodes the writing node, its sequence number and the block, so
// a block holding anything nobody wrote there is detected. The run is
// deterministic up to timing: the seed is logged, and CLUSTERSNAP_SEED
// sets it. It kills a guest (SIGKILL of its QEMU) twice, a different
// victim each time; CLUSTERSNAP_SOAK_KILLS=N kills N times for a soak.
// CLUSTERSNAP_CONSOLE_DIR, if set, receives every guest's console.
// TestClusterAttach runs the kernel's nbd client (snapd attach) with
// mkfs.ext4 and e2fsck on one node's snapshot export while the other
// nodes write the origin. TestClusterThroughput (CLUSTERSNAP_MEASURE=1)
// compares the three clustered nodes' throughput with one node serving
// alone (no --cluster-id) on the same guests: the host drives first writes to
// fresh origin chunks and snapshot reads for a fixed time in each run and
// logs the counts and their ratio, which is a figure, not an assertion.
// The guests go from the bare run to the cluster run on words the host
// writes to a shared control disk (/dev/vdc), and report each step on
// their console. TestClusterLive serves with a catalog on a shared disk
// and runs two parts on one boot. In the first, node 1 creates a snapshot
// live ('snapd snapshot create' on a blank shared disk, on a control word)
// while the host writes the origin through nodes 2 and 3, logging every
// write in a cutcheck.History; the snapshot, read through each node, must
// be the same everywhere and a cut of those writes (package
// internal/cutcheck); then node 2 deletes it from every node. In the
// second, node 1 creates a snapshot again and merges it back into the
// origin ('snapd merge --control', in 64 KiB steps: serve --merge-step)
// while the host writes the origin through nodes 2 and 3, each to its own
// regions, remembering each region's last acknowledged write; afterwards
// the origin, read through each node, is the snapshot with those writes
// on top and no node serves the snapshot. Node 2 writes chunks the
// merge's first steps take, so that only following each step (re-reading
// what it merged) sends its writes to the origin rather than to the COW.
// Then every snapd stops cleanly.
//
// The guests print their snapd's status (snapd status --control --json)
// and their kernel's count of completed lockspace recoveries on their
// console every 3 s while it serves; the tests read the cluster counters
// and wait for recoveries there.
package cluster
