// Package volumes wires an origin and its snapshots for serving: it opens
// the devices, opens each snapshot's exception store through a registry of
// store types (the kernel table's "P" and "N"), clusters the stores when
// asked, and presents the volumes as NBD exports. It is where the COW
// engine (exstore/cow) and the NBD server (nbd) meet; neither knows the
// other.
//
// Open takes an exclusive lock on every device it opens, so that no second
// process on the host serves them at once, and never formats a COW: a
// device without a store is refused, so that a mistyped path is not wiped.
// A Cluster whose engine is shared ("dlm", whose nodes are other hosts, and
// "etcd", whose nodes are whatever reaches the etcd cluster: other hosts or
// other processes of this one) makes the devices shared storage instead:
// Open opens them with O_DIRECT and takes no host-local lock. NewCluster
// refuses options it can judge alone (a bad id, an unknown engine, etcd
// options without the etcd engine, TLS files with a plaintext etcd
// endpoint) with a *ConfigError, and asks no lock server anything; the
// stores' Open does. The caller closes the Cluster after the Set.
// A transient store keeps its exceptions in this process's memory, so it
// cannot be shared by a cluster: Open refuses the pair. Set.Close closes
// the stores before the devices they live on.
//
// A COW whose store has a label (exstore.Labeler) is served only with the
// origin it belongs to. Open computes the origin's identity (its size and
// the stable id sysfs reports, or Config.OriginID; OriginIdentity). With a
// Cluster it refuses a COW labelled for another cluster or origin
// (CheckLabel, ErrLabelMismatch) and stamps one that names no cluster yet
// with the cluster id, the origin and, if it has none, a new UUID, under
// the store's cluster lock in EX (clusterized.Store.Exclusive): a node that
// cannot join writes nothing, two nodes never stamp at once (the second
// finds the first's stamp), and a stamp cannot undo another node's
// invalidation of the header it shares a sector with. Without a
// Cluster it ignores the cluster's fields but refuses a COW labelled for an
// origin of another size, and writes no label. A label that cannot be read
// (bad checksum, unknown version) is refused in both cases.
//
// With a Cluster, Open also joins the origin's snapshot set (package
// clusterized/snapset, resource Cluster.OriginResource) with the identity
// of each snapshot's COW (snapshotIdentity: its name and its label's UUID), after the stores are open and
// before anything is served: a node whose snapshots are not the cluster's
// is refused with an error wrapping snapset.ErrSetMismatch, and the
// origin's writes pass the set's gate. With a catalog, a mismatch may be a
// live change that another node made after this one read the catalog:
// Open then reads it again and retries (a few times, with growing pauses)
// before it refuses. Set.Close leaves the set first.
//
// # Live changes
//
// CreateSnapshot formats a new COW (FormatCOW, the checks of 'snapd
// create') and adds it to the serving origin as a cut (cow.Origin.
// AddSnapshot: origin writes are held, drained and flushed); DeleteSnapshot
// removes the snapshot's export first, waiting for its connections to
// close, then takes it out of the origin and marks its COW invalid
// (ErrDeleted), since the origin is written without copying into it from
// then on. Once Export names where the exports are served, both keep the
// exports in step. Changes run one at a time (Set.changeMu); Snapshots and
// Status see the list under Set.mu, which is never held across I/O.
//
// A catalog (Config.Catalog, catalog.go) records the snapshot set durably
// at every live change, before the change takes effect, so that a
// restarted server serves the snapshots created live and not those
// deleted live. In a cluster every node names the same catalog on shared
// storage, and a live change runs under the origin lock in EX
// (snapset.Member.Update): the changing node records the new set in the
// catalog and takes it on, then publishes its digest; every other node
// has drained and flushed its origin writes (follower.Quiesced) and,
// before it writes the origin again, reads the catalog and takes the new
// set on (follower.Adopt): it opens and adds new snapshots (checking their
// COW's UUID against the catalog's), unexports and drops deleted ones. A
// node whose set then differs from the published one stops writing the
// origin (snapset.ErrSetChanged). Without a catalog a clustered node
// refuses live changes (ErrNoCatalog).
//
// # Merge
//
// A COW whose label says it merges into the origin (exstore.Merging) is
// never served as a snapshot: Open puts the origin back in merge mode with
// it (cow.Origin.StartMerge) before anything is served, so the origin
// reads as the merge left it, and leaves it out of the exports; two such
// COWs are refused. Set.Merge runs a merge, or finishes the one Open
// resumed (Set.Merging): it removes the snapshot's export, records the
// merge in the COW's label before the origin switches, and at the end
// takes the snapshot out of the catalog, then records it as merged in the
// label, and drops it from the Set. A COW whose label says it was merged
// (exstore.Merged) is refused (ErrMergedCOW) until it is formatted again.
// With a Cluster both are refused (ErrClusterMerge): the other nodes would
// serve the origin device as it is, not in merge mode. Set.StartMerge
// merges a clustered origin while every node serves it: the node that runs
// it merges in steps of at most Config.MergeStep (ClusterMergeStep by
// default), each under the origin lock in EX, and the other nodes follow
// the COW's label (merge mode, what each step merged, the end). While the
// origin merges it offers no dirty bitmap: it reads the merging snapshot's
// view.
//
// Every export of a Set shares one engine whose Flush syncs every device a
// write may have reached, so a flush on one connection covers the writes
// completed on all: the exports offer multi-conn.
//
// # Changed-block tracking
//
// Every export offers changed-block tracking (nbd.DirtyBitmapper): one
// dirty bitmap per snapshot S of the origin, named S, that marks the ranges
// that may have changed since S was taken. On the origin that is S's
// exceptions: the origin has changed nowhere else. On a snapshot X it is
// S's exceptions and X's own: where neither has one, both read the origin. The
// bitmaps follow the origin's current snapshots (cow.Origin.Snapshots), so
// a snapshot added or removed while serving gains or loses its bitmap at
// once; the bitmap of an invalid snapshot, and every bitmap on an invalid
// snapshot's export, is an error rather than a map.
package volumes
