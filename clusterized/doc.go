// Package clusterized makes an exception store safe for several nodes that
// share the origin and COW devices, by coordinating them through one cluster
// lock (package lockc) per store. It wraps any exstore.Store whose Refresh
// re-reads what other nodes changed, and knows no concrete store: a caller
// opens the core (Open, with an OpenFunc that never formats) or hands one
// over (New).
//
// # Locking
//
// Every node holds the store's lock resource (named from the cluster id) at
// least in NL for as long as it serves, so the lock value block (LVB) is
// kept. It asks for that NL lock with Expedite: a new request otherwise
// queues behind every queued conversion, and on a busy store the other
// nodes' conversions may never leave the queue empty. The node's lock is shared by all its goroutines and cached: a gate
// (gate.go) admits local users while the cached mode covers them, and a
// lock manager (manager.go) converts the lock when it does not.
//
//   - A Lookup that hits needs no lock: exceptions are only ever removed by
//     merge, which takes EX and is offline, as in the kernel (the other
//     nodes do not serve the snapshot meanwhile; a node that does sees the
//     removal at its next grant).
//   - A Lookup that misses enters in CR. The miss stays true until its
//     Release, because another node needs EX to add an exception (and only
//     then overwrites that origin chunk): a snapshot read of the origin
//     cannot race another node's copy-on-write of that chunk.
//   - The COW engine's snapshot reads first look up optimistically
//     (exstore.OptimisticLookuper): while the node holds CR or EX with
//     current metadata, the core's answer is the cluster's, and it stays so
//     until the gate's state word changes, which it does before the node
//     gives the lock down. Such a read enters nothing; after its I/O it
//     checks the word, and reads again if it moved (another node may then
//     have copied and overwritten a chunk it read from the origin). After
//     a few such tries it holds its misses in CR as above, so it cannot
//     starve.
//   - Prepare enters in EX and stays in until the exception is committed or
//     aborted, so the node never gives EX up with an allocation another node
//     could repeat. Commit, Abort, the merge primitives and Invalidate work
//     under EX too, as does Exclusive, which runs a caller's function on
//     the core (the COW label's read-modify-write of the header sector). When the core is an exstore.ConditionalPreparer, a
//     Prepare while the node holds EX enters nothing: the core allocates
//     only if the gate's state word is still the one that admitted it, and
//     it counts the exception as unsettled until it is committed or
//     aborted, which a drain waits for as it waits for the users inside.
//   - CR and EX stay held after use; the node gives them up only when a
//     blocking notification says another node waits, once its users are out.
//
// A goroutine must not call the store while it holds a lookup miss or a
// prepared exception of the same store (see "Nested users" in gate.go).
//
// # Lazy commits
//
// When the core is an exstore.LazyCommitter, so is the store Exstore
// returns (a *LazyStore): the COW engine then commits a snapshot write's
// exception lazily, visible at once and durable at the next Sync, as on the
// bare store. CommitLazy ends the Prepare's stay in EX as Commit does, so
// lazily committed exceptions only ever wait to be written while the node
// holds EX: before it gives EX up (or closes), the node has the core write
// them (a core Sync), and only then publishes the counter, so that no other
// node refreshes metadata missing an exception this node made visible, or
// allocates its COW chunk. Sync with none waiting only flushes the device,
// and needs no lock. A node that loses the lockspace writes none of them
// any more (the fence refuses, and Sync fails): they covered only snapshot
// writes no flush had completed for.
//
// # The counter
//
// The LVB carries a counter (layout in lvb.go, specs/locks.md §5). A node
// leaving EX publishes one more than it was granted if it prepared,
// merged or invalidated anything under EX (an aborted allocation counts),
// and the value it was granted otherwise, so that the lock moving between
// nodes costs no metadata read while nothing changes. A node that gets
// CR or EX compares the counter with the last one it saw: equal means no
// other node changed the metadata, so nothing is read; a higher counter in
// the same epoch means Refresh (which reads only what was appended); an
// invalid LVB (a node died holding EX), an unknown one after a known value,
// another epoch (a re-seed or a merge) or a counter that went backwards
// means a full reload. The next EX holder after an invalid or unknown LVB
// re-seeds: a counter above every value this node has seen, and a fresh
// random epoch. Nothing is added to the COW device: its metadata stays
// byte-compatible with dm-snapshot, so the counter lives only in the LVB and
// in each node's memory; the random epoch is what keeps a re-seeded counter
// from being mistaken for an old value.
//
// # Node failure
//
// When the node loses the lockspace (lockc.Lockspace.Lost), every later
// lookup miss, Prepare, Commit, merge step, Invalidate and Refresh fails with
// an error that wraps lockc.ErrLost and names the cluster; prepared
// exceptions are aborted rather than committed. Stores opened through Open
// also fence the metadata writes of their core store (ErrFenced).
package clusterized
