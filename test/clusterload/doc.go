// Package clusterload is the checked workload of the cluster tests: what
// test/cluster drives against three guests serving with the kernel DLM and
// test/etcdcluster against three snapd processes on etcd. It knows nothing
// of how the nodes run; a test gives it a way to connect to node i's
// exports and tells it when a node serves and when it is about to die.
//
// Its NBD client (Client) sends one request at a time per connection, so
// the test knows which writes were acknowledged and which a completed
// flush covered. Every block it writes (BlockSize) encodes, in each
// sector, the device, the writing node, the node's sequence number and
// the block; the rest is derived from those, so a block holding anything
// nobody wrote there (another block's data, a mix of two writes, any other
// bytes) decodes as nobody's (DecodeBlock).
//
// History records every write sent, per block in the order sent; each
// block has one writer at a time, so that order is the order the writes
// reached the device. Its final check (CheckFinal) holds a device to:
// every block holds its last flushed write (the original if none was
// flushed) or a write sent after it, and nothing nobody wrote. Readable is
// the check of a snapshot read while the workload runs: the original, or
// a snapshot write sent to that very block. The checker is proven by the
// package's test against a recorded run and its damaged variants.
//
// Workload is the concurrent load on Nodes nodes over the layout below
// (OriginBlocks and the other constants): per node an origin writer that
// races the other nodes to copy the same chunk (three turns in a row, taken
// by whichever writers come, go to one chunk not written before, each to a
// block of it the writer owns; one write in four rewrites an earlier
// block), a snapshot writer on a range of its own, both flushing every
// FlushEvery acknowledged writes, and a snapshot reader that checks every
// block it reads. A request that fails is a problem unless the test
// declared its node's incarnation over (Down) before it failed. The run is
// deterministic up to timing, given its seed.
//
// FinalImages and CheckImages are the check of the quiescent images
// afterwards: persistent.Check clean on the COW, and CheckFinal on the
// origin image and on the snapshot view the COW holds over it.
package clusterload
